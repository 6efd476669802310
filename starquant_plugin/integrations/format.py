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
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from compressed_tensors.quantization import QuantizationConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

from starquant_plugin.config import QUANT_METHOD, StarQuantArgs
from starquant_plugin.method.quantizers import scheme_args
from starquant_plugin.method.runtime import (
    StarQuantInputTransform,
    StarQuantLinear,
    weight_format,
    weight_scheme,
)
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


class InputGroup(BaseModel):
    """One entry of ``starquant.input_groups``: linears reading one input, led by the one that
    stores the group's STaR tensors, with the shapes a loader needs to build empty modules."""

    model_config = ConfigDict(extra="forbid")

    linears: list[str] = Field(min_length=1)
    in_features: int = Field(gt=0)
    exclusive_width: int = Field(ge=0)
    factors: tuple[int, int]
    tac_group_size: int | None = Field(None, gt=0)


class StarQuantBlock(BaseModel):
    """The versioned ``starquant`` block of ``quantization_config``: the one schema writers
    produce and loaders (transformers, vLLM) parse, so a missing or misspelt field is an error
    that names it."""

    model_config = ConfigDict(extra="forbid")

    version: int
    args: StarQuantArgs
    family: str
    mask_token_id: int = Field(ge=0)
    kv_bits: int
    k_rotation: Literal["hadamard"] | None = Field(
        None, description="K_ROTATION when queries and keys are rotated per head before the "
        "K/V quantizer; None (and absent, in checkpoints older than the option): no rotation")
    input_groups: list[InputGroup] = Field(min_length=1)
    tensors: dict[str, str] = Field(default_factory=dict)
    forward: str = ""


def starquant_linears(model: nn.Module) -> dict[str, StarQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, StarQuantLinear)}


def input_groups(model: nn.Module) -> list[InputGroup]:
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
    return [InputGroup(**group) for group in groups.values()]


def star_tensor_names(group: InputGroup) -> list[str]:
    """The STaR tensors a group stores, under ``<first linear>.input_transform.``."""
    star = ["sgat_channel_scale", "sgat_left", "sgat_right", "sgat_act_clip"]
    if group.exclusive_width:
        star.append("sgat_exclusive")
    if group.tac_group_size is not None:
        star += ["tac_matrices", "tac_bias"]
    return [f"{group.linears[0]}.{TRANSFORM}.{name}" for name in star]


def expected_tensors(groups: list[InputGroup], weight_format_name: str) -> set[str]:
    """Every tensor name a v2 checkpoint must hold for its ``input_groups``."""
    weight_names = (("weight_packed", "weight_shape") if weight_format_name == "pack-quantized"
                    else ("weight",))
    names = set()
    for group in groups:
        names |= {f"{m}.{n}" for m in group.linears for n in (*weight_names, "weight_scale")}
        names |= set(star_tensor_names(group))
    return names


def nonfinite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [name for name, tensor in named_tensors
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse NaN/inf scales or STaR tensors: a checkpoint holding them computes NaN."""
    bad = nonfinite(named_tensors)
    if bad:
        raise ValueError(
            f"{where} has {len(bad)} tensor(s) with NaN or inf values, e.g. {bad[:3]}; the model "
            "would compute NaN. Re-quantize from the FP model on finite calibration data "
            "(a fit that diverged or non-finite activations produce this)."
        )


def quantized_buffers(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every buffer of the STaR-Quant modules (scales, STaR tensors)."""
    for name, module in model.named_modules():
        if isinstance(module, (StarQuantLinear, StarQuantInputTransform)):
            for buffer_name, tensor in module.named_buffers(recurse=False):
                yield f"{name}.{buffer_name}", tensor


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
    check_finite(quantized_buffers(model), type(model).__name__)
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
        "starquant": StarQuantBlock(
            version=FORMAT_VERSION, args=args, family=family.name,
            mask_token_id=mask_token_id(model), kv_bits=args.resolved_kv_bits,
            k_rotation=K_ROTATION if args.resolved_kv_rotation else None,
            input_groups=input_groups(model), tensors=dict(STAR_TENSORS), forward=FORWARD,
        ).model_dump(mode="json"),
    }


def attach_quantization_config(model: PreTrainedModel, args: StarQuantArgs) -> None:
    """Put the STaR-Quant ``quantization_config`` on ``model.config``, where the savers
    (``integrations.saving``) and ``args_of`` find it."""
    model.config.quantization_config = quantization_config_dict(model, args)


def args_of(model: PreTrainedModel) -> StarQuantArgs | None:
    """The ``StarQuantArgs`` recorded on ``model.config`` (by a load or
    ``attach_quantization_config``), or None."""
    config = getattr(model.config, "quantization_config", None)
    if config is not None and not isinstance(config, dict):
        config = config.to_dict()
    if not config or config.get("quant_method") != QUANT_METHOD:
        return None
    return validate_config(config)[0].args


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


def validate_config(quantization_config: dict[str, Any]) -> tuple[StarQuantBlock,
                                                                   QuantizationConfig]:
    """Parse a ``quantization_config`` dict: its ``starquant`` block and compressed-tensors
    config.

    Raises on another quant_method, an unknown ``starquant.version``, a missing or invalid
    field of the block, or a compressed-tensors config STaR-Quant does not write.
    """
    method = quantization_config.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quant_method is {method!r}, expected {QUANT_METHOD!r}.")
    block = quantization_config.get("starquant")
    if not isinstance(block, dict) or "version" not in block:
        raise ValueError(
            "quantization_config has no 'starquant' block with a 'version'; the checkpoint is "
            "incomplete. Re-save it with save_starquant from the quantized model."
        )
    if block["version"] not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"Checkpoint starquant.version is {block['version']!r}, but this starquant_plugin "
            f"reads versions {list(SUPPORTED_VERSIONS)}; upgrade starquant_plugin "
            "(pip install -U starquant-plugin) to load a newer one, or re-quantize the model "
            "to replace a version-1 checkpoint."
        )
    try:
        parsed = StarQuantBlock.model_validate(block)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in error.errors()[:5])
        raise ValueError(
            f"quantization_config.starquant is incomplete or invalid ({problems}); the "
            "checkpoint's config.json was edited or cut short. Restore it from the original "
            "save, or re-save the quantized model with save_starquant."
        ) from error
    ct_config = QuantizationConfig.model_validate(
        {k: v for k, v in quantization_config.items() if k not in ("quant_method", "starquant")})
    if len(ct_config.config_groups) != 1:
        raise ValueError(
            f"quantization_config has {len(ct_config.config_groups)} config groups; STaR-Quant "
            "checkpoints have exactly one (all quantized linears share the scheme)."
        )
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
    return parsed, ct_config


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


def checkpoint_tensors(files: list[Path], names: set[str]) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for the tensors called ``names`` in the safetensors ``files``."""
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in names.intersection(handle.keys()):
                yield key, handle.get_tensor(key)


def check_checkpoint(path: str | os.PathLike) -> None:
    """Check a saved checkpoint on disk: config, readable shards, every weight and STaR
    tensor of the ``starquant.input_groups``, and finite scales and STaR tensors."""
    block, ct_config = validate_config(read_quantization_config(path))
    files = shard_files(path)
    keys = checkpoint_keys(files)
    if not any(key.endswith(".weight_scale") for key in keys):
        raise ValueError(f"{path} holds no quantized weights (no '*.weight_scale'); the "
                         "checkpoint is incomplete. Re-save it with save_starquant.")
    expected = expected_tensors(block.input_groups, ct_config.format)
    check_missing(expected, keys, str(path))
    float_names = {name for name in expected if name.endswith("weight_scale")
                   or f".{TRANSFORM}." in name}
    check_finite(checkpoint_tensors(files, float_names), str(path))


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
