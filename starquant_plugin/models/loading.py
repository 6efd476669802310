"""Load a diffusion LM directory (hub layout) with its tokenizer, checked for what we need."""

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from starquant_plugin.models.families import family_of, mask_token_id


def load_dllm(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode) and tokenizer from a LLaDA or Dream directory; no remote code.

    Raises before loading weights if the family is unknown or the config has no mask token.
    """
    config = AutoConfig.from_pretrained(path)
    family_of(config)
    mask_token_id(config)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)
