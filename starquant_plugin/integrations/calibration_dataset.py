"""Calibration data for ``oneshot``: denoising states of a DLLM as a ``datasets.Dataset``.

llm-compressor takes a dataset that already has ``input_ids`` as is. The rows here are the
states ``build_calibration_states`` makes (text masked at several noise levels, semi-
autoregressive blocks, canvases from the model's own sampler), all of one length and with no
other column: the modifier reads the token state from ``input_ids == mask_token_id``, an extra
column breaks LLaDA's forward, and Dream breaks on a 2-D integer ``attention_mask``.
"""

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from starquant_plugin.models.calibration import StateMix, build_calibration_states
from starquant_plugin.models.evaluation import text_rows
from starquant_plugin.models.families import check_tokenizer_mask_token


def dllm_calibration_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str] | datasets.Dataset,
    num_samples: int,
    seq_len: int = 128,
    mix: StateMix | None = None,
    seed: int = 0,
    text_column: str = "text",
) -> datasets.Dataset:
    """``num_samples`` rows of ``seq_len`` token ids (column ``input_ids`` only).

    texts: strings, or a dataset whose ``text_column`` holds them; they are joined and cut into
    clean rows of ``seq_len`` tokens, then turned into denoising states by ``mix``.

    The paper calibrates on WinoGrande; with Hub access::

        wino = load_dataset("allenai/winogrande", "winogrande_xl", split="train")
        dataset = dllm_calibration_dataset(model, tokenizer, wino, 128, seq_len=256,
                                           text_column="sentence")

    The trajectory part of ``mix`` runs the FP model's sampler, so build the dataset before
    quantizing the model.
    """
    mix = mix or StateMix()
    check_tokenizer_mask_token(model, tokenizer)
    if num_samples < 1:
        raise ValueError(f"num_samples is {num_samples}; pass a positive number of rows.")
    if seq_len <= mix.prompt_length:
        raise ValueError(
            f"seq_len={seq_len} leaves no position to mask after the {mix.prompt_length}-token "
            f"clean prompt of the state mix; use seq_len > {mix.prompt_length} (the paper's "
            "rows are 256 tokens), or a StateMix with a shorter prompt_length."
        )
    if isinstance(texts, str):
        raise TypeError(
            "texts is a single string; its characters would become the documents. Pass a "
            "list of strings (e.g. [text]) or a datasets.Dataset with a text column."
        )
    if isinstance(texts, datasets.Dataset):
        if text_column not in texts.column_names:
            raise ValueError(
                f"The dataset has columns {texts.column_names}, no {text_column!r}; pass "
                f"text_column= naming its text (WinoGrande: 'sentence')."
            )
        texts = texts[text_column]
    if not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError("texts must be a non-empty list of strings or a dataset of them.")
    rows = text_rows(tokenizer, "\n\n".join(texts), seq_len=seq_len)
    states = build_calibration_states(model, rows, num_samples, mix=mix, seed=seed)
    return datasets.Dataset.from_dict({"input_ids": states.tolist()})
