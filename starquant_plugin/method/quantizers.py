"""Fake quantizers (quantize -> dequantize) whose grid matches a real INT or FP8 kernel.

Quantizers are described by compressed-tensors' ``QuantizationArgs`` so the same object that
configures calibration is written into the checkpoint. Integer semantics:

* symmetric ``b`` bits: codes in ``[-2^(b-1), 2^(b-1) - 1]``, ``scale = max|x| / (2^(b-1) - 1)``
  (int4: [-8, 7], /7; int8: [-128, 127], /127);
* asymmetric ``b`` bits: codes in ``[0, 2^b - 1]``, ``scale = (max - min) / (2^b - 1)`` with the
  range widened to contain 0 and an integer zero point (compressed-tensors' convention).

FP8 (``type="float"``, 8 bits): e4m3 codes (``torch.float8_e4m3fn``, largest 448), symmetric,
``scale = max|x| / 448``, ``x / scale`` clamped to +-448 and cast with round-to-nearest-even:
compressed-tensors' ``calculate_qparams`` and ``quantize`` for float args, so a stored weight
is the same bytes whichever of the two computed it.

MXFP4 (``type="float"``, 4 bits, ``strategy="group"``, ``group_size=32``, uint8 scales): e2m1
codes (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives) times one power-of-two scale per 32
consecutive input channels, ``2^(floor(log2(p)) - 2)`` with ``p`` the group's ``max|x|`` rounded
to a power of two as compressed-tensors does (up from 1.75 x 2^e), so the largest value maps
near 4-6 and saturates at 6; weights and activations (per token) alike.

NVFP4 (``type="float"``, 4 bits, ``strategy="tensor_group"``, ``group_size=16``): e2m1 codes
times ``s / g`` per 16 consecutive input channels, ``s = e4m3(g * max|x| / 6)`` an FP8 block
scale and ``g = 448 * 6 / max|X|`` one float global scale per tensor that keeps the block
scales inside e4m3's range (compressed-tensors' ``generate_gparam`` and ``calculate_qparams``).
A weight's ``g`` comes from the weight (one per fused q/k/v or gate/up group, as vLLM loads
them); an activation's is static, calibrated on the transformed calibration inputs
(``nvfp4_global_scale``), and taken from the tensor itself where none is given (the fit).

Rounding uses a straight-through estimator everywhere, so every fake quantizer here can sit
inside a gradient fit (SGAT) and pass gradients to its input and to a learnable clip ratio.

>>> x = torch.tensor([[-7.0, -1.0, 0.0, 7.0]])  # scale = max|x| / 7 = 1
>>> torch.equal(fake_quantize_weight(x, scheme_args("W4A8")[0]), x)
True
"""

from __future__ import annotations

import functools

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import generate_gparam

DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(11))
"""Clip ratios tried by ``search_weight_clip``: 1.0, 0.95, ..., 0.5."""

_MIN_SCALE = 1e-8


def _weight_args(num_bits: int) -> QuantizationArgs:
    return QuantizationArgs(num_bits=num_bits, type="int", symmetric=True, strategy="channel")


def _act_args(num_bits: int) -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=num_bits, type="int", symmetric=True, strategy="token", dynamic=True
    )


def _fp8_weight_args() -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")


def _fp8_act_args() -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True
    )


def _mxfp4_args(dynamic: bool) -> QuantizationArgs:
    return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="group",
                            group_size=32, dynamic=dynamic, scale_dtype=torch.uint8,
                            zp_dtype=torch.uint8)


def _nvfp4_args(dynamic: bool | str) -> QuantizationArgs:
    return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                            group_size=16, dynamic=dynamic, scale_dtype=torch.float8_e4m3fn,
                            zp_dtype=torch.float8_e4m3fn)


SCHEMES: dict[str, tuple[QuantizationArgs, QuantizationArgs]] = {
    "W4A4": (_weight_args(4), _act_args(4)),
    "W4A8": (_weight_args(4), _act_args(8)),
    "W8A8": (_weight_args(8), _act_args(8)),
    "W8A8-FP8": (_fp8_weight_args(), _fp8_act_args()),
    "W4A8-FP8": (_weight_args(4), _fp8_act_args()),
    "W4A4-MXFP4": (_mxfp4_args(dynamic=False), _mxfp4_args(dynamic=True)),
    "W4A4-NVFP4": (_nvfp4_args(dynamic=False), _nvfp4_args(dynamic="local")),
}
"""Preset (weight args, activation args): weights per output channel, activations per token
(dynamic); int, or FP8 e4m3 where the name says so (compressed-tensors' ``FP8_DYNAMIC``
preset for W8A8-FP8; int4 weights with it for W4A8-FP8); MXFP4 and NVFP4 (compressed-tensors'
``MXFP4`` and ``NVFP4`` presets) per group of 32 or 16 input channels for weights and
activations (NVFP4 activations: dynamic block scales under a static global scale).
``config.SchemeName`` lists the names for the schema and the CLI."""


def scheme_args(name: str) -> tuple[QuantizationArgs, QuantizationArgs]:
    """Return fresh copies of the (weight args, activation args) preset called ``name``."""
    if name not in SCHEMES:
        raise ValueError(
            f"Unknown quantization scheme {name!r}; expected one of {sorted(SCHEMES)}. "
            "Pick one of these names or build QuantizationArgs yourself."
        )
    weight_args, act_args = SCHEMES[name]
    return weight_args.model_copy(deep=True), act_args.model_copy(deep=True)


_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_FP8).max  # 448
_FP4_MAX = 6.0  # e2m1
_MX_GROUP = 32
_NV_GROUP = 16
_FP8_EPS = 0.125  # compressed-tensors' stand-in for a zero e4m3 block scale


def _check_int(args: QuantizationArgs, what: str) -> None:
    if args.type != "int":
        raise ValueError(
            f"Got QuantizationArgs(type={args.type!r}) for {what}, which works on integer "
            "grids only. Use an int scheme (W4A4, W4A8, W8A8) for it."
        )


def _check_args(args: QuantizationArgs) -> None:
    """Args this module fake-quantizes: int of any width, symmetric FP8, MXFP4 or NVFP4."""
    if args.type == "int" or is_fp8(args) or is_fp4(args):
        return
    raise ValueError(
        f"Got QuantizationArgs(type={args.type!r}, num_bits={args.num_bits}, "
        f"symmetric={args.symmetric}, strategy={args.strategy!r}, "
        f"group_size={args.group_size}); starquant fake-quantizes int, symmetric 8-bit float "
        "(FP8 e4m3), MXFP4 (4-bit float, strategy 'group', group_size 32, uint8 scales) and "
        "NVFP4 (4-bit float, strategy 'tensor_group', group_size 16). "
        "Use one of the presets " + ", ".join(SCHEMES) + "."
    )


def is_float(args: QuantizationArgs | None) -> bool:
    """Whether ``args`` quantize to a float format (FP8 or FP4; else int, or None)."""
    return args is not None and args.type == "float"


def is_fp8(args: QuantizationArgs | None) -> bool:
    """Whether ``args`` quantize to FP8 e4m3."""
    return is_float(args) and args.num_bits == 8 and args.symmetric


def is_mxfp4(args: QuantizationArgs | None) -> bool:
    """Whether ``args`` quantize to MXFP4: e2m1 codes, one power-of-two scale per 32."""
    return (is_float(args) and args.num_bits == 4 and args.symmetric
            and args.strategy == "group" and args.group_size == _MX_GROUP
            and args.scale_dtype == torch.uint8)


def is_nvfp4(args: QuantizationArgs | None) -> bool:
    """Whether ``args`` quantize to NVFP4: e2m1 codes, an e4m3 scale per 16 under a global."""
    return (is_float(args) and args.num_bits == 4 and args.symmetric
            and args.strategy == "tensor_group" and args.group_size == _NV_GROUP)


def is_fp4(args: QuantizationArgs | None) -> bool:
    """Whether ``args`` quantize to a 4-bit float format with block scales (MX or NV)."""
    return is_mxfp4(args) or is_nvfp4(args)


def _int_range(num_bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` of a real kernel."""
    if symmetric:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    return 0, 2**num_bits - 1


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass. Without a graph it is
    ``torch.round``, one pass instead of three: ``v + (round(v) - v)`` is ``round(v)`` exactly
    (the difference is exact, and so is a sum whose exact value is representable)."""
    if not (v.requires_grad and torch.is_grad_enabled()):
        return torch.round(v)
    return v + (torch.round(v) - v).detach()


def _grid_max(args: QuantizationArgs) -> float:
    """The largest code of a symmetric grid: ``2^(b-1) - 1`` for int, 448 for FP8 e4m3 (MX
    scales are powers of two instead: ``mx_scale``)."""
    return _FP8_MAX if is_fp8(args) else float(_int_range(args.num_bits, symmetric=True)[1])


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` along the last dim, ``[..., 1]``: as ``max(max x, -min x)``, two reads of
    ``x`` and no ``|x|`` temporary (a third less time than ``x.abs().amax()`` on a
    ``[128, 12288]`` float32 chunk, issue 23); the same value, and the same gradient (split
    evenly among ties)."""
    return torch.maximum(x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True))


def symmetric_scale(
    x: torch.Tensor, args: QuantizationArgs, clip_ratio: torch.Tensor | float | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One scale per slice along the last dim of ``x: [..., k]``: ``max|x| * clip / qmax``
    (``qmax`` the grid's largest code), floored at ``_MIN_SCALE``; ``[..., 1]``. The one
    definition the fake quantizers, the stored weight scales and the integer path's
    activation codes all use, so their codes agree. NVFP4: the effective ``s / g``
    (``nvfp4_block_scale``; ``global_scale`` ``g`` from ``x`` itself when not given)."""
    ratio = 1.0 if clip_ratio is None else clip_ratio
    if is_mxfp4(args):
        return mx_scale(abs_max(x) * ratio)
    if is_nvfp4(args):
        if global_scale is None:
            global_scale = nvfp4_global_scale(x)
        amax = abs_max(x) * ratio
        return nvfp4_block_scale(amax, global_scale) / global_scale
    qmax = _grid_max(args)
    return (abs_max(x) * ratio / qmax).clamp_min(_MIN_SCALE)


def asymmetric_qparams(
    x: torch.Tensor, num_bits: int, clip_ratio: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)``, each ``[..., 1]``, of ``x: [..., k]`` quantized asymmetrically per
    slice: the range widened to contain 0 and shrunk by ``clip_ratio``, the zero point an
    integer in ``[0, 2^b - 1]`` (float, no gradient)."""
    qmin, qmax = _int_range(num_bits, symmetric=False)
    ratio = 1.0 if clip_ratio is None else clip_ratio
    x_min = x.amin(dim=-1, keepdim=True).clamp_max(0.0) * ratio
    x_max = x.amax(dim=-1, keepdim=True).clamp_min(0.0) * ratio
    scale = ((x_max - x_min) / qmax).clamp_min(_MIN_SCALE)
    return scale, torch.clamp(torch.round(-x_min / scale), qmin, qmax).detach()


@torch.no_grad()
def mx_scale(amax: torch.Tensor) -> torch.Tensor:
    """The MXFP4 scale of groups whose (clipped) ``max|x|`` is ``amax``: ``2^(floor(log2(p)) -
    2)``, ``p`` = ``amax`` rounded to a power of two by adding a quarter of the float32
    mantissa range and truncating (compressed-tensors' ``round_to_power_2``, up from 1.75 x
    2^e), the exponent clamped to E8M0's [-127, 128] (an all-zero group gets 2^-127). A power
    of two: no gradient (the clip ratio of an MX quantizer is found by search, not learned).
    Written out because compressed-tensors' version returns the biased uint8 exponent."""
    bits = amax.float().contiguous().view(torch.int32)
    power = torch.bitwise_and(bits + (1 << 21), 0x7F800000).view(torch.float32)
    exponent = (torch.floor(torch.log2(power)) - 2).clamp(-127, 128)
    return torch.exp2(exponent).to(amax.dtype)


@torch.no_grad()
def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor ``g = 448 * 6 / max|x|``, float32 ``[1]``, 1 where that is not
    finite: compressed-tensors' ``generate_gparam`` on ``x``'s range, so the largest block
    scale lands on e4m3's 448."""
    x = x.detach().float()
    return generate_gparam(x.amin(), x.amax())


def nvfp4_block_scale(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 block scale ``s = e4m3(g * (amax / 6))`` (clamped to +-448, a zero scale
    replaced by 0.125) of groups whose clipped ``max|x|`` is ``amax``, as floats; the
    quantizer divides by ``s / g``. compressed-tensors' ``calculate_qparams`` arithmetic, so
    the stored ``weight_scale`` is the same bytes; the e4m3 rounding is straight-through, so
    a learnable clip ratio still gets a gradient."""
    scale = global_scale * (amax / _FP4_MAX)
    rounded = _cast_fp8_ste(scale.clamp(-_FP8_MAX, _FP8_MAX))
    return torch.where(rounded == 0, torch.full_like(rounded, _FP8_EPS), rounded)


def _cast_fp4_ste(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to the nearest e2m1 value, halfway cases to the even code (0, 1, 2, 4),
    and saturated at +-6 (compressed-tensors' ``cast_to_fp4`` thresholds); identity in the
    backward pass. Written in torch because compressed-tensors' CPU version is compiled with
    ``torch.compile`` per shape and has no gradient."""
    a = v.detach().abs()
    rounded = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(
        a <= 1.25, 1.0, torch.where(a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(
            a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    rounded = (rounded * torch.sign(v.detach())).to(v.dtype)
    if not (v.requires_grad and torch.is_grad_enabled()):
        return rounded
    return v + (rounded - v).detach()


def _cast_fp8_ste(v: torch.Tensor) -> torch.Tensor:
    """``v`` (already within +-448) rounded onto the e4m3 grid (round to nearest even), kept in
    ``v``'s dtype; identity in the backward pass."""
    rounded = v.to(_FP8).to(v.dtype)
    if not (v.requires_grad and torch.is_grad_enabled()):
        return rounded
    return v + (rounded - v).detach()


def _fake_quantize_last_dim(
    x: torch.Tensor, args: QuantizationArgs, clip_ratio: torch.Tensor | float | None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with one scale (and zero point) per slice along the last dim.

    ``x: [..., k]``; ``clip_ratio`` broadcasts against ``[..., 1]`` and shrinks the range;
    ``global_scale``: NVFP4's ``g`` (else unused). Gradients flow to ``x`` and
    ``clip_ratio`` (rounding is straight-through).
    """
    _check_args(args)
    if is_fp8(args):
        scale = symmetric_scale(x, args, clip_ratio)
        return _cast_fp8_ste(torch.clamp(x / scale, -_FP8_MAX, _FP8_MAX)) * scale
    if is_fp4(args):
        scale = symmetric_scale(x, args, clip_ratio, global_scale)
        return _cast_fp4_ste(x / scale) * scale
    qmin, qmax = _int_range(args.num_bits, args.symmetric)
    if args.symmetric:
        scale = symmetric_scale(x, args, clip_ratio)
        return torch.clamp(_round_ste(x / scale), qmin, qmax) * scale
    scale, zero = asymmetric_qparams(x, args.num_bits, clip_ratio)
    return (torch.clamp(_round_ste(x / scale) + zero, qmin, qmax) - zero) * scale


def _weight_groups(weight: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """View ``weight: [out, in]`` as ``[out, groups, group_width]`` for the args' strategy."""
    out_features, in_features = weight.shape
    if args.strategy == "channel":
        return weight.reshape(out_features, 1, in_features)
    if args.strategy in ("group", "tensor_group"):
        if in_features % args.group_size != 0:
            raise ValueError(
                f"Weight has {in_features} input columns, not a multiple of "
                f"group_size={args.group_size}; pick a group_size that divides {in_features}."
            )
        return weight.reshape(out_features, in_features // args.group_size, args.group_size)
    raise ValueError(
        f"Weight quantization strategy {args.strategy!r} is not supported; expected 'channel' "
        "or 'group' ('tensor_group' for NVFP4). Set strategy='channel' (per output row) or "
        "'group' with a group_size."
    )


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"Expected a weight of shape [out, in], got shape {tuple(weight.shape)}; "
            "reshape it to 2-D first."
        )


def fake_quantize_weight(
    weight: torch.Tensor, args: QuantizationArgs, clip_ratio: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round-to-nearest fake quantization of ``weight: [out, in]`` per channel or per group.

    ``clip_ratio: [out]`` scales each row's range (all groups of a row share it);
    ``global_scale``: NVFP4's ``g`` (default: from this weight). Rounding is
    straight-through, so this is usable with gradients (SGAT fits ``T`` through it).
    """
    _check_weight(weight)
    grouped = _weight_groups(weight, args)
    ratio = None if clip_ratio is None else clip_ratio.reshape(-1, 1, 1).to(weight.dtype)
    return _fake_quantize_last_dim(grouped, args, ratio, global_scale).reshape_as(weight)


@torch.no_grad()
def search_weight_clip(
    weight: torch.Tensor, args: QuantizationArgs, grid: tuple[float, ...] = DEFAULT_CLIP_GRID
) -> torch.Tensor:
    """Per output row, the clip ratio in ``grid`` minimising the row's squared RTN error.

    ``weight: [out, in]`` -> ``[out]``. Vectorised over rows; one pass per grid value.
    """
    _check_weight(weight)
    best_err = torch.full((weight.shape[0],), float("inf"), dtype=weight.dtype,
                          device=weight.device)
    best_ratio = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for ratio in grid:
        candidate = torch.full_like(best_ratio, ratio)
        err = (fake_quantize_weight(weight, args, candidate) - weight).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, candidate, best_ratio)
    return best_ratio


def _quantize_column(
    column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Fake-quantize ``column: [out]`` with fixed ``scale, zero: [out]`` (used by GPTQ)."""
    return (torch.clamp(torch.round(column / scale) + zero, qmin, qmax) - zero) * scale


def _static_qparams(
    block: torch.Tensor, num_bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[out]`` of ``block: [out, k]`` with the same rules as RTN."""
    qmin, qmax = _int_range(num_bits, symmetric)
    if symmetric:
        scale = (block.abs().amax(dim=1) / qmax).clamp_min(_MIN_SCALE)
        return scale, torch.zeros_like(scale)
    x_min = block.amin(dim=1).clamp_max(0.0)
    x_max = block.amax(dim=1).clamp_min(0.0)
    scale = ((x_max - x_min) / qmax).clamp_min(_MIN_SCALE)
    return scale, torch.clamp(torch.round(-x_min / scale), qmin, qmax)


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    block_size: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """GPTQ: quantize columns in order, pushing each column's error onto the later ones.

    ``weight: [out, in]``, ``hessian: [in, in]`` (``X^T X`` of the layer input) -> fake-quantized
    weight ``[out, in]``. Uses the upper Cholesky factor of the damped inverse Hessian
    (Frantar et al. 2022). Per channel the scales come from the original weight; per group they
    come from the error-updated group when its first column is reached. With groups the block
    size is rounded down to a multiple of ``group_size`` so a group never straddles two blocks.
    """
    _check_int(args, "GPTQ (its column updates round onto integer codes)")
    _check_weight(weight)
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"Hessian has shape {tuple(hessian.shape)}, expected ({in_features}, {in_features}) "
            "to match the weight's input dim; accumulate X^T X over the layer input."
        )
    _weight_groups(weight, args)  # validates strategy and group divisibility
    group_size = args.group_size if args.strategy == "group" else None
    if group_size is not None:
        block_size = max(group_size, block_size // group_size * group_size)
    qmin, qmax = _int_range(args.num_bits, args.symmetric)

    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_features, dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(
            f"Hessian is not positive definite even with damp={damp}; "
            "pass more calibration tokens or a larger damp."
        )
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)

    scale, zero = (None, None) if group_size else _static_qparams(w, args.num_bits, args.symmetric)
    quantized = torch.zeros_like(w)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w_block = w[:, i1:i2].clone()
        err_block = torch.zeros_like(w_block)
        h_inv_block = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group_size and (i1 + i) % group_size == 0:
                group = w_block[:, i : i + group_size]
                scale, zero = _static_qparams(group, args.num_bits, args.symmetric)
            column = w_block[:, i]
            q = _quantize_column(column, scale, zero, qmin, qmax)
            quantized[:, i1 + i] = q
            err = (column - q) / h_inv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * h_inv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, i2:] -= err_block @ h_inv[i1:i2, i2:]
    return quantized.to(weight.dtype)


def _check_activation_args(args: QuantizationArgs) -> None:
    _check_args(args)
    if args.strategy != "token" and not is_fp4(args):
        raise ValueError(
            f"Activation quantization strategy {args.strategy!r} is not supported; expected "
            "'token' (dynamic, one scale per token; MXFP4 / NVFP4: one per 32 / 16 channels "
            "of a token). Set strategy='token', dynamic=True."
        )


def fake_quantize_activation(
    x: torch.Tensor, args: QuantizationArgs, clip_ratio: torch.Tensor | float | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dynamic per-token fake quantization of ``x: [..., d]`` (one scale per row of ``d``;
    MXFP4 / NVFP4: one per 32 / 16 consecutive channels of a row).

    ``clip_ratio`` is a scalar or broadcasts against ``[..., 1]`` (e.g. one ratio per token's
    mask state); ``global_scale``: NVFP4's static ``g`` (default: from ``x``, as in the fit).
    Straight-through rounding: gradients reach ``x`` and a learnable ``clip_ratio``.
    """
    _check_activation_args(args)
    if not is_fp4(args):
        return _fake_quantize_last_dim(x, args, clip_ratio)
    d = x.shape[-1]
    if d % args.group_size:
        raise ValueError(
            f"Activations of width {d} cannot be quantized in groups of {args.group_size}; "
            f"this scheme needs every quantized linear's input width to be a multiple of "
            f"{args.group_size}.")
    if is_nvfp4(args) and global_scale is None:
        global_scale = nvfp4_global_scale(x)
    groups = x.unflatten(-1, (d // args.group_size, args.group_size))
    ratio = clip_ratio.unsqueeze(-1) if isinstance(clip_ratio, torch.Tensor) \
        and clip_ratio.dim() else clip_ratio
    return _fake_quantize_last_dim(groups, args, ratio, global_scale).flatten(-2)


@torch.no_grad()
def quantize_activation(
    x: torch.Tensor, args: QuantizationArgs, clip_ratio: torch.Tensor | float | None = None,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes behind ``fake_quantize_activation``: ``x: [..., d]`` ->
    ``(codes: int8 [..., d], scale: [..., 1])`` in ``x``'s dtype, with
    ``codes * scale == fake_quantize_activation(x, args, clip_ratio)`` bit for bit (same
    ``symmetric_scale``, same ``x / scale``; the straight-through rounding rounds exactly).
    Symmetric int of at most 8 bits only: what an int8 GEMM takes (``global_scale``, for
    ``fake_quantize_activation``'s signature, must be None: integer grids have none).

    >>> codes, scale = quantize_activation(torch.tensor([[-7.0, 0.4, 3.5]]), scheme_args("W4A4")[1])
    >>> codes.tolist(), scale.tolist()
    ([[-7, 0, 4]], [[1.0]])
    """
    _check_activation_args(args)
    if is_float(args) or not args.symmetric or args.num_bits > 8 or global_scale is not None:
        raise ValueError(
            f"Got activation QuantizationArgs(type={args.type!r}, symmetric={args.symmetric}, "
            f"num_bits={args.num_bits}); integer codes exist for symmetric int of at most 8 "
            "bits (int8 lanes, no zero point). Use fake_quantize_activation for the others."
        )
    qmin, qmax = _int_range(args.num_bits, symmetric=True)
    scale = symmetric_scale(x, args, clip_ratio)
    return torch.div(x, scale).round_().clamp_(qmin, qmax).to(torch.int8), scale


def fake_quantize_kv(x: torch.Tensor, num_bits: int = 4) -> torch.Tensor:
    """QuaRot-style KV fake quantization: asymmetric, one scale/zero per (token, head).

    ``x: [batch, heads, seq, head_dim]`` -> same shape.
    """
    if x.dim() != 4:
        raise ValueError(
            f"Expected keys/values of shape [batch, heads, seq, head_dim], got "
            f"{tuple(x.shape)}; transpose the heads axis in before quantizing."
        )
    return _fake_quantize_last_dim(x, _kv_args(num_bits), clip_ratio=None)


@functools.cache
def _kv_args(num_bits: int) -> QuantizationArgs:
    return QuantizationArgs(num_bits=num_bits, type="int", symmetric=False)
