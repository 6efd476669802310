"""The exact integer GEMM of a STaR-Quant linear, in pure torch.

``y[t, o] = a_scale[t] * w_scale[o] * sum_i a[t, i] * w[o, i] + bias[o]``, with ``a`` the int8
activation codes of ``quantize_activation`` and ``w`` the weight codes exactly as
compressed-tensors stores them: int8 ``[out, d]`` (``int-quantized``) or 4-bit codes + 8,
eight per int32 along ``d`` (``pack-quantized`` ``weight_packed: [out, ceil(d / 8)]``), read in
place, never unpacked for good. The sum is integer arithmetic, exact, so the result differs
from the dequantize-and-matmul reference only by the reference's float32 rounding.

Three kernels compute the int32 accumulators, the first that applies (``integer_kernel``):

* ``"int_mm"``: ``torch._int_mm`` (int8 x int8 -> int32). CUDA (cuBLASLt) needs more than 16
  rows and ``k``, ``n`` multiples of 8 (``_int_mm_out_cuda`` in
  ``aten/src/ATen/native/cuda/Blas.cpp``). The CPU accepts every shape, but only an
  AVX512-VNNI CPU with oneDNN enabled gets a real kernel; elsewhere PyTorch runs a scalar loop
  (``_int_mm_out_cpu`` in ``aten/src/ATen/native/LinearAlgebra.cpp``), about 100x slower than
  float32 BLAS on the AVX2 CPU we measured (``docs/results.md``).
* ``"onednn"`` (x86 CPUs without VNNI, 4-bit weights): oneDNN's u8s8 int8 GEMM, the one
  PyTorch's x86 quantization backend uses (``torch.ops.onednn.qlinear_prepack`` /
  ``qlinear_pointwise``). Without VNNI it adds pairs of u8 x s8 products in int16 lanes that
  saturate past 32767, so only 4-bit weights (codes + 8 in ``[0, 15]``: pairs stay below
  ``2 * 255 * 15``) are exact on it; 8-bit weights times 8-bit activations are not (measured).
  It needs the weight repacked on every call, which pays off from ``_ONEDNN_MIN_TOKENS``
  tokens (measured: twice the float32 kernel's speed at 1024 tokens, even at 128), and it
  returns float32, exact while ``|accumulator| <= 2^24``.
* ``"float32"``: the same integer products summed by float32 BLAS. Exact, not approximate:
  every code and every partial sum is an integer of magnitude at most ``2^24``, which float32
  represents exactly, in any summation order (``d`` is split into chunks small enough to keep
  it so, their sums added in int32). Runs everything the others refuse.

Each refusal is logged once per reason.

Neither torch nor compressed-tensors multiplies packed int4 codes directly, so the 4-bit path
reads ``weight_packed`` as bytes (low nibble = even column, high nibble = odd column on a
little-endian host) and multiplies the even and odd activation columns by the two nibble
planes, unpacked into a transient buffer per call (row chunks for ``"float32"``). The ``+ 8``
offset of compressed-tensors' codes is taken out once per row of the result:
``sum_i a_i (w_i + 8) - 8 sum_i a_i``.

The fastest layout on x86 CPUs is opt-in (``prepack_weight``, ``StarQuantLinear.prepack``):
the weight's signed int8 codes laid out once in oneDNN's blocked format, multiplied by
oneDNN's int8 GEMM (VNNI/AMX) with nothing decoded per call, at one more byte per weight
(``prepacked_gemm``: the same numbers bit for bit).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import torch
from compressed_tensors.compressors import unpack_from_int32

INT_MM = "int_mm"
ONEDNN = "onednn"
FLOAT32 = "float32"
KERNELS = (INT_MM, ONEDNN, FLOAT32)

_EXACT_FLOAT32 = 2**24  # float32 holds every integer of magnitude <= 2^24
_INT32_MAX = 2**31 - 1
_FLOAT32_BUFFER_BYTES = 8 * 2**20  # weight rows decoded to float32 per chunk
_INT4_OFFSET = 8  # compressed-tensors stores a 4-bit code c as c + 8
_INT8_MAGNITUDE = 128  # largest |code| an int8 holds
_INT4_UNSIGNED_MAX = 2 * _INT4_OFFSET - 1  # a stored 4-bit code + 8 is at most 15
_ONEDNN_MIN_TOKENS = 256  # below, repacking the weight per call costs more than it saves
_U8_ZERO_POINT = 128  # activation codes go to oneDNN as uint8 code + 128

logger = logging.getLogger(__name__)
_logged_reasons: set[str] = set()


def log_once(reason: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``reason`` comes up in this process."""
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning(message)


def int_mm_refusal(device: torch.device, m: int, k: int, n: int) -> tuple[str, str] | None:
    """Why ``torch._int_mm`` gives no fast exact ``[m, k] x [k, n]`` product on ``device``:
    ``(reason, message)``, or None when it does. The rules are PyTorch's (module docstring)."""
    if device.type == "cuda":
        if m > 16 and k > 0 and k % 8 == 0 and n > 0 and n % 8 == 0:
            return None
        return ("int_mm-cuda-shape",
                f"torch._int_mm on CUDA needs more than 16 rows and k, n multiples of 8, got "
                f"[{m}, {k}] x [{k}, {n}]; such products run on the float32 kernel (exact).")
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return ("int_mm-cpu-onednn",
                    "oneDNN is unavailable or disabled (torch.backends.mkldnn), so "
                    "torch._int_mm would run PyTorch's scalar loop; integer GEMMs run on the "
                    "float32 kernel (exact).")
        if not torch.cpu.get_capabilities().get("avx512_vnni", False):
            return ("int_mm-cpu-vnni",
                    "This CPU has no AVX512-VNNI, so torch._int_mm would run PyTorch's scalar "
                    "loop; integer GEMMs run on oneDNN's u8s8 GEMM where it is exact and pays "
                    "off, else on the float32 kernel (both exact).")
        return None
    return ("int_mm-device",
            f"torch._int_mm is not used on device type {device.type!r}; integer GEMMs run "
            "on the float32 kernel (exact).")


def _onednn_int8_available(device: torch.device) -> bool:
    """Whether torch's oneDNN int8 GEMM ops (``torch.ops.onednn.qlinear_*``) run on
    ``device``: an x86 CPU with oneDNN enabled."""
    return (device.type == "cpu"
            and torch.cpu.get_capabilities().get("architecture") == "x86_64"
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def onednn_refusal(device: torch.device, m: int, d: int, int4: bool, max_abs_code: int
                   ) -> tuple[str, str] | None:
    """Why the ``"onednn"`` kernel does not take this product (after ``int_mm`` refused it):
    ``(reason, message)``, or None. ``int4``: the weight is 4-bit ``weight_packed``;
    ``max_abs_code``: the largest ``|activation code|``."""
    if not _onednn_int8_available(device):
        return ("onednn-unavailable",
                "oneDNN's int8 GEMM (torch.ops.onednn.qlinear_pointwise, x86 CPUs) is not "
                "available here; integer GEMMs run on the float32 kernel (exact).")
    if not int4:
        return ("onednn-int8-weights",
                "Without VNNI, oneDNN's int8 GEMM saturates int16 pair sums of 8-bit weights "
                "times 8-bit activations; 8-bit weights run on the float32 kernel (exact).")
    if m < _ONEDNN_MIN_TOKENS:
        return ("onednn-tokens",
                f"Calls with fewer than {_ONEDNN_MIN_TOKENS} tokens run on the float32 kernel "
                "(exact): repacking the weight for oneDNN costs more than its int8 GEMM saves.")
    if d * max_abs_code * _INT4_UNSIGNED_MAX > _EXACT_FLOAT32:
        return ("onednn-range",
                f"d * max|activation code| * 15 = {d * max_abs_code * _INT4_UNSIGNED_MAX} > 2^24: "
                "oneDNN's float32 output would round the accumulators; such products run on "
                "the float32 kernel (exact).")
    return None


def integer_kernel(device: torch.device, m: int, d: int, n: int, int4: bool = False,
                   max_abs_code: int = _INT8_MAGNITUDE) -> str:
    """The first kernel that takes an ``[m, d] x [d, n]`` product (module docstring); each
    refusal on the way is logged once per reason."""
    refusal = int_mm_refusal(device, m, d, n)
    if refusal is None:
        return INT_MM
    log_once(*refusal)
    if device.type == "cpu":
        refusal = onednn_refusal(device, m, d, int4, max_abs_code)
        if refusal is None:
            return ONEDNN
        log_once(*refusal)
    return FLOAT32


def int4_weight_readable() -> str | None:
    """Why this host cannot read ``weight_packed`` as nibble planes, or None: the byte view
    puts even columns in low nibbles only on a little-endian host."""
    if sys.byteorder != "little":
        return (f"4-bit weights on a {sys.byteorder}-endian host (weight_packed is read as "
                "little-endian bytes)")
    return None


def _check_operands(a_codes: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor,
                    weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    if a_codes.dtype != torch.int8 or a_codes.dim() != 2:
        raise ValueError(
            f"Got activation codes {a_codes.dtype} {tuple(a_codes.shape)}; expected int8 "
            "[tokens, d] from quantize_activation (flatten batch and sequence first)."
        )
    tokens, d = a_codes.shape
    out = weight.shape[0] if weight.dim() == 2 else -1
    packed_width = (d + 7) // 8
    if not ((weight.dtype == torch.int8 and weight.shape == (out, d))
            or (weight.dtype == torch.int32 and weight.shape == (out, packed_width))):
        raise ValueError(
            f"Got weight {weight.dtype} {tuple(weight.shape)} for activations with d={d}; "
            f"expected int8 codes [out, {d}] (compressed-tensors int-quantized 'weight') or "
            f"int32 [out, {packed_width}] (pack-quantized 'weight_packed', 4 bit)."
        )
    if a_scale.shape != (tokens, 1) or weight_scale.shape != (out, 1):
        raise ValueError(
            f"Got a_scale {tuple(a_scale.shape)} and weight_scale {tuple(weight_scale.shape)}; "
            f"expected per-token [{tokens}, 1] and per-channel [{out}, 1] scales."
        )
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"Got bias {tuple(bias.shape)}; expected [{out}] or None.")


def _int4_planes(weight_packed: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight_packed: int32 [out, ceil(d / 8)]`` -> the bytes holding the even columns' and
    the odd columns' codes + 8: uint8 views ``[out, ceil(d / 2)]`` and ``[out, d // 2]``."""
    as_bytes = weight_packed.view(torch.uint8)
    return as_bytes[:, : (d + 1) // 2], as_bytes[:, : d // 2]


def _even_odd(a_codes: torch.Tensor) -> torch.Tensor:
    """``[t, d]`` -> columns reordered ``[0, 2, 4, ..., 1, 3, 5, ...]``, the nibble planes'
    order."""
    return torch.cat([a_codes[:, 0::2], a_codes[:, 1::2]], dim=1)


def _unpack_int4_into(even: torch.Tensor, odd: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``[even plane & 15 | odd plane >> 4]`` (codes + 8, in ``[0, 15]``) into ``out``
    (int8 or float32, ``[rows, d]``)."""
    n_even = even.shape[1]
    if out.dtype == torch.int8:  # straight into the int8 buffer, no temporary
        torch.bitwise_and(even, 15, out=out[:, :n_even].view(torch.uint8))
        torch.bitwise_right_shift(odd, 4, out=out[:, n_even:].view(torch.uint8))
    else:
        out[:, :n_even].copy_(even & 15)
        out[:, n_even:].copy_(odd >> 4)


def _accumulate_int_mm(a_codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int32 ``[t, out]`` by ``torch._int_mm``; 4-bit weights unpacked to an int8 buffer."""
    if weight.dtype == torch.int8:
        return torch._int_mm(a_codes, weight.T)
    d = a_codes.shape[1]
    unpacked = torch.empty(weight.shape[0], d, dtype=torch.int8, device=weight.device)
    _unpack_int4_into(*_int4_planes(weight, d), unpacked)
    return torch._int_mm(_even_odd(a_codes), unpacked.T)


def decoded_row_chunks(weight: torch.Tensor, d: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The float32 kernel's weight decode: ``(r0, r1, codes)`` with ``codes: float32
    [r1 - r0, d]`` the rows ``r0:r1`` (``[even | odd]`` columns + 8 for 4 bit), in one reused
    buffer of about ``_FLOAT32_BUFFER_BYTES`` (valid until the next chunk)."""
    out_features = weight.shape[0]
    planes = _int4_planes(weight, d) if weight.dtype == torch.int32 else None
    rows = max(1, min(out_features, _FLOAT32_BUFFER_BYTES // (4 * d)))
    buffer = torch.empty(rows, d, device=weight.device)
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        decoded = buffer[: r1 - r0]
        if planes is None:
            decoded.copy_(weight[r0:r1])
        else:
            _unpack_int4_into(planes[0][r0:r1], planes[1][r0:r1], decoded)
        yield r0, r1, decoded


def onednn_repacked_weight(weight_packed: torch.Tensor, tokens: int, d: int) -> torch.Tensor:
    """The ``"onednn"`` kernel's weight decode: the nibble planes of ``weight_packed: int32
    [out, ceil(d / 8)]`` unpacked to int8 (codes + 8, ``[even | odd]`` columns; transient) and
    repacked into oneDNN's blocked layout for a product with ``tokens`` rows."""
    unpacked = torch.empty(weight_packed.shape[0], d, dtype=torch.int8,
                           device=weight_packed.device)
    _unpack_int4_into(*_int4_planes(weight_packed, d), unpacked)
    return torch.ops.onednn.qlinear_prepack(unpacked, [tokens, d])


def _accumulate_onednn(a_codes: torch.Tensor, weight_packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[t, out]`` by oneDNN's u8s8 GEMM: the weight repacked for it, the activation
    codes as uint8 ``code + 128`` with zero point 128, unit scales, float32 out (exact:
    ``onednn_refusal`` checked the range)."""
    tokens, d = a_codes.shape
    out_features = weight_packed.shape[0]
    repacked = onednn_repacked_weight(weight_packed, tokens, d)
    a_u8 = (_even_odd(a_codes).to(torch.int16) + _U8_ZERO_POINT).to(torch.uint8)
    ones = torch.ones(out_features, device=a_codes.device)
    zeros = torch.zeros(out_features, dtype=torch.int64, device=a_codes.device)
    acc = torch.ops.onednn.qlinear_pointwise(a_u8, 1.0, _U8_ZERO_POINT, repacked, ones, zeros,
                                             None, 1.0, 0, torch.float32, "none", [], "")
    return acc.to(torch.int32)


def _accumulate_float32(a_codes: torch.Tensor, weight: torch.Tensor, max_abs_code: int
                        ) -> torch.Tensor:
    """int32 ``[t, out]`` from float32 BLAS, exactly: weight rows are decoded to float32 a
    chunk at a time, and ``d`` is cut so no partial sum exceeds ``2^24`` in magnitude."""
    tokens, d = a_codes.shape
    packed = weight.dtype == torch.int32
    a = (_even_odd(a_codes) if packed else a_codes).float()
    max_weight = _INT4_UNSIGNED_MAX if packed else _INT8_MAGNITUDE
    chunk_d = max(1, _EXACT_FLOAT32 // (max(1, max_abs_code) * max_weight))
    acc = torch.empty(tokens, weight.shape[0], dtype=torch.int32, device=weight.device)
    for r0, r1, decoded in decoded_row_chunks(weight, d):
        for c0 in range(0, d, chunk_d):
            part = a[:, c0 : c0 + chunk_d] @ decoded[:, c0 : c0 + chunk_d].T
            if c0 == 0:
                acc[:, r0:r1] = part
            else:
                acc[:, r0:r1] += part.to(torch.int32)
    return acc


def integer_matmul(a_codes: torch.Tensor, weight: torch.Tensor, kernel: str | None = None
                   ) -> torch.Tensor:
    """Exact ``sum_i a[t, i] w[o, i]``: int32 ``[t, out]``.

    ``a_codes: int8 [t, d]``; ``weight``: int8 codes ``[out, d]`` or the 4-bit
    ``weight_packed: int32 [out, ceil(d / 8)]`` (codes + 8, compressed-tensors' layout).
    ``kernel``: one of ``KERNELS`` or None (``integer_kernel`` picks).
    """
    tokens, d = a_codes.shape
    out_features = weight.shape[0]
    if tokens == 0 or out_features == 0 or d == 0:
        return torch.zeros(tokens, out_features, dtype=torch.int32, device=a_codes.device)
    if weight.dtype == torch.int32 and (reason := int4_weight_readable()) is not None:
        raise RuntimeError(f"Cannot read 4-bit weight_packed in place: {reason}.")
    if d * _INT8_MAGNITUDE * 2 * _INT4_OFFSET > _INT32_MAX:
        raise ValueError(
            f"Got d={d}: int32 accumulators could overflow beyond d = "
            f"{_INT32_MAX // (_INT8_MAGNITUDE * 2 * _INT4_OFFSET)}; split the layer's input."
        )
    low, high = torch.aminmax(a_codes)
    max_abs_code = max(-int(low), int(high))
    int4 = weight.dtype == torch.int32
    kernel = kernel or integer_kernel(a_codes.device, tokens, d, out_features, int4,
                                      max_abs_code)
    if kernel not in KERNELS:
        raise ValueError(f"Got kernel={kernel!r}; expected one of {KERNELS} or None.")
    if kernel == INT_MM:
        acc = _accumulate_int_mm(a_codes, weight)
    elif kernel == ONEDNN:
        if not int4:
            raise ValueError("The onednn kernel takes 4-bit weight_packed only (module "
                             "docstring); pass kernel=None to choose one that applies.")
        acc = _accumulate_onednn(a_codes, weight)
    else:
        acc = _accumulate_float32(a_codes, weight, max_abs_code)
    if int4:
        acc -= _INT4_OFFSET * a_codes.sum(dim=1, keepdim=True, dtype=torch.int32)
    return acc


def prepack_refusal(device: torch.device, int4: bool) -> tuple[str, str] | None:
    """Why no oneDNN-prepacked copy of a weight serves exact products on ``device``:
    ``(reason, message)``, or None. 4-bit weight codes keep oneDNN's int16 pair sums of
    8-bit activations below 2^15 on any x86 CPU; 8-bit weights need VNNI (module docstring)."""
    if not _onednn_int8_available(device):
        return ("prepack-unavailable",
                "oneDNN's int8 GEMM (torch.ops.onednn, x86 CPUs) is not available here; the "
                "weights stay in their stored layout.")
    if not int4 and not torch.cpu.get_capabilities().get("avx512_vnni", False):
        return ("prepack-int8-weights",
                "Without AVX512-VNNI, oneDNN's int8 GEMM saturates int16 pair sums of 8-bit "
                "weights times 8-bit activations; 8-bit weights stay in their stored layout.")
    return None


def prepack_weight(weight: torch.Tensor, d: int) -> torch.Tensor:
    """The stored weight (int8 codes ``[out, d]`` or 4-bit ``weight_packed``) as signed int8
    codes in oneDNN's blocked layout (``torch.ops.onednn.qlinear_prepack``), made once: one
    byte per weight, opaque (not saveable). ``prepacked_gemm`` multiplies with it."""
    if weight.dtype == torch.int32:
        codes = unpack_from_int32(weight, 4, torch.Size((weight.shape[0], d)))
    else:
        codes = weight
    return torch.ops.onednn.qlinear_prepack(codes.to(torch.int8).contiguous(), None)


def prepacked_gemm(a_codes: torch.Tensor, a_scale: torch.Tensor, prepacked: torch.Tensor,
                   weight_scale: torch.Tensor, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``int_gemm`` on a ``prepack_weight`` copy, bit for bit: oneDNN's int8 GEMM gets the
    signed activation codes (zero point 0; measured exact, where a uint8 ``code + 128`` with
    zero point 128 rounds twice past 2^24) and applies the weight scale to the exact int32
    accumulator as ``rescale`` does (one float32 product), saving a pass over the output;
    then the per-token scale and bias (``scale_tokens``)."""
    return scale_tokens(prepacked_weight_scaled(a_codes, prepacked, weight_scale), a_scale, bias)


def prepacked_weight_scaled(a_codes: torch.Tensor, prepacked: torch.Tensor,
                            weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[t, out]``: ``float32(a_codes W^T) * weight_scale^T`` for ``a_codes: int8
    [t, d]`` and a ``prepack_weight`` copy of ``W`` (``prepacked_gemm``)."""
    scale = weight_scale.float().reshape(-1).contiguous()
    zeros = torch.zeros(scale.shape[0], dtype=torch.int64, device=a_codes.device)
    return torch.ops.onednn.qlinear_pointwise(a_codes, 1.0, 0, prepacked, scale, zeros, None,
                                              1.0, 0, torch.float32, "none", [], "")


def int_gemm(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """``y = (a_codes W^T) * a_scale * weight_scale^T + bias``: float32 ``[t, out]``.

    ``a_codes: int8 [t, d]`` and ``a_scale: [t, 1]`` from ``quantize_activation``;
    ``weight`` as compressed-tensors stores it: int8 ``[out, d]`` or 4-bit ``weight_packed:
    int32 [out, ceil(d / 8)]``; ``weight_scale: [out, 1]`` per channel; ``bias: [out]``.
    Symmetric codes only (no zero points). The accumulation is exact (``integer_matmul``);
    only the rescale rounds.

    >>> a, w = torch.tensor([[3, -2]], dtype=torch.int8), torch.tensor([[1, 4]], dtype=torch.int8)
    >>> int_gemm(a, torch.tensor([[0.5]]), w, torch.tensor([[2.0]]), torch.tensor([1.0]))
    tensor([[-4.]])
    """
    _check_operands(a_codes, a_scale, weight, weight_scale, bias)
    return rescale(integer_matmul(a_codes, weight, kernel), a_scale, weight_scale, bias)


def rescale(acc: torch.Tensor, a_scale: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``acc: int32 [t, out]`` -> ``acc * weight_scale^T * a_scale + bias``, float32, in this
    order (the weight scale first, as oneDNN applies it in ``prepacked_gemm``); scales
    ``[t, 1]`` and ``[out, 1]``, ``bias: [out]``."""
    y = acc.float().mul_(weight_scale.float().reshape(1, -1))
    return scale_tokens(y, a_scale, bias)


def scale_tokens(y: torch.Tensor, a_scale: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``y * a_scale + bias`` in place on ``y: float32 [t, out]`` (the weight-scaled
    accumulators); ``a_scale: [t, 1]``, ``bias: [out]``."""
    y.mul_(a_scale.float())
    return y if bias is None else y.add_(bias.float())
