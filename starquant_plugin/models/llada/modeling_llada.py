"""LLaDA for transformers 5, with the hub checkpoint's exact parameter names.

The hub's remote code (an OLMo fork) does not run on transformers 5; this is a clean
re-implementation of its ``block_type: llama`` path. Attention is a method of the block (as on
the hub, there is no ``self_attn`` container) and goes through ``ALL_ATTENTION_FUNCTIONS`` so
tooling can hook it. Attention is fully bidirectional.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from starquant_plugin.models.llada.configuration_llada import LLaDAConfig
from starquant_plugin.models.pretrained import DLLMPreTrainedModel
from starquant_plugin.models.rotary import RotaryEmbedding, bidirectional_attention_mask


class LLaDALlamaBlock(nn.Module):
    """One LLaDA decoder block: pre-norm attention and SwiGLU MLP, flat parameter names."""

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.n_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        d, hidden = config.d_model, config.mlp_hidden_size or config.mlp_ratio * config.d_model
        bias = config.include_bias or config.include_qkv_bias
        self.attn_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_key_value_heads * self.head_dim, bias=bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)
        self.act = ACT2FN[config.activation_type]

    def attention(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden_states: [batch, seq, d] -> attention output before ``attn_out``."""
        batch, seq, _ = hidden_states.shape
        shape = (batch, seq, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling
        )
        return output.reshape(batch, seq, -1).contiguous()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn = self.attention(self.attn_norm(hidden_states), position_embeddings, attention_mask)
        hidden_states = hidden_states + self.attn_out(attn)
        normed = self.ff_norm(hidden_states)
        return hidden_states + self.ff_out(self.act(self.ff_proj(normed)) * self.up_proj(normed))


class LLaDAModel(nn.Module):
    """The ``model`` submodule: holds ``transformer`` exactly as the hub's module tree does."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.embedding_size or config.vocab_size, config.d_model),
                "blocks": nn.ModuleList(
                    [LLaDALlamaBlock(config, i) for i in range(config.n_layers)]
                ),
                "ln_f": LlamaRMSNorm(config.d_model, eps=config.rms_norm_eps),
                "ff_out": nn.Linear(
                    config.d_model, config.embedding_size or config.vocab_size, bias=False
                ),
            }
        )
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids: [batch, seq] -> logits [batch, seq, vocab]. No data-dependent branches,
        so llm-compressor's sequential pipeline can trace it."""
        hidden_states = self.transformer.wte(input_ids)
        position_embeddings = self.rotary_emb(hidden_states)
        mask = bidirectional_attention_mask(attention_mask)
        for block in self.transformer.blocks:
            hidden_states = block(hidden_states, position_embeddings, mask)
        return self.transformer.ff_out(self.transformer.ln_f(hidden_states))


class LLaDAPreTrainedModel(DLLMPreTrainedModel):
    config_class = LLaDAConfig
    config: LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """LLaDA with its (untied) LM head at ``model.transformer.ff_out``.

    ``forward`` returns position-aligned logits: ``logits[:, i]`` predicts token ``i``.
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        return CausalLMOutputWithPast(logits=self.model(input_ids, attention_mask))


__all__ = ["LLaDAModelLM", "LLaDAPreTrainedModel", "LLaDALlamaBlock"]
