"""The denoising driver: the project's LLaDA / Dream samplers, each step one vLLM call.

``denoise(llm, prompts, ...)`` runs ``models.sampling.llada_generate`` or ``dream_generate``
unchanged on a ``VllmDenoiser``, a stand-in for the transformers model whose forward is one
batched ``LLM.encode(..., pooling_task="token_classify")`` over every canvas of the batch.
The same driver serves FP and STaR-Quant checkpoints (the engine decides the numbers).

What comes back from the engine is the pooler's top-``k`` (ids, log-probs) at each masked
position (``pooler.py``). The denoiser puts the rows back in canvas layout (a known token gets
statistics certain of it, which the samplers never read) and hands them to the samplers as
top-k statistics (``sampling.TOP_K_SCORES``): greedy sampling reads the argmax, the top-1
probability (LLaDA's low-confidence remasking, Dream's origin / maskgit_plus) and, for
``k >= 2``, the top-2 margin (Dream's topk_margin) off them, with no ``[batch, seq, vocab]``
tensor on the host. Settings that need the whole distribution (temperature > 0,
classifier-free guidance, Dream's entropy rule) need a model served with
``hf_overrides={"starquant_top_k": 0}`` (full log-probs, handed over as logits); otherwise
the samplers refuse them before the first step.

``shutdown(llm)`` stops the engine when the caller is done (vLLM 0.32's ``LLM`` has no such
method; without it a multiprocess engine often aborts the process at exit).

Limits: every step recomputes every canvas in full (no KV reuse across steps, which
bidirectional attention over a changing canvas does not allow exactly), eager mode.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from starquant_plugin.integrations.vllm.pooler import DEFAULT_TOP_K, TOP_K_ATTRIBUTE
from starquant_plugin.models.families import family_of, mask_token_id
from starquant_plugin.models.sampling import SamplerOutput, dream_generate, llada_generate


def canvas_statistics(canvases: torch.Tensor, pooled: list[torch.Tensor], mask_id: int,
                      top_k: int, vocab_size: int) -> torch.Tensor:
    """The pooler's rows at the ``[MASK]`` positions of each canvas (``pooled[b]: [n_b,
    width]``, position order) back in canvas layout ``[batch, seq, width]``; every other
    position gets its own token with log-probability 0 (top-``k``: the next ``k - 1`` ids at
    ``-inf``; ``k = 0``: ``-inf`` elsewhere), which the samplers never read."""
    tokens = canvases.long()
    if top_k == 0:
        out = torch.full((*tokens.shape, vocab_size), -torch.inf)
        out.scatter_(-1, tokens.unsqueeze(-1), 0.0)
    else:
        ids = (tokens.unsqueeze(-1) + torch.arange(top_k)) % vocab_size
        log_probs = torch.full((*tokens.shape, top_k), -torch.inf)
        log_probs[..., 0] = 0.0
        out = torch.cat([ids.float(), log_probs], dim=-1)
    masked = tokens == mask_id
    rows = torch.cat(pooled).float()
    if rows.shape[0] != int(masked.sum()):
        raise RuntimeError(
            f"The engine returned {rows.shape[0]} rows for {int(masked.sum())} masked "
            "positions; the denoiser's requests must not ask for all positions.")
    out[masked] = rows
    return out


def unshift(aligned: torch.Tensor) -> torch.Tensor:
    """Position-aligned rows -> the network order that ``families.token_logits`` realigns
    (row ``i`` = aligned ``i + 1``; the last row is never read and repeats the last)."""
    return torch.cat([aligned[:, 1:], aligned[:, -1:]], dim=1)


EncodeRows = Callable[[list[list[int]]], list[torch.Tensor]]
"""Canvases (token id lists) -> the pooler's per-position statistics, one tensor per canvas."""


class VllmDenoiser:
    """A diffusion LM behind a vLLM engine, called like the transformers model by the samplers.

    ``config``: the checkpoint's config (``llm.model_config.hf_config``); ``encode``: one engine
    call over canvases (``LLM.encode`` offline, ``AsyncLLM.encode`` in the server).
    ``calls`` counts engine calls (one per denoising step, all canvases batched).
    ``top_k_scores`` (``sampling.TOP_K_SCORES``): the engine's top-k, 0 for full log-probs.
    """

    def __init__(self, config: Any, encode: EncodeRows) -> None:
        self.config = config
        self.encode = encode
        self.top_k_scores: int = getattr(self.config, TOP_K_ATTRIBUTE, DEFAULT_TOP_K)
        self.shifted_logits = family_of(self.config).shifted_logits
        self.mask_id = mask_token_id(self.config)
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> SimpleNamespace:
        """``input_ids: [batch, seq]`` -> ``.logits`` in the network's order, as the
        transformers model returns them: top-k statistics ``[batch, seq, 2k]``, or full
        log-probs ``[batch, seq, vocab]`` when ``top_k_scores`` is 0."""
        if attention_mask is not None:
            raise ValueError("The vLLM denoiser takes equal-length canvases without an "
                             "attention_mask; group prompts by length (denoise does).")
        pooled = self.encode([row.tolist() for row in input_ids])
        self.calls += 1
        stats = canvas_statistics(input_ids, pooled, self.mask_id, self.top_k_scores,
                                  self.config.vocab_size)
        return SimpleNamespace(logits=unshift(stats) if self.shifted_logits else stats)


def run_sampler(denoiser: VllmDenoiser, prompts: list[list[int]] | torch.Tensor,
                **sampler_kwargs: Any) -> SamplerOutput:
    """The checkpoint family's sampler over ``denoiser`` for equal-length ``prompts``."""
    sampler = llada_generate if family_of(denoiser.config).name == "llada" else dream_generate
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise ValueError(
            f"Got prompts of lengths {sorted(lengths)}; the samplers denoise equal-length "
            "canvases in lockstep. Call denoise once per prompt length."
        )
    output = sampler(denoiser, torch.stack(rows), **sampler_kwargs)
    output.engine_calls = denoiser.calls
    return output


def denoise(llm: Any, prompts: list[list[int]] | torch.Tensor, **sampler_kwargs: Any
            ) -> SamplerOutput:
    """Generate from every prompt with the checkpoint family's sampler, one engine call per
    step over all canvases of equal prompt length.

    ``sampler_kwargs`` go to ``llada_generate`` (steps, gen_length, block_length,
    temperature, cfg_scale, remasking) or ``dream_generate`` (steps, gen_length, temperature,
    alg, eps); Dream's default ``alg`` is ``entropy``, so pass e.g. ``alg="maskgit_plus"``
    with a top-k engine. Prompts must have equal lengths (one canvas shape per call).
    Returns the sampler's ``SamplerOutput`` (``sequences: [n, prompt + gen_length]`` in
    prompt order) with ``engine_calls`` = the number of engine calls (= steps).
    """
    def encode(rows: list[list[int]]) -> list[torch.Tensor]:
        outputs = llm.encode([{"prompt_token_ids": row} for row in rows],
                             pooling_task="token_classify", use_tqdm=False)
        return [output.outputs.data for output in outputs]

    return run_sampler(VllmDenoiser(llm.model_config.hf_config, encode), prompts,
                       **sampler_kwargs)


def shutdown(llm: Any) -> None:
    """Stop ``llm``'s engine now rather than at interpreter exit; call it when done serving.

    vLLM 0.32's ``LLM`` has no shutdown method of its own. With the multiprocess engine (vLLM's
    default), the client's output thread (a daemon) still holds the last outputs it decoded,
    tensors among them, when it is told to stop. If the interpreter is already finalizing when
    that thread frees them, torch's tensor destructor cannot take the GIL, the thread is
    unwound through a ``noexcept`` destructor and the process aborts after its work is done
    ("terminate called without an active exception", exit code 134; core dump read on
    2026-12-03). Stopping the engine and joining that thread here closes the race.
    """
    client = llm.llm_engine.engine_core
    client.shutdown()
    output_thread = getattr(client, "output_queue_thread", None)  # multiprocess client only
    if output_thread is not None:
        output_thread.join(timeout=30)
