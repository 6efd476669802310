"""SDPA with K and V fake-quantized per head, plugged in through ``AttentionInterface``.

Both model families route attention through ``ALL_ATTENTION_FUNCTIONS``, so quantizing the
Softmax-V path needs no model edits: a module opts in by carrying ``kv_bits < 16``. Keys are
quantized after RoPE (what ``Q K^T`` consumes); queries and probabilities stay 16 bit.

A module that also carries ``k_rotation = True`` rotates queries and keys per head by the
normalised Hadamard ``H`` (``method.transforms.hadamard``) after RoPE and before the key
quantizer, as QuaRot does: ``(q H)(k H)^T = q k^T``, and an outlier channel of K is spread
over the head before 4-bit quantization. (V's rotation is folded into the weights.)
"""

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from starquant_plugin.method.quantizers import fake_quantize_kv
from starquant_plugin.method.transforms import hadamard

KV_ATTENTION = "starquant_sdpa"


def kv_quantized_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query/key/value: [batch, heads, seq, head_dim]; K/V quantized when ``module.kv_bits``
    is below 16 (asymmetric, one scale per token and head), after rotating Q and K by the
    per-head Hadamard (in float32) when ``module.k_rotation`` is set."""
    kv_bits = getattr(module, "kv_bits", 16)
    if kv_bits < 16:
        if getattr(module, "k_rotation", False):
            h = hadamard(query.shape[-1]).to(query.device)
            query = (query.float() @ h).to(query.dtype)
            key = (key.float() @ h).to(key.dtype)
        key, value = fake_quantize_kv(key, kv_bits), fake_quantize_kv(value, kv_bits)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_kv_quantized_attention() -> str:
    """Make ``kv_quantized_sdpa`` available to transformers as ``KV_ATTENTION`` (idempotent);
    returns that name."""
    if KV_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(KV_ATTENTION, kv_quantized_sdpa)
    return KV_ATTENTION


def use_kv_quantized_attention(model: nn.Module) -> None:
    """Route ``model``'s attention through ``kv_quantized_sdpa`` (idempotent)."""
    model.config._attn_implementation = register_kv_quantized_attention()
