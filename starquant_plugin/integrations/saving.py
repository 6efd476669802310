"""Writing STaR-Quant checkpoints: ``save_starquant``, the ``save_pretrained`` a quantized
model carries, and the guard that keeps a half-quantized model from being saved or run.

Every way a user saves a STaR-Quant model goes through ``save_starquant``: the quantizers
(``quantize_dllm``, ``STaRQuantModifier``) and the transformers loader bind
``model.save_pretrained`` to it (``bind_save_pretrained``). They must: llm-compressor's own
``save_pretrained`` wrapper re-writes config.json from the original model folder
(``config._name_or_path``) after saving, dropping ``quantization_config``, and such a folder
reloads with random linears. ``save_starquant`` writes into a temporary sibling directory,
checks the result (config, every tensor, finite values) and renames it into place, so a failure
leaves the target as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.format import (
    args_of,
    check_checkpoint,
    quantization_config_dict,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json", "recipe.yaml",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)
"""Files a checkpoint folder holds (besides ``*.safetensors``); ``overwrite=True`` replaces a
folder only when it holds nothing else."""

_TMP, _OLD = "tmp", "old"
"""Sibling directories of an atomic save: ``.<name>.tmp-<pid>-<id>`` (being written) and
``.<name>.old-<pid>-<id>`` (the previous checkpoint, while it is being replaced)."""

_UNUSABLE = "_starquant_unusable"
_RECIPE = "_starquant_recipe"


# the guard for half-quantized models


def mark_unusable(model: torch.nn.Module, reason: str) -> None:
    """Make ``model`` refuse to run or be saved, with ``reason`` and the fix: for a model whose
    quantization stopped after some blocks were replaced (half-quantized, not the FP model and
    not the quantized one)."""
    setattr(model, _UNUSABLE, reason)

    def refuse_forward(_module, _args):
        check_usable(model)

    model.register_forward_pre_hook(refuse_forward)
    bind_save_pretrained(model)


def check_usable(model: torch.nn.Module) -> None:
    reason = getattr(model, _UNUSABLE, None)
    if reason is not None:
        raise RuntimeError(
            f"This model is half-quantized and unusable: {reason}. Reload the FP model and "
            "quantize again after fixing the cause; nothing was saved."
        )


# output directories


def _is_checkpoint_file(path: Path) -> bool:
    return path.is_file() and (path.name in CHECKPOINT_FILES or path.suffix == ".safetensors")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an ``out_dir`` that ``save_starquant`` would refuse, e.g. before a long
    calibration: a file, a directory that holds files (unless ``overwrite``), or, with
    ``overwrite``, a directory that also holds files that are not part of a checkpoint (they
    would be deleted with it)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(
            f"{out_dir} is a file, not a directory; nothing was written. Pass a directory path "
            "to save into."
        )
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not overwrite:
        what = "a model" if any(_is_checkpoint_file(e) for e in entries) else "files"
        raise FileExistsError(
            f"{out_dir} already holds {what}; nothing was written. Pass overwrite=True to "
            "replace it, or choose an empty or new directory."
        )
    foreign = [entry.name for entry in entries if not _is_checkpoint_file(entry)]
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds {foreign[:5]}, which are not part of a checkpoint; overwrite=True "
            "replaces the whole folder and would delete them, so nothing was written. Move "
            "them out, or save into another directory."
        )
    return out_dir


def _sibling(out_dir: Path, kind: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_interrupted_saves(out_dir: Path) -> None:
    """Delete ``.<name>.tmp-*`` folders left by an interrupted save of ``out_dir`` (whose
    process is gone); report, and keep, ``.<name>.old-*`` folders, which hold the previous
    checkpoint of an interrupted overwrite."""
    if not out_dir.parent.is_dir():
        return
    for path in sorted(out_dir.parent.glob(f".{out_dir.name}.*-*")):
        kind, _, rest = path.name[len(out_dir.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind == _TMP and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("Removed %s, left by an interrupted save of %s.", path, out_dir)
        elif kind == _TMP:
            logger.warning("%s may be a save of %s in progress, or left by an interrupted one; "
                           "delete it if no save is running.", path, out_dir)
        elif kind == _OLD:
            logger.warning("%s holds the previous checkpoint of an interrupted overwrite of "
                           "%s; move it back or delete it.", path, out_dir)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and only
    deleted once ``new`` is in place (restored if the rename fails)."""
    if not target.exists():
        os.replace(new, target)
        return
    backup = _sibling(target, _OLD)
    os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# recipes


def recipe_yaml(recipe: str | os.PathLike | Any) -> str:
    """The recipe as YAML text, checked to be a YAML mapping: ``recipe`` is a recipe file path,
    YAML text, or an object with ``yaml()`` (llm-compressor's ``Recipe``)."""
    if hasattr(recipe, "yaml"):
        text = recipe.yaml()
    elif isinstance(recipe, os.PathLike) or (
            isinstance(recipe, str) and "\n" not in recipe
            and (Path(recipe).suffix in (".yaml", ".yml") or ":" not in recipe)):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(
                f"recipe={str(recipe)!r} is not a file (nor YAML text); nothing was written. "
                "Pass the path of the recipe.yaml the model was quantized with, its YAML text, "
                "or llm-compressor's Recipe object."
            )
        text = path.read_text(encoding="utf-8")
    else:
        text = str(recipe)
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"recipe is not valid YAML ({error}); nothing was written.") from error
    if not isinstance(parsed, dict):
        raise ValueError(
            f"recipe parses to a {type(parsed).__name__}, not a YAML mapping "
            "('<name>_stage: ...'); nothing was written. Pass the recipe file or its text."
        )
    return text


# saving


def save_starquant(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    *,
    args: StarQuantArgs | None = None,
    tokenizer: Any = None,
    recipe: str | os.PathLike | Any = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a STaR-Quant checkpoint of ``model`` to ``out_dir`` atomically.

    Everything is checked before anything is written (the model is fully quantized with
    finite tensors, ``args``, the recipe, the output directory), then written into a
    temporary sibling directory, checked on disk (config, every quantized linear's tensors,
    finite values), and renamed into place, so a failure leaves ``out_dir`` as it was.
    ``args`` defaults to the ones recorded on ``model.config``. An ``out_dir`` that is not
    empty is refused unless ``overwrite=True``, which replaces a checkpoint folder (one that
    holds other files is refused). The config's ``auto_map`` is dropped: the hub's remote code
    cannot load this checkpoint, only ``import starquant_plugin`` can.
    """
    check_usable(model)
    out_dir = check_output_dir(out_dir, overwrite)
    args = args or args_of(model)
    if args is None:
        raise ValueError(
            "No StarQuantArgs given and none recorded on model.config; pass args= (the "
            "StarQuantArgs or modifier.starquant_args() the model was quantized with)."
        )
    recipe_text = None if recipe is None else recipe_yaml(recipe)
    quantization_config = quantization_config_dict(model, args)
    clean_interrupted_saves(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = _sibling(out_dir, _TMP)
    previous = getattr(model.config, "quantization_config", None)
    try:
        model.config.quantization_config = quantization_config
        # the class's own save_pretrained: an instance one (ours, or llm-compressor's wrapper)
        # would recurse or rewrite quantization_config
        type(model).save_pretrained(model, tmp_dir, max_shard_size=max_shard_size)
        config_path = tmp_dir / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["quantization_config"] = quantization_config
        config.pop("auto_map", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        if recipe_text is not None:
            (tmp_dir / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        check_checkpoint(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        model.config.quantization_config = (quantization_config if previous is None
                                            else previous)
    return out_dir


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    save_compressed: bool = True,
    quantization_format: str | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    is_main_process: bool = True,
    safe_serialization: bool = True,
    **unsupported: Any,
) -> None:
    """``model.save_pretrained`` of a STaR-Quant model: ``save_starquant`` with the recipe
    the model was quantized with. Takes llm-compressor's ``save_compressed`` /
    ``quantization_format`` arguments; the linears exist only as integer codes, so the
    checkpoint is always the compressed one."""
    check_usable(model)
    if unsupported:
        raise TypeError(
            f"save_pretrained of a STaR-Quant model does not take {sorted(unsupported)}; it "
            "takes save_directory, overwrite and max_shard_size (push with "
            "starquant_plugin.integrations.hub.push_to_hub)."
        )
    if not safe_serialization:
        raise ValueError("STaR-Quant checkpoints are safetensors only; drop "
                         "safe_serialization=False.")
    if not save_compressed:
        logger.warning("save_compressed=False: STaR-Quant linears are stored as integer codes "
                       "(there is no dense form of their transformed weights), so the "
                       "compressed checkpoint is written.")
    expected_format = quantization_config_dict(model, args_of(model))["format"]
    if quantization_format not in (None, expected_format):
        raise ValueError(f"quantization_format={quantization_format!r}, but this model's "
                         f"weights are stored as {expected_format!r}; drop the argument.")
    if is_main_process:
        save_starquant(model, save_directory, recipe=getattr(model, _RECIPE, None),
                       overwrite=overwrite, max_shard_size=max_shard_size)


save_pretrained._overridden = True
"""llm-compressor's ``modify_save_pretrained`` leaves a method marked so alone."""


def bind_save_pretrained(model: PreTrainedModel, recipe: str | None = None) -> None:
    """Make ``model.save_pretrained`` (and llm-compressor's ``oneshot(output_dir=...)``) write
    a STaR-Quant checkpoint through ``save_starquant``; ``recipe``: YAML text saved beside it.
    Bound as a method so a deep copy of the model saves itself, not the original."""
    if recipe is not None:
        setattr(model, _RECIPE, recipe)
    model.save_pretrained = types.MethodType(save_pretrained, model)
