"""The published config.json of LLaDA-8B-Base and Dream-v0-Base-7B, key for key."""

LLADA_8B = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "vocab_size": 126464,
    "weight_tying": False,
}

DREAM_7B = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    },
    "bos_token_id": 151665,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def llada_8b_layout() -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the published LLaDA-8B safetensors."""
    d, hidden, vocab = 4096, 12288, 126464
    layout = {"model.transformer.wte.weight": (vocab, d)}
    for n in range(32):
        prefix = f"model.transformer.blocks.{n}."
        layout |= {
            prefix + "attn_norm.weight": (d,),
            prefix + "ff_norm.weight": (d,),
            prefix + "q_proj.weight": (d, d),
            prefix + "k_proj.weight": (d, d),
            prefix + "v_proj.weight": (d, d),
            prefix + "attn_out.weight": (d, d),
            prefix + "ff_proj.weight": (hidden, d),
            prefix + "up_proj.weight": (hidden, d),
            prefix + "ff_out.weight": (d, hidden),
        }
    layout |= {"model.transformer.ln_f.weight": (d,), "model.transformer.ff_out.weight": (vocab, d)}
    return layout


def dream_7b_layout() -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the published Dream-v0-7B safetensors."""
    d, hidden, vocab, kv = 3584, 18944, 152064, 4 * 128
    layout = {"model.embed_tokens.weight": (vocab, d)}
    for n in range(28):
        prefix = f"model.layers.{n}."
        layout |= {
            prefix + "input_layernorm.weight": (d,),
            prefix + "post_attention_layernorm.weight": (d,),
            prefix + "self_attn.q_proj.weight": (d, d),
            prefix + "self_attn.q_proj.bias": (d,),
            prefix + "self_attn.k_proj.weight": (kv, d),
            prefix + "self_attn.k_proj.bias": (kv,),
            prefix + "self_attn.v_proj.weight": (kv, d),
            prefix + "self_attn.v_proj.bias": (kv,),
            prefix + "self_attn.o_proj.weight": (d, d),
            prefix + "mlp.gate_proj.weight": (hidden, d),
            prefix + "mlp.up_proj.weight": (hidden, d),
            prefix + "mlp.down_proj.weight": (d, hidden),
        }
    layout |= {"model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    return layout
