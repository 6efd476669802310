"""Dream configuration: Qwen2's keys under model_type ``Dream`` (Dream-org/Dream-v0-*-7B)."""

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class DreamConfig(Qwen2Config):
    """Dream is Qwen2.5 retrained as a masked diffusion LM; its config.json is Qwen2's plus
    ``mask_token_id``. Defaults are Dream-v0-7B's."""

    model_type = "Dream"

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    max_window_layers: int = 28
    use_sliding_window: bool = False
    sliding_window: int | None = None
    use_cache: bool = False
    # No default: a config without it must fail, not inherit the 7-8B model's id (151666).
    mask_token_id: int | None = None
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151665
    eos_token_id: int | list[int] | None = 151643

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None and "rope_theta" not in kwargs:
            kwargs["rope_theta"] = 1_000_000.0
        super().__post_init__(**kwargs)


__all__ = ["DreamConfig"]
