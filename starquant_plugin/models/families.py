"""What differs between the supported diffusion LM families, in one registry.

Every caller that needs "which token is the mask", "are logits shifted" or "which modules
are the decoder blocks" asks here, so a new family is one entry, not edits everywhere.
"""

import difflib
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class DLLMFamily:
    """Facts about one masked-diffusion LM family.

    shifted_logits: the network's output at ``i - 1`` predicts token ``i`` (Dream).
    block_class: the decoder block class name (llm-compressor's sequential target).
    block_pattern: regex prefix of a decoder block's module names.
    lm_head: the LM head's module name (kept in 16 bit).
    linear_groups: block-relative names of the linears at each activation-quantization point,
        in forward order; linears in one group read the same input and share one transform.
    attention_output: the output projection, whose input TAC corrects.
    attention_module: the module that calls the attention function ("" = the block itself).
    scale_pairs: (writer, readers) per channel-rescalable connection, in forward order: a
        channel written by ``writer`` (an RMSNorm weight entry, or a linear's output row) is
        read only by the ``readers``' input columns, so scaling it by ``a`` there and by
        ``1 / a`` in the readers leaves the function unchanged (SmoothQuant's and QuaRot's
        mappings: pre-attention norm -> q/k/v, v_proj -> output projection, pre-MLP norm ->
        gate/up, up_proj -> down_proj).
    query_key: the query and key projections: a RoPE channel pair of K scaled by ``a`` and
        the same pair of every query head that reads it scaled by ``1 / a`` leaves ``Q K^T``
        unchanged (the stress variants' K outliers).
    """

    name: str
    model_type: str
    shifted_logits: bool
    block_class: str
    block_pattern: str
    lm_head: str
    linear_groups: tuple[tuple[str, ...], ...]
    attention_output: str
    attention_module: str
    scale_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    query_key: tuple[str, str]


FAMILIES: dict[str, DLLMFamily] = {
    family.model_type: family
    for family in (
        DLLMFamily(
            name="llada",
            model_type="llada",
            shifted_logits=False,
            block_class="LLaDALlamaBlock",
            block_pattern=r"model\.transformer\.blocks\.\d+\.",
            lm_head="model.transformer.ff_out",
            linear_groups=(("q_proj", "k_proj", "v_proj"), ("attn_out",),
                           ("ff_proj", "up_proj"), ("ff_out",)),
            attention_output="attn_out",
            attention_module="",
            scale_pairs=(("attn_norm", ("q_proj", "k_proj", "v_proj")),
                         ("v_proj", ("attn_out",)),
                         ("ff_norm", ("ff_proj", "up_proj")),
                         ("up_proj", ("ff_out",))),
            query_key=("q_proj", "k_proj"),
        ),
        DLLMFamily(
            name="dream",
            model_type="Dream",
            shifted_logits=True,
            block_class="DreamDecoderLayer",
            block_pattern=r"model\.layers\.\d+\.",
            lm_head="lm_head",
            linear_groups=(
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"),
                ("mlp.down_proj",),
            ),
            attention_output="self_attn.o_proj",
            attention_module="self_attn",
            scale_pairs=(
                ("input_layernorm",
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("self_attn.v_proj", ("self_attn.o_proj",)),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                ("mlp.up_proj", ("mlp.down_proj",)),
            ),
            query_key=("self_attn.q_proj", "self_attn.k_proj"),
        ),
    )
}


def family_of(model_or_config: PreTrainedModel | PretrainedConfig | dict) -> DLLMFamily:
    """The family of a model, config or config dict; an unknown ``model_type`` raises with the
    fix (and the closest supported name, for a typo)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = (config.get("model_type") if isinstance(config, dict)
                  else getattr(config, "model_type", None))
    if model_type not in FAMILIES:
        close = difflib.get_close_matches(str(model_type), FAMILIES, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unsupported model_type {model_type!r}: starquant supports diffusion LMs of type "
            f"{sorted(FAMILIES)}.{hint} Load a LLaDA or Dream checkpoint (config.json "
            "'model_type')."
        )
    return FAMILIES[model_type]


def decoder_blocks(model: PreTrainedModel, family: DLLMFamily) -> list:
    """The model's decoder blocks in forward order (modules of class ``family.block_class``)."""
    return [m for m in model.modules() if type(m).__name__ == family.block_class]


def vocabulary_size(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    """Rows of the input embedding: LLaDA's ``embedding_size`` (padded) else ``vocab_size``."""
    config = getattr(model_or_config, "config", model_or_config)
    return int(getattr(config, "embedding_size", None) or config.vocab_size)


def mask_token_id(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    """The ``[MASK]`` id from the config, checked to lie inside the vocabulary; a model without
    one cannot denoise, so this raises (there is no default: the 8B models' ids would be wrong
    for any other vocabulary)."""
    config = getattr(model_or_config, "config", model_or_config)
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError(
            f"{type(config).__name__} has no mask_token_id: a masked diffusion LM needs one. "
            "Set 'mask_token_id' in config.json to the tokenizer's mask token id."
        )
    vocab = vocabulary_size(config)
    if not 0 <= int(mask_id) < vocab:
        raise ValueError(
            f"mask_token_id is {mask_id}, outside the model's vocabulary of {vocab} ids; set "
            "'mask_token_id' in config.json to the tokenizer's mask token id."
        )
    return int(mask_id)


def check_tokenizer_mask_token(model_or_config: PreTrainedModel | PretrainedConfig,
                               tokenizer: PreTrainedTokenizerBase) -> int:
    """``mask_token_id(config)``, checked against the tokenizer's mask token when it has one:
    otherwise calibration and sampling would mark the wrong positions as ``[MASK]``."""
    mask_id = mask_token_id(model_or_config)
    tokenizer_id = getattr(tokenizer, "mask_token_id", None)
    if tokenizer_id is not None and tokenizer_id != mask_id:
        raise ValueError(
            f"config.json's mask_token_id is {mask_id} but the tokenizer's mask token "
            f"{tokenizer.mask_token!r} has id {tokenizer_id}; make them agree (set "
            f"'mask_token_id': {tokenizer_id} in config.json if the tokenizer is right)."
        )
    return mask_id


def token_logits(
    model: PreTrainedModel, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Position-aligned logits ``[batch, seq, vocab]``: ``out[:, i]`` predicts token ``i``.

    The only place where Dream's shifted logits are realigned (position 0 reuses its own
    output, as Dream's sampler does).
    """
    logits = model(input_ids, attention_mask=attention_mask).logits
    if family_of(model).shifted_logits:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits
