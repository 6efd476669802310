"""LLaDA configuration with every key of the hub's ``config.json`` (GSAI-ML/LLaDA-8B-*)."""

from transformers import PreTrainedConfig


class LLaDAConfig(PreTrainedConfig):
    """Configuration of LLaDA, an OLMo-derived masked diffusion LM.

    Keys and defaults follow the hub's LLaDA-8B ``config.json`` so that a hub directory loads
    without remote code. ``use_cache`` exists (the hub config lacks it and transformers 5
    requires it); diffusion models never cache.
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    flash_attention: bool = False
    attention_dropout: float = 0.0
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-5
    attention_layer_norm_with_affine: bool = True
    max_sequence_length: int = 4096
    include_qkv_bias: bool = False
    include_bias: bool = False
    bias_for_layer_norm: bool = False
    scale_logits: bool = False
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    weight_tying: bool = False
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = 126080
    # No default: a config without it must fail, not inherit the 7-8B model's id (126336).
    mask_token_id: int | None = None
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False
    tie_word_embeddings: bool = False

    @property
    def num_key_value_heads(self) -> int:
        """KV heads; the hub leaves ``n_kv_heads`` null for multi-head attention."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads


__all__ = ["LLaDAConfig"]
