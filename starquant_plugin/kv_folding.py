"""K/V transforms folded into a decoder block's weights before its linears are quantized.

Both leave the FP block's function unchanged (up to the weights' rounding) and exist for the
4-bit K/V quantizer after RoPE, which sees one scale per (token, head):

* the value rotation (QuaRot): every value head rotated by the normalised Hadamard, in
  ``v_proj``'s rows and the output projection's columns (K's rotation is applied at run time,
  after RoPE, by the attention: ``models/attention.py``);
* key smoothing (SmoothAttention, QServe): K's outlier channels divided out of ``k_proj``'s
  rows and multiplied into the query rows that read them; Q is not quantized, so the outlier
  costs nothing there. The scales come from K on the calibration rows and need no tensor in
  the checkpoint or the runtimes.

The math is in ``method.transforms``; this module finds the projections in a block.
"""

from __future__ import annotations

import torch
from compressed_tensors.offload import update_offload_parameter
from torch import nn
from torch.nn import functional as F

from starquant_plugin.method.transforms import (
    hadamard,
    key_smoothing_scales,
    rotate_value_heads,
    smooth_keys,
)
from starquant_plugin.models.families import DLLMFamily


def _value_and_output(block: nn.Module, family: DLLMFamily) -> tuple[str, str]:
    value, readers = next(pair for pair in family.scale_pairs
                          if pair[1] == (family.attention_output,))
    return value, readers[0]


def kv_folded_params(block: nn.Module, family: DLLMFamily) -> list[tuple[nn.Module, str]]:
    """The (module, parameter name) pairs the folds change in place (q/k/v projections, the
    output projection), for ``quantize_block`` to restore if the block fails."""
    names = (*family.query_key, *_value_and_output(block, family))
    modules = [block.get_submodule(name) for name in names]
    return [(module, name) for module in modules
            for name, _ in module.named_parameters(recurse=False)]


def _write(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a folded parameter in place. Through ``update_offload_parameter``: under
    compressed-tensors offloading (llm-compressor's sequential pipeline) the parameter read
    is an onloaded copy, and a fold written only there is lost once the pipeline offloads the
    block, e.g. for an output projection that is not quantized in the same run."""
    update_offload_parameter(module, name, value)


def _linears(block: nn.Module, names: tuple[str, ...], option: str) -> list[nn.Linear]:
    modules = [block.get_submodule(name) for name in names]
    if not all(isinstance(m, nn.Linear) for m in modules):
        raise ValueError(
            f"{option} folds a transform into {', '.join(names)}, but one of them is already "
            f"quantized ({', '.join(type(m).__name__ for m in modules)}); quantize the "
            "attention's linear groups in one run."
        )
    return modules


def rotate_value_heads_(block: nn.Module, family: DLLMFamily) -> torch.Tensor:
    """Fold a per-head Hadamard into ``block``'s value projection rows and output projection
    columns in place (QuaRot's V rotation, exact up to the weights' dtype); returns ``H:
    [head_dim, head_dim]``, which maps FP attention outputs into the rotated basis."""
    v_proj, o_proj = _linears(block, _value_and_output(block, family), "kv_rotation")
    head_dim = block.get_submodule(family.attention_module).head_dim
    with torch.no_grad():
        v_weight, v_bias, o_weight = rotate_value_heads(v_proj.weight, v_proj.bias,
                                                        o_proj.weight, head_dim)
        _write(v_proj, "weight", v_weight)
        _write(o_proj, "weight", o_weight)
        if v_bias is not None:
            _write(v_proj, "bias", v_bias)
    return hadamard(head_dim).to(v_proj.weight.device)


@torch.no_grad()
def smooth_keys_(block: nn.Module, family: DLLMFamily, x: torch.Tensor, alpha: float
                 ) -> torch.Tensor:
    """Fold key smoothing into ``block``'s query and key projections in place; ``x: [..., d]``
    is their input on the calibration rows (K's channel maxima come from ``x W_k^T + b``).
    Returns the scales ``[kv_heads * head_dim]``."""
    q_proj, k_proj = _linears(block, family.query_key, "k_smoothing")
    head_dim = block.get_submodule(family.attention_module).head_dim
    keys = F.linear(x.reshape(-1, x.shape[-1]).to(k_proj.weight), k_proj.weight, k_proj.bias)
    scales = key_smoothing_scales(keys.float().abs().amax(0), head_dim, alpha)
    q_weight, q_bias, k_weight, k_bias = smooth_keys(q_proj.weight, q_proj.bias, k_proj.weight,
                                                     k_proj.bias, scales, head_dim)
    for module, name, value in ((q_proj, "weight", q_weight), (q_proj, "bias", q_bias),
                                (k_proj, "weight", k_weight), (k_proj, "bias", k_bias)):
        if getattr(module, name) is not None:
            _write(module, name, value)
    return scales
