"""The STaR-Quant checkpoint: compressed-tensors' weights plus versioned STaR tensors.

``config.json`` carries::

    "quantization_config": {
      "quant_method": "starquant",          # a loader that does not know it must fail
      "format": "pack-quantized",           # compressed-tensors' keys, parsed by its own
      "config_groups": {"group_0": {...}},  #   QuantizationConfig (0.17 and 0.19)
      "ignore": ["model.transformer.ff_out"],
      "quantization_status": "compressed",
      "starquant": {"version": 2, "args": {...StarQuantArgs...}, "mask_token_id": 126336,
                    "family": "llada", "kv_bits": 4, "input_groups": [{"linears": [...],
                    "in_features": 4096, "exclusive_width": 64, "factors": [64, 64],
                    "tac_group_size": null}, ...], "tensors": {...}, "forward": "..."}
    }

and the safetensors hold, per quantized linear, compressed-tensors' tensors (``weight_packed``,
``weight_shape``, ``weight_scale`` for ``pack-quantized``; ``weight`` int8 and ``weight_scale``
for ``int-quantized``), and per input group the STaR tensors of ``STAR_TENSORS`` under
``<first linear>.input_transform.``. ``docs/format.md`` is the long form.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

from starquant_plugin.config import QUANT_METHOD, StarQuantArgs
from starquant_plugin.method.quantizers import scheme_args
from starquant_plugin.method.runtime import StarQuantLinear, weight_format, weight_scheme
from starquant_plugin.models.families import family_of, mask_token_id

FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (2,)
"""Version 1 (pre-release) stored a dense ``[in, in]`` transform per linear; it is not read."""

TRANSFORM = "input_transform"
"""Submodule of a group's first linear that holds the group's STaR tensors."""

STAR_TENSORS: dict[str, str] = {
    "sgat_exclusive": "[in, 2k] float: V = [U_m | U_u], orthonormal state-exclusive directions "
                      "(absent when k = 0)",
    "sgat_channel_scale": "[in] float: c of M = diag(c) (L (x) R)",
    "sgat_left": "[n1, n1] float: L",
    "sgat_right": "[n2, n2] float: R (n1 * n2 = in)",
    "sgat_act_clip": "[2] float: per-state activation clip ratio, row 0 unmasked, 1 [MASK]",
    "tac_matrices": "[in / g, g, g] float: TAC block-diagonal map on the input (groups with "
                    "a tac_group_size)",
    "tac_bias": "[in] float: TAC bias (groups with a tac_group_size)",
}
"""Per group of linears sharing an input, the tensors under ``<first linear>.input_transform.``"""

FORWARD = (
    "x_s = (TAC(x) - ((TAC(x) @ V) * drop[s]) @ V^T) * c, reshaped [n1, n2] -> L^T x_s R; "
    "y = Q_a(x_s, clip=sgat_act_clip[s]) @ W^T + bias for every linear of the group; "
    "s = (input_ids == mask_token_id) per token, drop[0] = 1 on U_m, drop[1] = 1 on U_u, "
    "W = compressed-tensors' decompressed weight, Q_a = the config group's input_activations "
    "quantizer (dynamic, per token)"
)

K_ROTATION = "hadamard"
"""``starquant.k_rotation`` when K is rotated before its quantizer: queries and keys of every
head, after RoPE, times the normalised Sylvester Hadamard ``H_hd / sqrt(hd)`` (no random signs;
``method.transforms.hadamard``); V's rotation is already folded into the weights. null: no
rotation."""

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def starquant_linears(model: nn.Module) -> dict[str, StarQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, StarQuantLinear)}


def input_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The quantized linears grouped by the input transform they share, each group led by the
    linear that owns it (and stores its tensors), with the shapes a loader needs."""
    linears = starquant_linears(model)
    groups: dict[int, dict[str, Any]] = {}
    for name, linear in linears.items():
        if linear.owns_transform:
            transform = linear.transform
            groups[id(transform)] = {
                "linears": [name],
                "in_features": transform.sgat_channel_scale.shape[0],
                "exclusive_width": transform.exclusive.shape[1] // 2,
                "factors": [transform.sgat_left.shape[0], transform.sgat_right.shape[0]],
                "tac_group_size": (None if transform.tac_matrices is None
                                   else transform.tac_matrices.shape[-1]),
            }
    for name, linear in linears.items():
        group = groups.get(id(linear.transform))
        if group is None:
            raise ValueError(
                f"{name} borrows an input transform no quantized linear of the model owns; "
                "build the group with quantize_linear_group so its first linear owns it."
            )
        if not linear.owns_transform:
            group["linears"].append(name)
    return list(groups.values())


def expected_tensors(groups: list[dict[str, Any]], weight_format_name: str) -> set[str]:
    """Every tensor name a v2 checkpoint must hold for its ``input_groups``."""
    weight_names = (("weight_packed", "weight_shape") if weight_format_name == "pack-quantized"
                    else ("weight",))
    names = set()
    for group in groups:
        owner = group["linears"][0]
        names |= {f"{m}.{n}" for m in group["linears"] for n in (*weight_names, "weight_scale")}
        star = ["sgat_channel_scale", "sgat_left", "sgat_right", "sgat_act_clip"]
        if group["exclusive_width"]:
            star.append("sgat_exclusive")
        if group["tac_group_size"] is not None:
            star += ["tac_matrices", "tac_bias"]
        names |= {f"{owner}.{TRANSFORM}.{n}" for n in star}
    return names


def quantization_config_dict(model: PreTrainedModel, args: StarQuantArgs) -> dict[str, Any]:
    """The ``quantization_config`` entry of a STaR-Quant model's config.json.

    Raises if the model holds no quantized linear, or linears not stored as integer codes or
    not under ``args.scheme``.
    """
    family = family_of(model)
    linears = starquant_linears(model)
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no StarQuantLinear; quantize it first "
            "(quantize_dllm or oneshot with STaRQuantModifier), then save."
        )
    weight_args, act_args = scheme_args(args.scheme)
    for name, linear in linears.items():
        if linear.weight_args is None:
            raise ValueError(
                f"{name} stores a dense float weight (built without weight_args); build it "
                "with quantize_linear_group (or weight_args/weight_scale) to save it."
            )
        if linear.weight_args != weight_args or linear.act_args != act_args:
            raise ValueError(
                f"{name} is quantized with weights {linear.weight_args} and activations "
                f"{linear.act_args}, but args.scheme={args.scheme!r} means {weight_args} and "
                f"{act_args}; pass the StarQuantArgs the model was quantized with."
            )
    scheme = weight_scheme(weight_args, act_args)
    ignore = sorted(name for name, module in model.named_modules()
                    if isinstance(module, nn.Linear))
    quantization_config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=scheme.format, ignore=ignore,
        quantization_status="compressed",
    ).model_dump(mode="json", exclude={"quant_method"})
    return {
        "quant_method": QUANT_METHOD,
        **quantization_config,
        "starquant": {
            "version": FORMAT_VERSION,
            "args": args.model_dump(mode="json"),
            "family": family.name,
            "mask_token_id": mask_token_id(model),
            "kv_bits": args.resolved_kv_bits,
            "k_rotation": K_ROTATION if args.resolved_kv_rotation else None,
            "input_groups": input_groups(model),
            "tensors": dict(STAR_TENSORS),
            "forward": FORWARD,
        },
    }


def attach_quantization_config(model: PreTrainedModel, args: StarQuantArgs) -> None:
    """Put the STaR-Quant ``quantization_config`` on ``model.config`` so any
    ``save_pretrained`` (including llm-compressor's wrapped one after ``oneshot``) writes a
    loadable checkpoint."""
    model.config.quantization_config = quantization_config_dict(model, args)


def args_of(model: PreTrainedModel) -> StarQuantArgs | None:
    """The ``StarQuantArgs`` recorded on ``model.config`` (by a load or
    ``attach_quantization_config``), or None."""
    config = getattr(model.config, "quantization_config", None)
    if config is not None and not isinstance(config, dict):
        config = config.to_dict()
    if not config or config.get("quant_method") != QUANT_METHOD:
        return None
    return StarQuantArgs(**config["starquant"]["args"])


def _holds_files(path: Path) -> bool:
    return path.exists() and any(path.iterdir())


def _write_recipe(recipe: str | os.PathLike | Any, path: Path) -> None:
    """``recipe``: a recipe.yaml path, YAML text, or an object with ``yaml()``
    (llm-compressor's ``Recipe``)."""
    if hasattr(recipe, "yaml"):
        text = recipe.yaml()
    elif isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and "\n" not in recipe
                                             and Path(recipe).is_file()):
        text = Path(recipe).read_text(encoding="utf-8")
    else:
        text = str(recipe)
    yaml.safe_load(text)  # refuse to write something that is not YAML
    path.write_text(text, encoding="utf-8")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an ``out_dir`` that ``save_starquant`` would refuse, e.g. before a long
    calibration: a file, or a directory that holds files (unless ``overwrite``)."""
    out_dir = Path(out_dir)
    if _holds_files(out_dir) and not overwrite:
        what = "a model" if any((out_dir / f).exists() for f in MODEL_FILES) else "files"
        raise FileExistsError(
            f"{out_dir} already holds {what}; nothing was written. Pass overwrite=True to "
            "replace it, or choose an empty or new directory."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file; pass a directory path to save into.")
    return out_dir


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

    Everything is written into a temporary sibling directory, checked (every quantized
    linear's tensors present in the shards), then renamed into place, so a failure leaves
    ``out_dir`` as it was. ``args`` defaults to the ones recorded on ``model.config``.
    An ``out_dir`` that is not empty is refused unless ``overwrite=True``.
    """
    out_dir = check_output_dir(out_dir, overwrite)
    args = args or args_of(model)
    if args is None:
        raise ValueError(
            "No StarQuantArgs given and none recorded on model.config; pass args= (the "
            "StarQuantArgs or modifier.starquant_args() the model was quantized with)."
        )
    quantization_config = quantization_config_dict(model, args)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    previous = getattr(model.config, "quantization_config", None)
    try:
        model.config.quantization_config = quantization_config
        # the class's own save_pretrained: llm-compressor's instance wrapper would re-infer
        # compressed-tensors formats and rewrite quantization_config
        type(model).save_pretrained(model, tmp_dir, max_shard_size=max_shard_size)
        config_path = tmp_dir / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["quantization_config"] = quantization_config
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        if recipe is not None:
            _write_recipe(recipe, tmp_dir / "recipe.yaml")
        check_checkpoint(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        if previous is None:
            model.config.quantization_config = quantization_config
        else:
            model.config.quantization_config = previous
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and only
    deleted once ``new`` is in place (restored if the rename fails)."""
    if not target.exists():
        os.replace(new, target)
        return
    backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# reading


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    """``quantization_config`` of the checkpoint at ``path``, checked (``validate_config``)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; pass the directory save_starquant wrote."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quantization_config = config.get("quantization_config")
    if not quantization_config:
        raise ValueError(f"{config_path} has no quantization_config; this is not a STaR-Quant "
                         "checkpoint (save it with save_starquant).")
    validate_config(quantization_config)
    return quantization_config


def validate_config(quantization_config: dict[str, Any]) -> tuple[StarQuantArgs,
                                                                   QuantizationConfig]:
    """Parse a ``quantization_config`` dict: its StarQuantArgs and compressed-tensors config.

    Raises on another quant_method, an unknown ``starquant.version`` or invalid fields.
    """
    method = quantization_config.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quant_method is {method!r}, expected {QUANT_METHOD!r}.")
    block = quantization_config.get("starquant")
    if not isinstance(block, dict) or "version" not in block:
        raise ValueError(
            "quantization_config has no 'starquant' block with a 'version'; the checkpoint is "
            "incomplete. Re-save it with starquant_plugin.save_starquant."
        )
    if block["version"] not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"Checkpoint starquant.version is {block['version']!r}, but this starquant_plugin "
            f"reads versions {list(SUPPORTED_VERSIONS)}; upgrade starquant_plugin "
            "(pip install -U starquant-plugin) to load a newer one, or re-quantize the model "
            "to replace a version-1 checkpoint."
        )
    args = StarQuantArgs(**block["args"])
    ct_config = QuantizationConfig.model_validate(
        {k: v for k, v in quantization_config.items() if k not in ("quant_method", "starquant")})
    if len(ct_config.config_groups) != 1:
        raise ValueError(
            f"quantization_config has {len(ct_config.config_groups)} config groups; STaR-Quant "
            "checkpoints have exactly one (all quantized linears share the scheme)."
        )
    if not isinstance(block.get("input_groups"), list):
        raise ValueError("starquant block has no 'input_groups' list; the checkpoint is "
                         "incomplete. Re-save it with starquant_plugin.save_starquant.")
    for name, scheme in ct_config.config_groups.items():
        if scheme.weights is None or scheme.input_activations is None:
            raise ValueError(f"config group {name!r} lacks weights or input_activations; "
                             "STaR-Quant checkpoints quantize both.")
        if scheme.format not in (None, weight_format(scheme.weights)):
            raise ValueError(
                f"config group {name!r} has format {scheme.format!r}, but "
                f"{scheme.weights.num_bits}-bit weights are stored as "
                f"{weight_format(scheme.weights)!r}."
            )
    return args, ct_config


def checkpoint_keys(files: list[str | os.PathLike]) -> set[str]:
    """Tensor names in the safetensors ``files``; a truncated or corrupt file raises."""
    keys: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys.update(handle.keys())
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ValueError(
                f"Cannot read {file}: {error}. The shard is truncated or corrupt; download "
                "or copy the checkpoint again (or re-save it with save_starquant)."
            ) from error
    return keys


def shard_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors shard; the checkpoint is "
                                "incomplete. Re-save or re-download it.")
    return files


def check_missing(expected: set[str], present: set[str], where: str) -> None:
    missing = sorted(expected - present)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise ValueError(
            f"{where} lacks {len(missing)} tensor(s) the STaR-Quant layers need: {shown}. "
            "The checkpoint is incomplete; re-save it with save_starquant or download it again."
        )


def check_checkpoint(path: str | os.PathLike) -> None:
    """Check a saved checkpoint on disk: config, readable shards, and every weight and STaR
    tensor of the ``starquant.input_groups``."""
    quantization_config = read_quantization_config(path)
    files = shard_files(path)
    keys = checkpoint_keys(files)
    if not any(key.endswith(".weight_scale") for key in keys):
        raise ValueError(f"{path} holds no quantized weights (no '*.weight_scale'); the "
                         "checkpoint is incomplete. Re-save it with save_starquant.")
    groups = quantization_config["starquant"]["input_groups"]
    check_missing(expected_tensors(groups, quantization_config["format"]), keys, str(path))


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1}


def checkpoint_tensor_bytes(path: str | os.PathLike) -> dict[str, int]:
    """``{tensor name: bytes}`` of a checkpoint's shards, from the safetensors headers."""
    sizes = {}
    for file in shard_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                sizes[key] = math.prod(tensor.get_shape()) * _SAFETENSORS_BYTES[tensor.get_dtype()]
    return sizes


def module_tensor_bytes(module: nn.Module) -> dict[str, int]:
    """``{tensor name: bytes}`` of a module's state dict, as a checkpoint of it would hold."""
    return {name: t.numel() * t.element_size() for name, t in module.state_dict().items()}


def bytes_by_part(sizes: dict[str, int], block_pattern: str) -> dict[str, int]:
    """Sum ``{tensor name: bytes}`` into ``whole`` (everything), ``blocks`` (transformer-block
    tensors matching ``block_pattern``, norms excluded: the quantized part) and ``star`` (the
    STaR tensors among them)."""
    parts = {"whole": 0, "blocks": 0, "star": 0}
    for name, nbytes in sizes.items():
        parts["whole"] += nbytes
        if re.match(block_pattern, name) and "norm" not in name:
            parts["blocks"] += nbytes
            parts["star"] += nbytes if f".{TRANSFORM}." in name else 0
    return parts


def recipe_text(path: str | os.PathLike) -> str | None:
    recipe = Path(path) / "recipe.yaml"
    return recipe.read_text(encoding="utf-8") if recipe.is_file() else None
