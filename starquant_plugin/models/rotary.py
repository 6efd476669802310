"""Rotary position embedding and the bidirectional attention mask shared by both families."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Half-rotation RoPE (``rotate_half`` layout) computed in fp32, as LLaDA and Qwen2 do.

    Written by hand because transformers 5 dropped the "default" entry of
    ``ROPE_INIT_FUNCTIONS`` and each model now carries its own few lines.

    Frequencies are recomputed in fp32 at every call (a few dozen values) instead of kept in a
    buffer, so casting the model to bf16 cannot round them.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: [batch, seq, d] -> (cos, sin), each [1, seq, head_dim]."""
        device = hidden_states.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        positions = torch.arange(hidden_states.shape[1], dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)[None]
        return emb.cos().to(hidden_states.dtype), emb.sin().to(hidden_states.dtype)


def bidirectional_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 2-D ``[batch, seq]`` keep-mask -> 4-D boolean ``[batch, 1, 1, seq]`` key mask.

    Diffusion LMs attend in both directions, so padding is the only thing to mask; a plain
    2-D integer mask would crash SDPA (the Dream trap). ``None`` stays ``None``.
    """
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    return attention_mask.bool()[:, None, None, :]
