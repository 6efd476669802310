"""``StarQuantLinearMethod``: the STaR input transform in front of a quantized GEMM.

One method per fused vLLM linear (``qkv_proj``, ``o_proj``, ``gate_up_proj``,
``down_proj``), i.e. per ``starquant.input_groups`` entry. ``apply`` does, for the layer
input ``x: [tokens, d_local]``::

    x   = all_gather(x)  if the layer is row-parallel (TP > 1), else x     # [tokens, d]
    x_s = SGAT(TAC(x), state)        state = input_ids == mask_id, per token (token_state)
    y   = GEMM(Q_a(x_s, clip[state])[:, this rank's columns], W_local) + bias

with the transform and the quantizer from ``starquant_plugin.method`` (the transformers
runtime's math, not a copy) and the GEMM from ``gemm.py``.

Tensor parallelism. ``L (x) R``, ``V`` and the per-token activation scale mix or read all
``d`` input channels, but a row-parallel layer (o_proj, down_proj) holds ``d / tp`` of them
per rank. Design: the STaR tensors are replicated on every rank (``BasevLLMParameter``, loaded
whole; they are ``O(n1^2 + n2^2 + d k)``, small next to the weight shard), the row-parallel
input is all-gathered (one ``[tokens, d]`` all-gather per row-parallel layer), every rank
computes the same ``x_s`` and per-token scale over the full row, and keeps its own input
columns for its weight shard; vLLM's usual all-reduce then sums the partial outputs. This is
the TP = 1 math (up to the all-reduce's float summation order); a shard-local transform
chosen at quantization time would avoid the all-gather but change the method.
Column-parallel layers (qkv, gate_up) see the full input already; their weights shard by
output rows as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import BasevLLMParameter

from starquant_plugin.integrations.vllm.gemm import choose_gemm
from starquant_plugin.integrations.vllm.token_state import current_mask_state
from starquant_plugin.method.input_transform import (
    GEMM_CHUNK_TOKENS,
    in_token_chunks,
    star_transform,
)
from starquant_plugin.method.quantizers import is_nvfp4


def star_tensor_shapes(group: dict[str, Any], act_args: QuantizationArgs
                       ) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the STaR tensors of one input group (``docs/format.md``)."""
    d, k = group["in_features"], group["exclusive_width"]
    n1, n2 = group["factors"]
    shapes: dict[str, tuple[int, ...]] = {"sgat_channel_scale": (d,), "sgat_left": (n1, n1),
                                          "sgat_right": (n2, n2), "sgat_act_clip": (2,)}
    if k:
        shapes["sgat_exclusive"] = (d, 2 * k)
    if is_nvfp4(act_args):
        shapes["sgat_act_global_scale"] = (1,)
    if group["tac_group_size"] is not None:
        g = group["tac_group_size"]
        shapes |= {"tac_matrices": (d // g, g, g), "tac_bias": (d,)}
    return shapes


@register_weight_loader_v2_supported_method
class StarQuantLinearMethod(LinearMethodBase):
    """STaR transform + activation-quantized GEMM for one fused vLLM linear (see module)."""

    def __init__(self, quant_config: Any, group: dict[str, Any], prefix: str) -> None:
        self.quant_config = quant_config
        self.group = group
        self.prefix = prefix
        self.gemm = None

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if input_size != self.group["in_features"]:
            raise ValueError(
                f"{self.prefix} reads {input_size} features but the checkpoint's input group "
                f"{self.group['linears']} has in_features={self.group['in_features']}; the "
                "checkpoint does not fit this model."
            )
        weight_loader = extra_weight_attrs["weight_loader"]
        for name, shape in star_tensor_shapes(self.group, self.quant_config.act_args).items():
            layer.register_parameter(name, BasevLLMParameter(
                data=torch.empty(shape, dtype=params_dtype), weight_loader=weight_loader))
        for name in ("sgat_exclusive", "tac_matrices", "tac_bias", "sgat_act_global_scale"):
            if not hasattr(layer, name):
                setattr(layer, name, None)
        row_parallel_shard = input_size_per_partition != input_size
        layer.star_tp_rank = get_tensor_model_parallel_rank() if row_parallel_shard else 0
        layer.star_row_parallel_shard = row_parallel_shard
        config = self.quant_config
        self.gemm = choose_gemm(config.weight_args, config.act_args, input_size_per_partition,
                                output_partition_sizes, params_dtype, row_parallel_shard,
                                self.prefix)
        if self.gemm.name == "torch":
            self.gemm.create_weights(layer, input_size_per_partition, output_partition_sizes,
                                     params_dtype, weight_loader)
        else:
            self.gemm.create_weights(layer, input_size, output_size, input_size_per_partition,
                                     output_partition_sizes, params_dtype, weight_loader)
        layer.star_gemm = self.gemm.name

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for name in star_tensor_shapes(self.group, self.quant_config.act_args):
            # the transform computes in the model's dtype (``star_transform``); NVFP4's
            # activation global scale goes to the quantizer in float32, as in transformers
            param = getattr(layer, name)
            dtype = torch.float32 if name == "sgat_act_global_scale" else param.dtype
            param.data = param.data.to(dtype).contiguous()
        self.gemm.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [tokens, d_local]`` -> ``[tokens, out_local]`` in ``x``'s dtype."""
        d_local = x.shape[-1]
        if layer.star_row_parallel_shard and get_tensor_model_parallel_world_size() > 1:
            x = tensor_model_parallel_all_gather(x.contiguous(), dim=-1)
        start = layer.star_tp_rank * d_local
        columns = slice(start, start + d_local)

        def transformed_gemm(tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            return self.gemm.apply(layer, *star_transform(layer, tokens, states), bias, columns,
                                   x.dtype)

        # a step's canvases go through in chunks (at canvas 1024 x batch 4 every linear
        # would otherwise transform, quantize and multiply 4096 tokens at once)
        return in_token_chunks(transformed_gemm, x, current_mask_state(x.shape[0]).long(),
                               GEMM_CHUNK_TOKENS)
