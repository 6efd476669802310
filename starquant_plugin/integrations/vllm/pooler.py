"""The per-position pooler of the diffusion LMs: what a denoising sampler needs, not logits.

A masked-diffusion sampler reads, at every position, the top token and its probability
(LLaDA's low-confidence remasking, Dream's maskgit_plus) or the top two probabilities
(Dream's topk_margin). Sending full ``[seq, vocab]`` logits back from the engine costs
``seq * vocab * 4`` bytes per canvas (0.5 GB for LLaDA's 126k vocabulary at 1k positions),
so the pooler returns per position the top-``k`` token ids and their log-probabilities:
``[seq, 2k]`` float32, ids in columns ``:k`` (exact in float32 below 2^24), log-probs in
``k:``. ``k = 0`` returns the full ``[seq, vocab]`` log-probabilities instead (exact for any
sampler setting, e.g. temperature > 0 or the entropy rule).

Rows are position-aligned: row ``i`` predicts token ``i``. Dream's network predicts token
``i`` at output ``i - 1``; its rows are realigned per request exactly as
``starquant_plugin.models.families.token_logits`` does (position 0 reuses its own output).
"""

from __future__ import annotations

from collections.abc import Callable, Set

import torch
from vllm.model_executor.layers.pooler.tokwise import AllPool, TokenPooler, TokenPoolerHead
from vllm.pooling_params import PoolingParams

TOP_K_ATTRIBUTE = "starquant_top_k"
"""Config attribute (set with ``hf_overrides={"starquant_top_k": k}``) choosing ``k``."""

DEFAULT_TOP_K = 2


def realign_shifted(rows: torch.Tensor) -> torch.Tensor:
    """``[seq, ...]`` network outputs where output ``i - 1`` predicts token ``i`` ->
    position-aligned rows (``families.token_logits`` for one unbatched sequence)."""
    return torch.cat([rows[:1], rows[:-1]], dim=0)


def position_statistics(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``logits: [seq, vocab]`` -> ``[seq, 2 top_k]`` (ids, log-probs) or, for ``top_k = 0``,
    ``[seq, vocab]`` log-probs; float32 either way."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if top_k == 0:
        return log_probs
    values, ids = log_probs.topk(top_k, dim=-1)
    return torch.cat([ids.float(), values], dim=-1)


class DiffusionTokenHead(TokenPoolerHead):
    """Turns one request's final hidden states ``[seq, hidden]`` into per-position
    statistics (see the module docstring) for the ``token_classify`` task."""

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], top_k: int,
                 shifted_logits: bool) -> None:
        super().__init__()
        if top_k < 0:
            raise ValueError(f"Got {TOP_K_ATTRIBUTE}={top_k}; expected k >= 1 (top-k "
                             "statistics) or 0 (full log-probabilities).")
        self.logits_fn = logits_fn
        self.top_k = top_k
        self.shifted_logits = shifted_logits

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, shifted_logits={self.shifted_logits}"

    def get_supported_tasks(self) -> Set[str]:
        return {"token_classify"}

    def forward_chunk(self, pooled_data: torch.Tensor | None,
                      pooling_param: PoolingParams) -> torch.Tensor | None:
        if pooled_data is None:  # an unfinished chunk (chunked prefill)
            return None
        stats = position_statistics(self.logits_fn(pooled_data), self.top_k)
        return realign_shifted(stats) if self.shifted_logits else stats


def diffusion_pooler(logits_fn: Callable[[torch.Tensor], torch.Tensor], top_k: int,
                     shifted_logits: bool) -> TokenPooler:
    """vLLM's all-token pooler with the diffusion head."""
    return TokenPooler(pooling=AllPool(),
                       head=DiffusionTokenHead(logits_fn, top_k, shifted_logits))
