"""Load a diffusion LM directory (hub layout) with its tokenizer, checked for what we need."""

import json
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

from starquant_plugin.messages import shown
from starquant_plugin.models.families import (
    check_tokenizer_mask_token,
    family_of,
    mask_token_id,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "tokenizer_config.json")
"""Files one of which a model folder's tokenizer is read from (fast, sentencepiece, BPE,
WordPiece, or a config that names the tokenizer class)."""


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path`` (config.json, an index, quality.json); a file that is not
    valid JSON or holds a list or a number is refused naming it and ``fix`` (transformers and
    ``json`` fail on it with a traceback)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{shown(path)} is not valid JSON ({error}); {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{shown(path)} holds a JSON {type(value).__name__}, not an object; "
                         f"{fix}")
    return value


def check_config_file(folder: Path) -> None:
    """Refuse a folder whose config.json is not a JSON object; a missing config.json is left
    to the caller."""
    config_path = folder / "config.json"
    if config_path.is_file():
        read_json_object(config_path, "config.json must be the model's JSON object "
                         "({\"model_type\": ...}); restore it from the original model, or "
                         "re-save the checkpoint.")


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a folder with no tokenizer file (transformers fails on it with a traceback about
    converting a slow tokenizer)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{shown(folder)} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy "
            "the tokenizer files of the model it came from into it "
            "(tokenizer.save_pretrained)."
        )


def _load_local_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(folder)``; tokenizer files transformers cannot build a
    tokenizer from are one error naming the folder, not a traceback."""
    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ValueError(
            f"The tokenizer files in {shown(folder)} do not load ({reason}); copy the "
            "complete tokenizer of the model it came from into it (tokenizer.save_pretrained)."
        ) from error


def load_dllm(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode) and tokenizer from a LLaDA or Dream directory or hub id; no remote code.

    Raises before loading weights if the family is unknown (with the closest supported
    ``model_type`` for a typo, instead of transformers' ``trust_remote_code`` prompt that a
    hub config's ``auto_map`` would trigger), or if the config's mask token is missing, outside
    the vocabulary or not the tokenizer's. A local folder's config.json must be a JSON object
    and its tokenizer files must exist.
    """
    folder = Path(path) if Path(path).is_dir() else None
    if folder is not None:
        check_config_file(folder)
    config_dict, _ = PretrainedConfig.get_config_dict(path)
    family_of(config_dict)
    config = AutoConfig.from_pretrained(path)
    mask_token_id(config)  # before reading anything else
    tokenizer = (AutoTokenizer.from_pretrained(path) if folder is None
                 else _load_local_tokenizer(folder))
    check_tokenizer_mask_token(config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype).eval()
    return model, tokenizer
