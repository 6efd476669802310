"""Every tensor of a STaR-Quant checkpoint checked against what the architecture expects.

transformers switches off its own shape check for every tensor once a quantizer loads a model
(``core_model_loading.set_param_for_module`` compares shapes only without one) and only warns
about missing or unexpected keys, so a checkpoint with an LM head cut in half, a missing
embedding or a NaN in a norm would load and compute garbage. Both loaders therefore check the
whole checkpoint here, quantized and non-quantized tensors alike:

* ``tensor_specs``: name -> shape and dtype of every tensor the model, built with its
  STaR-Quant modules (on the meta device is enough), expects; float tensors in the dtype the
  checkpoint's config.json names (``dtype``);
* ``check_headers``: before any data is read, the safetensors headers against the specs
  (missing, unexpected, wrong shape, wrong dtype); the transformers loader calls it;
* ``TensorChecker``: the same per tensor as it streams, plus its values (``value_problem``),
  and what never came at the end; the vLLM plugin wraps its weight iterator with it;
* ``check_tensor_values``: NaN/inf, or values outside ``VALUE_RANGES``, in any float tensor
  of a model in memory.

The specs of a checkpoint come from ``checkpoint_model.checkpoint_specs``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}

_CODE_DTYPES = (torch.float8_e4m3fn,)
"""Float dtypes that hold quantization codes (FP8 weights): stored as they are, whatever
float dtype the checkpoint's other tensors have."""


@dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor must be; ``dtype`` None: any float dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None


def checkpoint_float_dtype(checkpoint_dir: str | Path) -> torch.dtype | None:
    """The float dtype the checkpoint's config.json names (``dtype``, or the older
    ``torch_dtype``), None if it names none."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def tensor_specs(model: nn.Module, float_dtype: torch.dtype | None) -> dict[str, TensorSpec]:
    """Name -> spec of every tensor a checkpoint of ``model`` holds (its state dict, tied
    copies left out); float tensors in ``float_dtype`` (None: whatever float dtype)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {name: TensorSpec(tuple(tensor.shape), float_dtype if _is_model_float(tensor)
                             else tensor.dtype)
            for name, tensor in model.state_dict().items() if name not in tied}


def _is_model_float(tensor: torch.Tensor) -> bool:
    """A float tensor in the model's float dtype (not FP8 codes)."""
    return tensor.is_floating_point() and tensor.dtype not in _CODE_DTYPES


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "a float dtype" if dtype is None else str(dtype).removeprefix("torch.")


def _matches(spec: TensorSpec, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """What is wrong with a tensor of ``shape`` and ``dtype`` against ``spec`` (None: fine)."""
    if shape != spec.shape:
        return f"shape {list(shape)}, expected {list(spec.shape)}"
    if dtype != spec.dtype and not (spec.dtype is None and dtype.is_floating_point
                                    and dtype not in _CODE_DTYPES):
        return f"dtype {_dtype_name(dtype)}, expected {_dtype_name(spec.dtype)}"
    return None


class CheckpointTensorError(ValueError):
    """The checkpoint's tensors do not fit the model; the message lists what and the fix."""


def raise_misfit(problems: list[str], where: str) -> None:
    """One error naming up to five ``problems`` of the checkpoint read as ``where``."""
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise CheckpointTensorError(
            f"{where} does not fit the model its config.json describes: {shown}. The "
            "checkpoint was edited, cut short or mixed with another one; download or copy it "
            "again, or re-save the quantized model with save_starquant."
        )


def _missing_and_unexpected(specs: dict[str, TensorSpec], present: Iterable[str]
                            ) -> list[str]:
    present = set(present)
    problems = [f"{name} is missing" for name in sorted(set(specs) - present)]
    problems += [f"{name} is not a tensor of this model" for name in sorted(present - set(specs))]
    return problems


def check_headers(specs: dict[str, TensorSpec], files: Iterable[str | Path], where: str
                  ) -> None:
    """Check the safetensors ``files`` against ``specs`` from their headers alone (no tensor
    data is read): every tensor present, none unexpected, shapes and dtypes as specified."""
    found: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    header = handle.get_slice(name)
                    found[name] = (tuple(header.get_shape()),
                                   _SAFETENSORS_DTYPES.get(header.get_dtype(), torch.uint8))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointTensorError(
                f"Cannot read {file}: {error}. The shard is truncated or corrupt; download or "
                "copy the checkpoint again (or re-save it with save_starquant)."
            ) from error
    problems = _missing_and_unexpected(specs, found)
    for name, (shape, dtype) in found.items():
        if name in specs and (wrong := _matches(specs[name], shape, dtype)):
            problems.append(f"{name} has {wrong}")
    raise_misfit(problems, where)


VALUE_RANGES: dict[str, tuple[float, float]] = {
    "weight_scale": (0.0, math.inf), "sgat_channel_scale": (0.0, math.inf),
    "sgat_act_clip": (0.0, 1.0), "weight_global_scale": (0.0, math.inf),
    "sgat_act_global_scale": (0.0, math.inf)}
"""Bounds ``(low, high]`` of the tensors whose values the method fixes, by the name's last
part: quantization scales (NVFP4's global scales too) are ``max / qmax`` clamped above 0,
``c = exp(log c)``, clip ratios are sigmoids. A finite value outside them (a zeroed scale or
clip) loads and computes garbage without a NaN to show it."""


def value_problem(name: str, tensor: torch.Tensor) -> str | None:
    """What is wrong with ``tensor``'s values (NaN/inf anywhere, or outside ``VALUE_RANGES``),
    None if nothing. Read from its extremes: min and max propagate NaN, and on CPU ``aminmax``
    takes about a tenth of ``isfinite(t).all()``'s time on bf16 (``benchmarks/load_cost.py``)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    if tensor.dtype in _CODE_DTYPES:  # no aminmax kernel for FP8; e4m3 has NaN, no inf
        tensor = tensor.float()
    low, high = (value.item() for value in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        return "holds NaN or inf"
    bounds = VALUE_RANGES.get(name.rsplit(".", 1)[-1])
    if bounds and not bounds[0] < low <= high <= bounds[1]:
        return (f"holds values in [{low:.3g}, {high:.3g}], outside the ({bounds[0]:g}, "
                f"{bounds[1]:g}] it can have")
    return None


class TensorChecker:
    """Check tensors against ``specs`` as they stream by (``stream``), then what never came
    (``finish``): for loaders that read each tensor once and cannot look at headers first."""

    def __init__(self, specs: dict[str, TensorSpec], where: str) -> None:
        self.specs, self.where = specs, where
        self.seen: set[str] = set()

    def stream(self, tensors: Iterable[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            problems = []
            if name not in self.specs:
                problems.append(f"{name} is not a tensor of this model")
            elif wrong := _matches(self.specs[name], tuple(tensor.shape), tensor.dtype):
                problems.append(f"{name} has {wrong}")
            elif problem := value_problem(name, tensor):
                problems.append(f"{name} {problem}")
            raise_misfit(problems, self.where)
            self.seen.add(name)
            yield name, tensor

    def finish(self) -> None:
        raise_misfit(_missing_and_unexpected(self.specs, self.seen), self.where)


def check_tensor_values(model: nn.Module, where: str) -> None:
    """Refuse NaN/inf in any float parameter or buffer of a loaded ``model`` (one of them makes
    every output NaN, or worse, only some) and values outside ``VALUE_RANGES``."""
    problems = [f"{name} {problem}" for name, tensor in (*model.named_parameters(),
                                                          *model.named_buffers())
                if (problem := value_problem(name, tensor.detach()))]
    if problems:
        raise CheckpointTensorError(
            f"{where} has {len(problems)} tensor(s) that no quantized model holds: "
            f"{'; '.join(problems[:3])}; the model would compute NaN or garbage. Download or "
            "copy the checkpoint again, or re-quantize from the FP model."
        )
