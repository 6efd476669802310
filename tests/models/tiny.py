"""Small random LLaDA and Dream models for fast tests (the trained ones live in assets/)."""

import torch

from starquant_plugin.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

MASK_ID = 63
IDS = {"mask_token_id": MASK_ID, "eos_token_id": 1, "pad_token_id": 1, "bos_token_id": 0}


def tiny_llada(seed: int = 0) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig(
        d_model=64, n_heads=1, n_kv_heads=1, n_layers=2, mlp_hidden_size=128, vocab_size=64,
        embedding_size=64, **IDS)).eval()


def tiny_dream(seed: int = 0) -> DreamModel:
    torch.manual_seed(seed)
    return DreamModel(DreamConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_window_layers=2, **IDS)).eval()
