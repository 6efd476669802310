"""Dream for transformers 5: Qwen2's decoder layers made bidirectional, hub parameter names.

``DreamModel.forward`` returns the network's raw logits, as the hub model does: the prediction
for position ``i`` sits at ``i - 1``. The one place that realigns them is
``starquant_plugin.models.families.token_logits``.
"""

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm

from starquant_plugin.models.dream.configuration_dream import DreamConfig
from starquant_plugin.models.pretrained import DLLMPreTrainedModel
from starquant_plugin.models.rotary import RotaryEmbedding, bidirectional_attention_mask


class DreamDecoderLayer(Qwen2DecoderLayer):
    """Qwen2's decoder layer with bidirectional attention."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn.is_causal = False


class DreamBaseModel(nn.Module):
    """The ``model`` submodule: ``embed_tokens``, ``layers``, ``norm`` as on the hub."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.rotary_emb = RotaryEmbedding(head_dim, config.rope_parameters["rope_theta"])

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids: [batch, seq] -> final hidden states [batch, seq, hidden]."""
        hidden_states = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(hidden_states)
        mask = bidirectional_attention_mask(attention_mask)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, attention_mask=mask, position_embeddings=position_embeddings
            )
        return self.norm(hidden_states)


class DreamPreTrainedModel(DLLMPreTrainedModel):
    config_class = DreamConfig
    config: DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, Qwen2RMSNorm):
            nn.init.ones_(module.weight)


class DreamModel(DreamPreTrainedModel):
    """Dream with its untied ``lm_head``. Logits are shifted (see the module docstring)."""

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        return CausalLMOutputWithPast(logits=self.lm_head(self.model(input_ids, attention_mask)))


__all__ = ["DreamModel", "DreamPreTrainedModel", "DreamDecoderLayer"]
