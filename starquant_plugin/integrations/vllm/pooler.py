"""The per-position pooler of the diffusion LMs: what a denoising sampler needs, not logits.

A masked-diffusion sampler reads, at every position still ``[MASK]``, the top token and its
probability (LLaDA's low-confidence remasking, Dream's maskgit_plus) or the top two
probabilities (Dream's topk_margin); what the network predicts at the other positions is
never read. Sending full ``[seq, vocab]`` logits back from the engine costs
``seq * vocab * 4`` bytes per canvas (0.5 GB for LLaDA's 126k vocabulary at 1k positions),
and the LM head at every position is ``seq * vocab * hidden`` multiply-adds per step, so
the pooler applies the head to the masked positions only and returns, per masked position in
position order, the top-``k`` token ids and their log-probabilities: ``[n_masked, 2k]``
float32, ids in columns ``:k`` (exact in float32 below 2^24), log-probs in ``k:``. ``k = 0``
returns the full ``[n_masked, vocab]`` log-probabilities instead (exact for any sampler
setting, e.g. temperature > 0 or the entropy rule). A request with
``PoolingParams(task="token_classify", extra_kwargs={"starquant_all_positions": True})``
gets every position instead (``[seq, ...]``), e.g. to score a whole canvas.

Rows are position-aligned: the row of position ``i`` predicts token ``i``. Dream's network
predicts token ``i`` at output ``i - 1``; its rows are realigned exactly as
``starquant_plugin.models.families.token_logits`` does (position 0 reuses its own output).
The masked positions come from the request's own token ids (vLLM's ``prompt_token_ids``,
asked for through ``requires_token_ids``).
"""

from __future__ import annotations

from collections.abc import Callable, Set

import torch
from vllm.model_executor.layers.pooler import PoolingParamsUpdate
from vllm.model_executor.layers.pooler.tokwise import AllPool, TokenPooler, TokenPoolerHead
from vllm.pooling_params import PoolingParams
from vllm.tasks import PoolingTask
from vllm.v1.pool.metadata import PoolingMetadata

TOP_K_ATTRIBUTE = "starquant_top_k"
"""Config attribute (set with ``hf_overrides={"starquant_top_k": k}``) choosing ``k``."""

DEFAULT_TOP_K = 2

ALL_POSITIONS = "starquant_all_positions"
"""``PoolingParams.extra_kwargs`` key: a request that sets it true gets every position."""


def wants_all_positions(params: PoolingParams) -> bool:
    """Whether the request asked for every position (``ALL_POSITIONS``)."""
    return bool((params.extra_kwargs or {}).get(ALL_POSITIONS, False))


def source_rows(positions: torch.Tensor, shifted_logits: bool) -> torch.Tensor:
    """The network output rows that predict the tokens at ``positions`` (``[n]``, sorted):
    the positions themselves, or for a shifted network (Dream) the outputs one to the left,
    position 0 its own (``families.token_logits``)."""
    return (positions - 1).clamp_min(0) if shifted_logits else positions


def position_statistics(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``logits: [n, vocab]`` -> ``[n, 2 top_k]`` (ids, log-probs) or, for ``top_k = 0``,
    ``[n, vocab]`` log-probs; float32 either way."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if top_k == 0:
        return log_probs
    values, ids = log_probs.topk(top_k, dim=-1)
    return torch.cat([ids.float(), values], dim=-1)


class DiffusionTokenHead(TokenPoolerHead):
    """Turns one request's final hidden states ``[seq, hidden]`` and token ids into
    statistics at its masked (or all) positions (see the module docstring) for the
    ``token_classify`` task."""

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], top_k: int,
                 shifted_logits: bool, mask_token_id: int) -> None:
        super().__init__()
        if top_k < 0:
            raise ValueError(f"Got {TOP_K_ATTRIBUTE}={top_k}; expected k >= 1 (top-k "
                             "statistics) or 0 (full log-probabilities).")
        self.logits_fn = logits_fn
        self.top_k = top_k
        self.shifted_logits = shifted_logits
        self.mask_token_id = mask_token_id

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, shifted_logits={self.shifted_logits}, "
                f"mask_token_id={self.mask_token_id}")

    def get_supported_tasks(self) -> Set[str]:
        return {"token_classify"}

    def forward(self, pooled_data: list[torch.Tensor | None],
                pooling_metadata: PoolingMetadata) -> list[torch.Tensor | None]:
        token_ids = pooling_metadata.get_prompt_token_ids_cpu()
        return [self.statistics(hidden, ids, wants_all_positions(params))
                for hidden, ids, params in zip(pooled_data, token_ids,
                                               pooling_metadata.pooling_params, strict=True)]

    def forward_chunk(self, pooled_data: torch.Tensor | None,
                      pooling_param: PoolingParams) -> torch.Tensor | None:
        raise NotImplementedError("DiffusionTokenHead needs the token ids: call forward.")

    def statistics(self, hidden: torch.Tensor | None, token_ids: torch.Tensor,
                   all_positions: bool = False) -> torch.Tensor | None:
        """``[n_masked or seq, 2k or vocab]`` for one request; None for an unfinished chunk
        (chunked prefill)."""
        if hidden is None:
            return None
        if all_positions:
            positions = torch.arange(hidden.shape[0])
        else:
            positions = torch.nonzero(token_ids == self.mask_token_id).reshape(-1)
        rows = source_rows(positions, self.shifted_logits).to(hidden.device)
        return position_statistics(self.logits_fn(hidden[rows]), self.top_k)


class DiffusionTokenPooler(TokenPooler):
    """vLLM's all-token pooler, asking the runner for each request's token ids."""

    def get_pooling_updates(self, task: PoolingTask) -> PoolingParamsUpdate:
        return super().get_pooling_updates(task) | PoolingParamsUpdate(requires_token_ids=True)


def diffusion_pooler(logits_fn: Callable[[torch.Tensor], torch.Tensor], top_k: int,
                     shifted_logits: bool, mask_token_id: int) -> TokenPooler:
    """vLLM's all-token pooling with the diffusion head."""
    return DiffusionTokenPooler(
        pooling=AllPool(),
        head=DiffusionTokenHead(logits_fn, top_k, shifted_logits, mask_token_id))
