"""Writing STaR-Quant checkpoints: ``save_starquant``, the ``save_pretrained`` a quantized
model carries, and the guard that keeps a half-quantized model from being saved or run.

Every way a user saves a STaR-Quant model goes through ``save_starquant``: the quantizers
(``quantize_dllm``, ``STaRQuantModifier``) and the transformers loader bind
``model.save_pretrained`` to it (``bind_save_pretrained``). They must: llm-compressor's own
``save_pretrained`` wrapper re-writes config.json from the original model folder
(``config._name_or_path``) after saving, dropping ``quantization_config``, and such a folder
reloads with random linears. ``save_starquant`` writes into a temporary sibling directory,
checks the result (config, every tensor, values in range), records every file's sha256 in the
manifest (``integrity``) and renames it into place, so a failure leaves the target as it was.
Where and how it writes (checks, lock, free space, the replace) is ``output_dirs``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.checkpoint_model import check_checkpoint
from starquant_plugin.integrations.format import (
    args_of,
    module_tensor_bytes,
    quantization_config_dict,
)
from starquant_plugin.integrations.integrity import (
    CHECKPOINT_FILES,
    MANIFEST_FILE,
    verify_checkpoint,
    write_manifest,
)
from starquant_plugin.integrations.output_dirs import (
    check_free_space,
    check_output_dir,
    clean_interrupted_saves,
    real_output_dir,
    replace_backups,
    replace_dir,
    temporary_sibling,
    write_text_atomic,
)
from starquant_plugin.integrations.output_lock import output_lock

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILES", "bind_save_pretrained", "check_output_dir", "check_usable",
    "clean_interrupted_saves", "estimate_checkpoint_bytes", "mark_unusable", "recipe_yaml",
    "restore_interrupted_save", "save_pretrained", "save_starquant", "verify_checkpoint",
    "write_text_atomic",
]
"""With what ``output_dirs`` and ``integrity`` define that users need: they import from here."""

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


SAVE_MARGIN_BYTES = 64 * 2**20
"""Free space asked for beyond the tensors: config, tokenizer (LLaDA's is ~10 MB), recipe,
report, manifest and the filesystem's slack."""


def estimate_checkpoint_bytes(model: torch.nn.Module, weight_bits: int) -> int:
    """About how many bytes the checkpoint of ``model`` quantized to ``weight_bits`` takes,
    from the FP model, before calibration (so a full disk is found before the run): every
    ``nn.Linear`` but the LM head as ``weight_bits`` codes plus a per-channel scale and the
    STaR tensors of its input (``[in, <=32]`` floats), everything else as it is now, plus
    ``SAVE_MARGIN_BYTES``. Errs high: by a few percent at 7B sizes (by a third for the bundled
tiny models), never by the FP size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantized, total = set(), SAVE_MARGIN_BYTES
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            weight = module.weight
            total += weight.numel() * weight_bits // 8 + module.out_features * 4
            total += module.in_features * 32 * 4
            quantized.add(id(weight))
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in quantized:
            total += tensor.numel() * tensor.element_size()
    return total


def _loaded_from(model: PreTrainedModel) -> Path | None:
    """The local folder ``model`` was loaded from (``from_pretrained`` records it), if any."""
    source = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None)
    return Path(source) if source and Path(source).is_dir() else None


def _write_checkpoint(model: PreTrainedModel, folder: Path, quantization_config: dict,
                      tokenizer: Any, recipe_text: str | None, extra_files: dict[str, str],
                      max_shard_size: str | int) -> None:
    """Write every file of the checkpoint into the new ``folder``, check it, add the
    manifest."""
    # the class's own save_pretrained: an instance one (ours, or llm-compressor's wrapper)
    # would recurse or rewrite quantization_config
    type(model).save_pretrained(model, folder, max_shard_size=max_shard_size)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config
    config.pop("auto_map", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                           encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe_text is not None:
        (folder / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    for name, text in extra_files.items():
        (folder / name).write_text(text, encoding="utf-8")
    check_checkpoint(folder)
    write_manifest(folder)


def save_starquant(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    *,
    args: StarQuantArgs | None = None,
    tokenizer: Any = None,
    recipe: str | os.PathLike | Any = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    extra_files: dict[str, str] | None = None,
    overwrite_option: str | None = "overwrite=True",
) -> Path:
    """Write a STaR-Quant checkpoint of ``model`` to ``out_dir`` atomically.

    Everything is checked before anything is written (the model is fully quantized with
    finite tensors, ``args``, the recipe, the output directory, free space), then written into
    a temporary sibling directory, checked on disk (config, every quantized linear's tensors,
    values in range), given a sha256 manifest (``starquant_manifest.json``) and renamed into
    place, so a failure leaves ``out_dir`` as it was. ``args`` defaults to the ones recorded on
    ``model.config``. An ``out_dir`` that is not empty is refused unless ``overwrite=True``,
    which replaces a checkpoint folder (one that holds other files is refused). The folder the
    model was loaded from (or one inside or above it) is always refused: replacing it would
    delete files the new checkpoint does not rewrite (its tokenizer, recipe, report), and a
    failed save would leave no copy; save to a new folder and move it. A symlinked ``out_dir``
    is written through. The folder is locked for the whole save, so a concurrent save to it is
    refused. The config's ``auto_map`` is dropped: the hub's remote code cannot load this
    checkpoint, only ``import starquant_plugin`` can. ``recipe``: a file, YAML text or
    Recipe, written as ``recipe.yaml``; by default the one the model ran, as oneshot recorded
    it (the file's own text when it was given a file), so this and ``model.save_pretrained``
    write the same file. ``extra_files``: ``{name: text}``
    written beside the checkpoint in the same atomic step (names from ``CHECKPOINT_FILES``
    that the save itself does not write, e.g. the run's report). ``overwrite_option``: how
    the caller's user spells ``overwrite`` in messages (``check_output_dir``).
    """
    check_usable(model)
    source = _loaded_from(model)
    check_output_dir(out_dir, overwrite, reading=source, overwrite_option=overwrite_option)
    args = args or args_of(model)
    if args is None:
        raise ValueError(
            "No StarQuantArgs given and none recorded on model.config; pass args= (the "
            "StarQuantArgs or modifier.starquant_args() the model was quantized with)."
        )
    if recipe is None:  # the recipe the model ran, as save_pretrained writes it
        recipe = getattr(model, _RECIPE, None)
    recipe_text = None if recipe is None else recipe_yaml(recipe)
    extra_files = dict(extra_files or {})
    written_by_save = {"config.json", "generation_config.json", "model.safetensors.index.json",
                       "recipe.yaml", MANIFEST_FILE}
    bad = [name for name in extra_files
           if name not in CHECKPOINT_FILES or name in written_by_save or "/" in name]
    if bad:
        raise ValueError(
            f"extra_files {bad} would be overwritten by the save or are not checkpoint files; "
            f"pass names from {sorted(set(CHECKPOINT_FILES) - written_by_save)}."
        )
    quantization_config = quantization_config_dict(model, args)
    with output_lock(out_dir) as target:
        # again, now that it is ours
        check_output_dir(out_dir, overwrite, reading=source, overwrite_option=overwrite_option)
        clean_interrupted_saves(target)
        check_free_space(out_dir, sum(module_tensor_bytes(model).values()) + SAVE_MARGIN_BYTES)
        tmp_dir = temporary_sibling(target)
        previous = getattr(model.config, "quantization_config", None)
        try:
            model.config.quantization_config = quantization_config
            _write_checkpoint(model, tmp_dir, quantization_config, tokenizer, recipe_text,
                              extra_files, max_shard_size)
            replace_dir(tmp_dir, target, overwrite)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        finally:
            model.config.quantization_config = (quantization_config if previous is None
                                                else previous)
    return Path(out_dir)


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
        save_starquant(model, save_directory, overwrite=overwrite,
                       max_shard_size=max_shard_size)


save_pretrained._overridden = True
"""llm-compressor's ``modify_save_pretrained`` leaves a method marked so alone."""


def bind_save_pretrained(model: PreTrainedModel, recipe: str | None = None) -> None:
    """Make ``model.save_pretrained`` (and llm-compressor's ``oneshot(output_dir=...)``) write
    a STaR-Quant checkpoint through ``save_starquant``; ``recipe``: YAML text saved beside it.
    Bound as a method so a deep copy of the model saves itself, not the original."""
    if recipe is not None:
        setattr(model, _RECIPE, recipe)
    model.save_pretrained = types.MethodType(save_pretrained, model)


def restore_interrupted_save(path: str | os.PathLike) -> Path:
    """Put back the checkpoint an overwrite of ``path`` that was killed between its two
    renames left under ``.<name>.old-*`` (the error of the next command that touches ``path``
    names this function). ``path`` must be missing: an existing one is the newer checkpoint,
    which the caller moves away first. Returns ``path``."""
    real = real_output_dir(path)
    with output_lock(real):
        olds = replace_backups(real)
        if not olds:
            raise FileNotFoundError(f"Nothing to restore: no .{real.name}.old-* folder beside "
                                    f"{real}.")
        if len(olds) > 1:
            raise FileExistsError(f"Several previous checkpoints of {path}: "
                                  f"{', '.join(map(str, olds))}; move the one you want to "
                                  f"{real} with mv.")
        if real.exists():
            raise FileExistsError(
                f"{path} exists (the checkpoint the interrupted save had put in place); move it "
                f"away first (`mv {real} {real}.new`) to restore {olds[0]}, or delete that "
                "folder to keep the current one.")
        os.rename(olds[0], real)
    logger.warning("Restored %s from %s.", path, olds[0])
    return Path(path)
