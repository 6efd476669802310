"""What runs in a quantized forward pass: the SGAT(+TAC) linear and how its weight is stored.

A ``StarQuantLinear`` holds its weight the way the checkpoint and an INT or FP8 kernel hold it:
the codes under compressed-tensors' names and layouts (``pack-quantized`` for int4,
``int-quantized`` for int8, ``float-quantized`` for FP8 e4m3), produced by
compressed-tensors' own compressors, so the checkpoint is the in-memory model. The STaR
tensors (``sgat_*``, ``tac_*``) sit on the ``StarQuantInputTransform`` that a group of
linears reading the same input share (``input_transform.py``, with the token states).

Two forwards compute the same layer:

* the integer path (default wherever it is exact): the transform's int8 activation codes and
  per-token scales times the stored weight codes, read in place, in an exact integer GEMM
  (``integer_gemm.int_gemm``);
* the reference path: compressed-tensors decompresses the weight (float32 scale, so
  ``codes * scale`` is exact) and ``F.linear`` multiplies it with the fake-quantized
  activations. Used for what the integer GEMM does not cover (asymmetric or per-group
  weights, dense, FP8: an FP8 product of e4m3 codes is exact in float32, so this path is
  that kernel's numbers up to summation order) with one log line per reason, and
  selectable with ``integer_gemm = False``.

The two agree to float32 rounding: the codes are identical and the integer accumulation is
exact, so only the reference's float32 summation order differs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from torch import nn

from starquant_plugin.method.input_transform import (
    GEMM_CHUNK_TOKENS,
    MaskState,
    StarQuantInputTransform,
    attach_mask_state,
    in_token_chunks,
)
from starquant_plugin.method.integer_gemm import (
    int4_weight_readable,
    int_gemm,
    integer_kernel,
    log_once,
    prepack_refusal,
    prepack_weight,
    prepacked_gemm,
)
from starquant_plugin.method.quantizers import (
    SCHEMES,
    abs_max,
    asymmetric_qparams,
    fake_quantize_weight,
    is_float,
    is_fp8,
    is_mxfp4,
    is_nvfp4,
    nvfp4_block_scale,
    nvfp4_global_scale,
    symmetric_scale,
)
from starquant_plugin.method.sgat import SGATResult

_FP8 = torch.float8_e4m3fn

__all__ = ["MaskState", "StarQuantInputTransform", "StarQuantLinear", "attach_mask_state",
           "compressed_weight_layout", "prepack_weights", "weight_format", "weight_qparams",
           "weight_scheme"]

WEIGHT_FORMATS: dict[tuple[str, int], str] = {
    ("int", 4): "pack-quantized", ("int", 8): "int-quantized", ("float", 8): "float-quantized"}
"""compressed-tensors format per weight (type, bits): int4 packed 8 per int32, int8 as int8,
FP8 as ``float8_e4m3fn``; MXFP4 (``is_mxfp4``) is ``mxfp4-pack-quantized``, two e2m1 codes
per uint8 with uint8 (E8M0) scales; NVFP4 (``is_nvfp4``) is ``nvfp4-pack-quantized``, the same
codes with e4m3 block scales and a ``weight_global_scale``."""


def weight_format(args: QuantizationArgs) -> str:
    """The compressed-tensors format that stores weights quantized with ``args``."""
    if is_mxfp4(args):
        return "mxfp4-pack-quantized"
    if is_nvfp4(args):
        return "nvfp4-pack-quantized"
    key = (args.type, args.num_bits)
    if key not in WEIGHT_FORMATS:
        raise ValueError(
            f"Got weight QuantizationArgs(type={args.type!r}, num_bits={args.num_bits}); "
            f"starquant stores weights as {WEIGHT_FORMATS}, MXFP4 (4-bit float, group_size "
            "32, uint8 scales) as mxfp4-pack-quantized or NVFP4 (4-bit float, tensor_group "
            "of 16) as nvfp4-pack-quantized. Use one of the presets "
            f"{', '.join(SCHEMES)}."
        )
    return WEIGHT_FORMATS[key]


def weight_scheme(weight_args: QuantizationArgs, act_args: QuantizationArgs | None = None
                  ) -> QuantizationScheme:
    """The compressed-tensors scheme (with its explicit ``format``) of a STaR-Quant linear."""
    return QuantizationScheme(targets=["Linear"], weights=weight_args,
                              input_activations=act_args, format=weight_format(weight_args))


def _num_weight_groups(in_features: int, args: QuantizationArgs) -> int:
    if args.strategy == "channel":
        return 1
    if args.strategy in ("group", "tensor_group") and in_features % args.group_size == 0:
        return in_features // args.group_size
    raise ValueError(
        f"Weight strategy {args.strategy!r} (group_size={args.group_size}) cannot store "
        f"{in_features} input columns; use strategy='channel' or a group_size dividing it."
    )


def weight_qparams(
    weight: torch.Tensor, args: QuantizationArgs, clip_ratio: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fake_quantize_weight``'s scale (and zero point) in compressed-tensors' convention.

    ``weight: [out, in]``, ``clip_ratio: [out]`` -> ``scale: [out, groups]`` (groups = 1 per
    channel) and, if asymmetric, ``zero_point: [out, groups]`` int8 on compressed-tensors'
    signed grid (our unsigned zero point minus ``2^(b-1)``), else None. Same arithmetic as the
    fake quantizer, so ``codes * scale`` reproduces its output bit for bit. NVFP4: the e4m3
    block scales ``s`` under ``global_scale`` (the codes are then ``w / (s / g)``).
    """
    out_features, in_features = weight.shape
    groups = _num_weight_groups(in_features, args)
    x = weight.detach().reshape(out_features, groups, in_features // groups)
    ratio = None if clip_ratio is None else clip_ratio.reshape(-1, 1, 1).to(weight.dtype)
    if is_nvfp4(args):  # the block scales s; the codes are w / (s / g)
        g = nvfp4_global_scale(weight) if global_scale is None else global_scale
        amax = abs_max(x) * (1.0 if ratio is None else ratio)
        return nvfp4_block_scale(amax, g).reshape(out_features, groups), None
    if args.symmetric:
        return symmetric_scale(x, args, ratio).reshape(out_features, groups), None
    scale, zero = asymmetric_qparams(x, args.num_bits, ratio)
    zero = zero - 2 ** (args.num_bits - 1)  # compressed-tensors' signed grid
    return scale.reshape(out_features, groups), zero.reshape(out_features, groups).to(torch.int8)


def compressed_weight_layout(
    out_features: int, in_features: int, args: QuantizationArgs, scale_dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors compressed-tensors' compressor writes for a
    ``[out, in]`` weight, e.g. to build empty modules the checkpoint loads into.

    >>> from starquant_plugin.method.quantizers import scheme_args
    >>> layout = compressed_weight_layout(24, 64, scheme_args("W4A4")[0], torch.float32)
    >>> layout["weight_packed"], layout["weight_scale"]
    (((24, 8), torch.int32), ((24, 1), torch.float32))
    """
    groups = _num_weight_groups(in_features, args)
    bits = args.num_bits
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    stored_as = weight_format(args)
    if stored_as == "mxfp4-pack-quantized":  # scales: one E8M0 exponent per group
        layout["weight_packed"] = ((out_features, in_features // 2), torch.uint8)
        layout["weight_scale"] = ((out_features, groups), torch.uint8)
        return layout
    if stored_as == "nvfp4-pack-quantized":  # e4m3 block scales under one global scale
        layout["weight_packed"] = ((out_features, in_features // 2), torch.uint8)
        layout["weight_scale"] = ((out_features, groups), _FP8)
        layout["weight_global_scale"] = ((1,), scale_dtype)
        return layout
    if stored_as == "pack-quantized":
        layout["weight_packed"] = ((out_features, math.ceil(in_features * bits / 32)),
                                   torch.int32)
        layout["weight_shape"] = ((2,), torch.int64)
        if not args.symmetric:
            layout["weight_zero_point"] = ((math.ceil(out_features * bits / 32), groups),
                                           torch.int32)
    else:
        codes_dtype = torch.float8_e4m3fn if stored_as == "float-quantized" else torch.int8
        layout["weight"] = ((out_features, in_features), codes_dtype)
        if not args.symmetric:
            layout["weight_zero_point"] = ((out_features, groups), torch.int8)
    layout["weight_scale"] = ((out_features, groups), scale_dtype)
    return layout


class StarQuantLinear(nn.Module):
    """``y = Q_a(x_s) W_q^T + b``: the integer GEMM of one linear after its group's
    ``StarQuantInputTransform``.

    Buffers, in the checkpoint under these names: the weight ``W_q = Q_w(W M^{-T})`` as
    compressed-tensors stores it: 4 bit ``weight_packed: int32 [out, in / 8]`` +
    ``weight_shape: [2]``, 8 bit ``weight: int8 [out, in]`` (FP8: ``float8_e4m3fn``); all
    with ``weight_scale: [out, groups]`` (and ``weight_zero_point`` if asymmetric);
    ``bias: [out]`` or None.
    ``dequantized_weight()`` returns ``[out, in]`` float. With ``weight_args`` unset the
    constructor keeps a dense float ``weight`` instead (experiments; not saveable).

    The group's first linear owns the input transform (submodule ``input_transform``, saved
    with it); the others borrow it (``owns_transform=False``: same object, not saved twice).
    ``layer.weight`` is the 8-bit codes (compressed-tensors' name) and the dequantized
    weight for 4 bit (whose codes are ``weight_packed``).

    ``integer_gemm`` (default True) selects the exact integer path where it applies; set it
    False on an instance to run the dequantize-and-matmul reference (module docstring).
    ``prepack()`` adds a oneDNN-blocked int8 copy of the weight that the integer path then
    multiplies with instead (x86 CPUs; faster, one more byte per weight; ``prepack_weights``).
    """

    integer_gemm: bool = True
    _prepacked: torch.Tensor | None = None

    def __init__(
        self,
        weight_q: torch.Tensor,
        bias: torch.Tensor | None,
        input_transform: StarQuantInputTransform,
        *,
        owns_transform: bool = True,
        weight_args: QuantizationArgs | None = None,
        weight_scale: torch.Tensor | None = None,
        weight_zero_point: torch.Tensor | None = None,
        weight_global_scale: torch.Tensor | None = None,
    ) -> None:
        """``weight_q: [out, d]`` the transformed weight; with ``weight_args`` and its
        ``weight_scale: [out, groups]`` (``weight_qparams``, in the storage dtype; NVFP4 also
        its ``weight_global_scale: [1]``) compressed-tensors' compressor rounds it onto the
        scale's grid and stores the codes (a weight already fake-quantized with that scale
        keeps its values)."""
        super().__init__()
        d = input_transform.sgat_channel_scale.shape[0]
        if weight_q.dim() != 2 or weight_q.shape[1] != d:
            raise ValueError(
                f"Got weight {tuple(weight_q.shape)} for an input transform of dim {d}; "
                "expected [out, d]."
            )
        self.weight_args = weight_args
        self._attach_transform(input_transform, owns_transform)
        if weight_args is None:
            self.register_buffer("weight", weight_q.detach().clone())
        else:
            self._store_weight(weight_q.detach(), weight_args, weight_scale, weight_zero_point,
                               weight_global_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _attach_transform(self, input_transform: StarQuantInputTransform, owns: bool) -> None:
        if owns:
            self.input_transform = input_transform
        else:  # a plain reference: not a submodule, so not in state_dict twice
            object.__setattr__(self, "_borrowed_transform", input_transform)

    @property
    def transform(self) -> StarQuantInputTransform:
        """The group's input transform, owned or borrowed."""
        owned = self._modules.get("input_transform")
        return owned if owned is not None else self.__dict__["_borrowed_transform"]

    @property
    def owns_transform(self) -> bool:
        return "input_transform" in self._modules

    @property
    def act_args(self) -> QuantizationArgs:
        return self.transform.act_args

    def _store_weight(self, weight: torch.Tensor, weight_args: QuantizationArgs,
                      scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                      global_scale: torch.Tensor | None) -> None:
        if scale is None or (zero_point is None) != weight_args.symmetric \
                or (global_scale is None) == is_nvfp4(weight_args):
            raise ValueError(
                f"Got weight_args (symmetric={weight_args.symmetric}, NVFP4: "
                f"{is_nvfp4(weight_args)}) with weight_scale "
                f"{'missing' if scale is None else 'set'}, weight_zero_point "
                f"{'missing' if zero_point is None else 'set'} and weight_global_scale "
                f"{'missing' if global_scale is None else 'set'}; pass them from "
                "weight_qparams(weight, weight_args, clip, global_scale) (a zero point only if "
                "asymmetric, a global scale only for NVFP4)."
            )
        scheme = weight_scheme(weight_args, self.act_args)
        uncompressed = {"weight": weight.float(), "weight_scale": scale.detach().clone()}
        if zero_point is not None:
            uncompressed["weight_zero_point"] = zero_point.detach()
        if global_scale is not None:
            uncompressed["weight_global_scale"] = global_scale.detach().clone().reshape(1)
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name, tensor in compressor.compress(uncompressed, scheme).items():
            self.register_buffer(name, tensor.contiguous())

    @classmethod
    def empty(
        cls,
        out_features: int,
        bias: bool,
        weight_args: QuantizationArgs,
        input_transform: StarQuantInputTransform,
        owns_transform: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> StarQuantLinear:
        """A module with every buffer allocated (on ``device``, uninitialised) in the
        checkpoint's layout, for a loader to fill by name."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight_args = weight_args
        layer._attach_transform(input_transform, owns_transform)
        in_features = input_transform.sgat_channel_scale.shape[0]
        layout = compressed_weight_layout(out_features, in_features, weight_args, dtype)
        if bias:
            layout["bias"] = ((out_features,), dtype)
        for name, (shape, tensor_dtype) in layout.items():
            layer.register_buffer(name, torch.empty(shape, dtype=tensor_dtype, device=device))
        if not bias:
            layer.register_buffer("bias", None)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sgat: SGATResult,
        weight_args: QuantizationArgs,
        input_transform: StarQuantInputTransform,
        owns_transform: bool = True,
        weight_clip_rows: slice | None = None,
        weight_global_scale: torch.Tensor | None = None,
    ) -> StarQuantLinear:
        """Quantize ``linear`` under a fitted SGAT by RTN with the fitted per-row weight clip
        (the scale stored in the linear's dtype; equal to ``fake_quantize_weight`` in float32).

        When one SGAT serves several linears (q/k/v), ``weight_clip_rows`` selects this
        linear's rows of ``sgat.weight_clip``, e.g. ``slice(q_out, q_out + k_out)`` for k,
        and NVFP4's ``weight_global_scale`` is the group's (``group_weight_global_scale``; by
        default this weight's own).
        """
        weight_clip = sgat.weight_clip[weight_clip_rows or slice(None)]
        dtype = linear.weight.dtype
        if weight_clip.shape[0] != linear.out_features:
            raise ValueError(
                f"Got {weight_clip.shape[0]} weight clip ratios for a linear with "
                f"{linear.out_features} outputs; pass weight_clip_rows selecting this linear's "
                "rows of the concatenated weight the SGAT was fitted on."
            )
        with torch.no_grad():
            weight_t = sgat.transformed_weight(linear.weight.float())
            if is_nvfp4(weight_args) and weight_global_scale is None:
                weight_global_scale = stored_global_scale(weight_t, dtype)
            weight_q = fake_quantize_weight(weight_t, weight_args, weight_clip,
                                            weight_global_scale)
            scale, zero_point = weight_qparams(weight_t, weight_args, weight_clip,
                                               weight_global_scale)
        return cls(weight_q, linear.bias, input_transform, owns_transform=owns_transform,
                   weight_args=weight_args, weight_scale=scale.to(dtype),
                   weight_zero_point=zero_point,
                   weight_global_scale=None if weight_global_scale is None
                   else weight_global_scale.to(dtype))

    @property
    def weight_format(self) -> str:
        """The compressed-tensors format of the stored weight ("dense" = float weight)."""
        return "dense" if self.weight_args is None else weight_format(self.weight_args)

    def compressed_weight(self) -> dict[str, torch.Tensor]:
        """The weight tensors under compressed-tensors' local names (``weight_packed``, ...)."""
        names = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point",
                 "weight_global_scale")
        return {name: self._buffers[name] for name in names if name in self._buffers}

    def dequantized_weight(self) -> torch.Tensor:
        """``[out, d]`` float32, decompressed by compressed-tensors' own compressor."""
        if self.weight_args is None:
            return self._buffers["weight"]
        if is_nvfp4(self.weight_args):
            return nvfp4_dequantize(self.weight_packed, self.weight_scale,
                                    self.weight_global_scale)
        scheme = weight_scheme(self.weight_args)
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        # float32 scale: codes * scale is then exact whatever dtype the scale is stored in
        # (MX scales are uint8 exponents, decoded by the compressor; codes * 2^k is exact)
        stored = self.compressed_weight()
        if self.weight_scale.is_floating_point():
            stored["weight_scale"] = self.weight_scale.float()
        return compressor.decompress(stored, scheme)["weight"].float()

    def __getattr__(self, name: str) -> Any:
        if name == "weight" and "weight_packed" in self.__dict__.get("_buffers", {}):
            return self.dequantized_weight()
        return super().__getattr__(name)

    def integer_path_refusal(self) -> str | None:
        """Why the exact integer GEMM does not cover this layer (then the reference path runs),
        or None."""
        weight_args, act_args = self.weight_args, self.act_args
        if weight_args is None:
            return "a dense float weight (no integer codes)"
        if is_float(weight_args) or is_float(act_args):
            return ("FP8/FP4 weights or activations (no integer codes; the CPU has no FP8 or "
                    "FP4 GEMM)")
        if not weight_args.symmetric:
            return "asymmetric weights (the integer GEMM has no zero-point term)"
        if weight_args.strategy != "channel":
            return (f"weight strategy {weight_args.strategy!r} (the integer GEMM rescales by "
                    "one scale per output channel)")
        if act_args is None or not act_args.symmetric or act_args.num_bits > 8 \
                or act_args.strategy != "token":
            return "activations other than symmetric per-token int of at most 8 bits"
        if weight_args.num_bits == 4:
            return int4_weight_readable()
        return None

    def prepack_refusal(self) -> tuple[str, str] | None:
        """Why ``prepack()`` cannot serve this layer: ``(reason, message)``, or None."""
        refusal = self.integer_path_refusal()
        if refusal is not None:
            return "prepack-reference", f"the layer runs the reference path ({refusal})."
        return prepack_refusal(self.weight_scale.device, self.weight_args.num_bits == 4)

    def gemm_kernel(self, tokens: int) -> str:
        """The kernel a forward over ``tokens`` tokens multiplies on: ``"reference"``
        (dequantize-and-matmul), ``"onednn prepacked"`` (after ``prepack()``) or
        ``integer_kernel``'s choice for this device and shape (``"int_mm"``, ``"onednn"``,
        ``"float32"``), taking the largest code the activation bits allow. For benchmarks and
        reports, which otherwise could only infer it from the logs."""
        if not self.integer_gemm or self.integer_path_refusal() is not None:
            return "reference"
        if self._prepacked is not None:
            return "onednn prepacked"
        weight = self._buffers.get("weight_packed", self._buffers.get("weight"))
        d = self.transform.sgat_channel_scale.shape[0]
        max_abs_code = 2 ** (self.act_args.num_bits - 1)
        return integer_kernel(weight.device, tokens, d, weight.shape[0],
                              weight.dtype == torch.int32, max_abs_code)

    def prepack(self) -> int:
        """Keep the weight also as signed int8 codes in oneDNN's blocked layout, made once, for
        the integer path to multiply with (``integer_gemm.prepacked_gemm``: the same numbers,
        bit for bit, without decoding 4-bit nibbles or re-laying the weight out per call).
        The stored tensors stay (they are what ``state_dict`` saves); ``.to()``, loading a
        state dict, ``copy.deepcopy`` and pickling drop the copy. Returns the bytes it costs
        (one per weight)."""
        refusal = self.prepack_refusal()
        if refusal is not None:
            raise ValueError(f"Cannot prepack this layer's weight: {refusal[1]}")
        weight = self._buffers.get("weight_packed", self._buffers.get("weight"))
        d = self.transform.sgat_channel_scale.shape[0]
        self._prepacked = prepack_weight(weight, d)
        return self.weight_scale.shape[0] * d

    def _apply(self, *args: Any, **kwargs: Any) -> StarQuantLinear:
        self._prepacked = None  # .to() / .float() replace the stored weight
        super()._apply(*args, **kwargs)
        # model.to(dtype) casts every float tensor, FP8 codes and e4m3 block scales too; their
        # values are exact in any wider float, so this restores the stored bytes
        fp8_names = ("weight",) if is_fp8(self.weight_args) \
            else ("weight_scale",) if is_nvfp4(self.weight_args) else ()
        for name in fp8_names:
            tensor = self._buffers.get(name)
            if tensor is not None and tensor.dtype != _FP8:
                self._buffers[name] = tensor.to(_FP8)
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._prepacked = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_prepacked", None)  # oneDNN's opaque layout cannot be copied or pickled
        return state

    def _integer_gemm(self, codes: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``codes: int8 [..., d]`` and their per-token scales (``[...]`` or ``[..., 1]``) ->
        ``[..., out]`` in ``dtype``, computed in float32 by the exact integer GEMM."""
        rows, scales = codes.reshape(-1, codes.shape[-1]), scale.reshape(-1, 1)
        if self._prepacked is not None:
            y = prepacked_gemm(rows, scales, self._prepacked, self.weight_scale, bias)
        else:
            weight = self._buffers.get("weight_packed", self._buffers.get("weight"))
            y = int_gemm(rows, scales, weight, self.weight_scale.float(), bias)
        return y.reshape(*codes.shape[:-1], -1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [batch, seq, d]`` -> ``[batch, seq, out]`` in ``x``'s dtype (computed in
        float32); any mix of token states. The integer path unless ``integer_gemm`` is off or
        ``integer_path_refusal()`` names a reason (logged once per reason)."""
        bias = None if self.bias is None else self.bias.float()
        if self.integer_gemm:
            refusal = self.integer_path_refusal()
            if refusal is None:
                codes, scale = self.transform.activation_codes(x)
                if self._prepacked is not None:  # nothing decoded per call: chunks pay off
                    return in_token_chunks(
                        lambda rows, scales: self._integer_gemm(rows, scales, bias, x.dtype),
                        codes, scale.squeeze(-1), GEMM_CHUNK_TOKENS)
                return self._integer_gemm(codes, scale, bias, x.dtype)
            log_once(f"reference:{refusal}", f"STaR-Quant linears with {refusal} run the "
                     "dequantize-and-matmul reference path instead (same result, slower).")
        y = F.linear(self.transform(x), self.dequantized_weight().float(), bias)
        return y.to(x.dtype)


def stored_global_scale(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NVFP4's ``weight_global_scale`` of ``weight`` (``[out, in]``, or any tensor with its
    range, e.g. the ``max|W|`` of each linear of a fused q/k/v or gate/up group, which vLLM
    loads with one global scale) as a checkpoint in ``dtype`` stores it, in float32: the
    quantizer uses the stored value, so a model cast to another dtype or reloaded computes
    the same codes."""
    return nvfp4_global_scale(weight).to(dtype).float()


def nvfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor
                     ) -> torch.Tensor:
    """``[out, in]`` float32 of an ``nvfp4-pack-quantized`` weight: codes times ``s / g`` per
    16 input columns, the fake quantizer's arithmetic. compressed-tensors' decompressor
    computes in bfloat16, which rounds ``s / g``; this stays exact."""
    out_features, half = packed.shape
    codes = unpack_fp4_from_uint8(packed, out_features, 2 * half, dtype=torch.float32)
    block = scale.float() / global_scale.float()
    return (codes.unflatten(1, (scale.shape[1], -1)) * block.unsqueeze(-1)).flatten(1)


def prepack_weights(model: nn.Module) -> int:
    """``prepack()`` every ``StarQuantLinear`` of ``model``: the fastest exact layout for the
    integer GEMM on x86 CPUs with oneDNN (``docs/results.md``), at one byte per weight on top
    of the stored codes. Checks every layer before changing any; returns the bytes added."""
    layers = [module for module in model.modules() if isinstance(module, StarQuantLinear)]
    for layer in layers:
        refusal = layer.prepack_refusal()
        if refusal is not None:
            raise ValueError(
                f"Cannot prepack the weights: {refusal[1]} The model runs as it is (exact, "
                "stored layout); call prepack_weights only where every layer can use it."
            )
    return sum(layer.prepack() for layer in layers)

