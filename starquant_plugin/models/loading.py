"""Load a diffusion LM directory (hub layout) with its tokenizer, checked for what we need."""

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from starquant_plugin.models.families import (
    check_tokenizer_mask_token,
    family_of,
    mask_token_id,
)


def load_dllm(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode) and tokenizer from a LLaDA or Dream directory or hub id; no remote code.

    Raises before loading weights if the family is unknown (with the closest supported
    ``model_type`` for a typo, instead of transformers' ``trust_remote_code`` prompt that a
    hub config's ``auto_map`` would trigger), or if the config's mask token is missing, outside
    the vocabulary or not the tokenizer's.
    """
    config_dict, _ = PretrainedConfig.get_config_dict(path)
    family_of(config_dict)
    config = AutoConfig.from_pretrained(path)
    mask_token_id(config)  # before reading anything else
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_tokenizer_mask_token(config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype).eval()
    return model, tokenizer
