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

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from compressed_tensors.quantization import QuantizationConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

from starquant_plugin.config import QUANT_METHOD, StarQuantArgs
from starquant_plugin.integrations.checkpoint_tensors import check_tensor_values
from starquant_plugin.method.quantizers import scheme_args
from starquant_plugin.method.runtime import (
    StarQuantLinear,
    weight_format,
    weight_scheme,
)
from starquant_plugin.models.families import FAMILIES, family_of, mask_token_id
from starquant_plugin.models.loading import read_json_object

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
    "sgat_act_global_scale": "[1] float: NVFP4 only, the activations' static global scale g "
                             "(block scale e4m3(g * max / 6), codes x / (scale / g))",
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
    check_tensor_values(model, type(model).__name__)
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
    config = read_json_object(config_path, _RESTORE)
    quantization_config = config.get("quantization_config")
    if not isinstance(quantization_config, dict) or not quantization_config:
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
    block = {**block, "args": _with_historic_defaults(block.get("args"))}
    try:
        parsed = StarQuantBlock.model_validate(block)
    except ValidationError as error:
        raise ValueError(
            f"quantization_config.starquant is incomplete or invalid ({_problems(error)}); the "
            "checkpoint's config.json was edited or cut short. Restore it from the original "
            "save, or re-save the quantized model with save_starquant."
        ) from error
    try:
        ct_config = QuantizationConfig.model_validate(
            {k: v for k, v in quantization_config.items()
             if k not in ("quant_method", "starquant")})
    except ValidationError as error:
        raise ValueError(
            f"quantization_config's compressed-tensors part is invalid ({_problems(error)}); "
            "the checkpoint's config.json was edited or cut short. Restore it from the "
            "original save, or re-save the quantized model with save_starquant."
        ) from error
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
    check_consistency(parsed, ct_config)
    return parsed, ct_config


HISTORIC_DEFAULTS = {"kv_rotation": False, "k_smoothing": 0.0, "tac_shrinkage": 0.2,
                     "init_scale": "ones"}
"""What a checkpoint meant by a ``starquant.args`` field it does not record: it was written
before the field existed (or before its default changed), with these values."""


def _with_historic_defaults(args: Any) -> Any:
    return {**HISTORIC_DEFAULTS, **args} if isinstance(args, dict) else args


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])


def _quantizer(args: Any) -> str:
    """What a ``QuantizationArgs`` computes, in words (the fields that change the numbers)."""
    group = f" of {args.group_size}" if args.group_size else ""
    return (f"{args.num_bits}-bit {args.type} {'' if args.symmetric else 'a'}symmetric per "
            f"{args.strategy}{group}{' dynamic' if args.dynamic else ''}")


def check_consistency(block: StarQuantBlock, ct_config: QuantizationConfig) -> None:
    """Refuse a config whose parts disagree: each part is valid on its own, but the runtime
    reads some of them and the card others, so a disagreement computes or claims the wrong
    thing. ``args`` is the reference; every error names the field and the fix."""
    args = block.args
    problems = []
    if block.family not in {family.name for family in FAMILIES.values()}:
        problems.append(f"family is {block.family!r}, not one of "
                        f"{sorted(f.name for f in FAMILIES.values())}")
    if block.kv_bits != args.resolved_kv_bits:
        problems.append(f"kv_bits is {block.kv_bits} but args (scheme {args.scheme}, kv_bits "
                        f"{args.kv_bits}) mean {args.resolved_kv_bits}")
    k_rotation = K_ROTATION if args.resolved_kv_rotation else None
    if block.k_rotation != k_rotation:
        problems.append(f"k_rotation is {block.k_rotation!r} but args (kv_rotation "
                        f"{args.kv_rotation}, K/V at {args.resolved_kv_bits} bit) mean "
                        f"{k_rotation!r}")
    (scheme,) = ct_config.config_groups.values()
    stored_as = weight_format(scheme.weights)
    if ct_config.format not in (None, stored_as):
        problems.append(f"format is {ct_config.format!r} but the config group's "
                        f"{scheme.weights.num_bits}-bit weights are stored as {stored_as!r}")
    weight_args, act_args = scheme_args(args.scheme)
    for part, got, expected in (("weights", scheme.weights, weight_args),
                                ("input_activations", scheme.input_activations, act_args)):
        if _quantizer(got) != _quantizer(expected):
            problems.append(f"config_groups {part} are {_quantizer(got)} but args.scheme "
                            f"{args.scheme} quantizes them as {_quantizer(expected)}")
    listed = [name for group in block.input_groups for name in group.linears]
    if len(listed) != len(set(listed)):
        problems.append("a linear is listed in two input_groups")
    family = next((f for f in FAMILIES.values() if f.name == block.family), None)
    foreign = [name for name in listed
               if family is not None and not re.match(family.block_pattern, name)]
    if foreign:
        problems.append(f"family is {block.family!r} but input_groups list {foreign[0]}, "
                        "which is not one of its decoder-block linears")
    for group in block.input_groups:
        d, first = group.in_features, group.linears[0]
        reads_attention = family is not None and first.endswith(f".{family.attention_output}")
        if not foreign and (group.tac_group_size is not None) != (args.tac and reads_attention):
            problems.append(f"input group {first} has tac_group_size {group.tac_group_size}, "
                            "but TAC sits on the attention output projection only, when args "
                            f"have tac (tac is {args.tac})")
        if group.exclusive_width != args.exclusive_width(d):
            problems.append(f"input group {first} has exclusive_width {group.exclusive_width} "
                            f"but args mean {args.exclusive_width(d)} for {d} inputs")
        if tuple(group.factors) != args.factors(d):
            problems.append(f"input group {first} has factors {list(group.factors)} but args "
                            f"mean {list(args.factors(d))} for {d} inputs")
        if group.tac_group_size is not None and (
                not args.tac or group.tac_group_size != args.tac_group_size
                or d % group.tac_group_size):
            problems.append(f"input group {first} has tac_group_size {group.tac_group_size} "
                            f"but args have tac {args.tac}, tac_group_size "
                            f"{args.tac_group_size} (and it must divide {d})")
    if problems:
        raise ValueError(
            f"quantization_config contradicts itself: {'; '.join(problems[:3])}"
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            + ". The checkpoint's config.json was edited; restore it from the original save or "
            "re-save the quantized model with save_starquant."
        )


_RESTORE = "restore it from the original save, or re-save the checkpoint."


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors shards of a checkpoint folder: those its index names, or every
    ``*.safetensors`` in it."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, _RESTORE).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor -> shard names; restore it "
                             "from the original save, or re-save the checkpoint.")
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors shard; the checkpoint is "
                                "incomplete. Re-save or re-download it.")
    return files


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}


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
