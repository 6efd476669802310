"""Samplers of the two diffusion LM families, returning final tokens and optional canvases.

LLaDA: semi-autoregressive blocks with low-confidence or random remasking (LLaDA's
``generate``). Dream: reveal a fraction ``1 - s/t`` of the remaining masks per step with the
origin / maskgit_plus / topk_margin / entropy rules (Dream's ``diffusion_generate``). Both take
logits through ``token_logits`` so Dream's shift is handled once. Re-implemented here because
neither ships as a library; randomness comes from an explicit ``torch.Generator``.

A model may return top-k statistics instead of logits (``TOP_K_SCORES``: the vLLM engine's
denoiser); greedy sampling then reads the top-1 id, its probability and the top-2 margin off
them, with no ``[batch, seq, vocab]`` tensor (126k wide for LLaDA) on the host per step.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from starquant_plugin.models.families import mask_token_id, token_logits


@dataclass
class SamplerOutput:
    """sequences: [batch, prompt + gen_length]; canvases: the canvas before each step."""

    sequences: torch.LongTensor
    canvases: list[torch.LongTensor] = field(default_factory=list)


TOP_K_SCORES = "top_k_scores"
"""A model attribute: ``k > 0`` when the model's ``.logits`` are top-k statistics ``[batch, seq,
2k]`` (the ``k`` most likely ids, then their log-probabilities, most likely first) rather than
logits; absent or 0 for logits (or full log-probabilities)."""


def _scores_top_k(model: PreTrainedModel, family: str, temperature: float,
                  cfg_scale: float = 0.0, alg: str | None = None) -> int:
    """The model's ``TOP_K_SCORES``; raises for settings that need the whole distribution,
    which top-k statistics do not hold, before any forward."""
    top_k = getattr(model, TOP_K_SCORES, 0)
    if not top_k:
        return 0
    needs_full = []
    if temperature > 0:
        needs_full.append("temperature > 0")
    if cfg_scale > 0:
        needs_full.append("cfg_scale > 0")
    if family == "dream" and (alg == "entropy" or (alg == "topk_margin" and top_k < 2)):
        needs_full.append(f"alg={alg!r} with top_k={top_k}")
    if needs_full:
        raise ValueError(
            f"{', '.join(needs_full)} needs the full distribution, but the model returns its "
            f"top-{top_k} tokens only. Serve it with full log-probs (vLLM: start the LLM with "
            "hf_overrides={'starquant_top_k': 0}), or use temperature 0 with low_confidence / "
            "random remasking (LLaDA) or origin / maskgit_plus / topk_margin (Dream)."
        )
    return top_k


def _canvas(prompt_ids: torch.LongTensor, gen_length: int, mask_id: int) -> torch.LongTensor:
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    masks = torch.full((prompt_ids.shape[0], gen_length), mask_id, dtype=torch.long,
                       device=prompt_ids.device)
    return torch.cat([prompt_ids.long(), masks], dim=1)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}.")


def _gumbel_argmax(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.LongTensor:
    """LLaDA's Gumbel-max sampling in float64; argmax when temperature is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
    noise = noise.to(logits.device)
    return (logits.double().exp() / (-torch.log(noise)) ** temperature).argmax(-1)


def _transfer_counts(masked: torch.Tensor, steps: int) -> torch.LongTensor:
    """[batch, width] masks -> [batch, steps] tokens to commit per step (equal split)."""
    total = masked.sum(1, keepdim=True)
    counts = (total // steps).repeat(1, steps)
    counts += torch.arange(steps, device=masked.device)[None] < (total % steps)
    return counts


def guided_logits(model: PreTrainedModel, x: torch.LongTensor, prompt_mask: torch.Tensor,
                  cfg_scale: float) -> torch.Tensor:
    """Position-aligned logits of ``x`` [batch, seq]; with ``cfg_scale > 0``, LLaDA's
    classifier-free guidance: ``uncond + (cfg_scale + 1) (cond - uncond)``, where the
    unconditional input has the prompt (``prompt_mask`` [batch, seq]) masked too."""
    if cfg_scale <= 0:
        return token_logits(model, x)
    unconditional = x.masked_fill(prompt_mask, mask_token_id(model))
    cond, uncond = token_logits(model, torch.cat([x, unconditional])).chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


@torch.no_grad()
def llada_generate(
    model: PreTrainedModel,
    prompt_ids: torch.LongTensor,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: Literal["low_confidence", "random"] = "low_confidence",
    return_canvases: bool = False,
    generator: torch.Generator | None = None,
) -> SamplerOutput:
    """LLaDA's semi-autoregressive sampler. prompt_ids: [batch, prompt] (equal lengths)."""
    _check_positive(steps=steps, gen_length=gen_length, block_length=block_length)
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be divisible by block_length ({block_length}); "
            f"pick block_length from the divisors of gen_length, e.g. {gen_length}."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps ({steps}) must be divisible by the number of blocks ({num_blocks} = "
            f"gen_length / block_length); use steps = a multiple of {num_blocks}."
        )
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}.")
    top_k = _scores_top_k(model, "llada", temperature, cfg_scale)
    mask_id = mask_token_id(model)
    x = _canvas(prompt_ids, gen_length, mask_id)
    prompt_len = x.shape[1] - gen_length
    prompt_mask = torch.arange(x.shape[1], device=x.device) < prompt_len
    steps_per_block = steps // num_blocks
    output = SamplerOutput(sequences=x)
    for block in range(num_blocks):
        block_end = prompt_len + (block + 1) * block_length
        counts = _transfer_counts(x[:, block_end - block_length : block_end] == mask_id,
                                  steps_per_block)
        for step in range(steps_per_block):
            if return_canvases:
                output.canvases.append(x.clone())
            masked = x == mask_id
            logits = guided_logits(model, x, prompt_mask.expand_as(x), cfg_scale)
            if top_k:  # top-k statistics, greedy: the top-1 id and its probability
                x0, top1 = logits[..., 0].long(), logits[..., top_k].float().exp()
            else:
                x0 = _gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                confidence = top1 if top_k else \
                    F.softmax(logits.float(), -1).gather(-1, x0[..., None])[..., 0]
            else:
                confidence = torch.rand(x0.shape, generator=generator).to(x0.device)
            confidence[:, block_end:] = -torch.inf
            confidence = torch.where(masked, confidence, -torch.inf)
            x0 = torch.where(masked, x0, x)
            # Rank positions by confidence; commit each row's top counts[:, step].
            order = confidence.argsort(dim=-1, descending=True, stable=True)
            ranks = torch.empty_like(order).scatter_(
                1, order, torch.arange(x.shape[1], device=x.device).expand_as(order)
            )
            commit = ranks < counts[:, step : step + 1]
            x = torch.where(commit, x0, x)
    output.sequences = x
    return output


def _dream_confidence(
    logits: torch.Tensor, alg: str, temperature: float, generator: torch.Generator | None,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """Dream's ``sample_tokens``: logits [n, vocab] -> (confidence [n], token [n]); with
    ``top_k``, greedy from top-k statistics [n, 2k] (``_scores_top_k`` allows no other)."""
    if top_k:
        probs = logits[:, top_k:].float().exp()
        margin = alg == "topk_margin"
        return (probs[:, 0] - probs[:, 1] if margin else probs[:, 0]), logits[:, 0].long()
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(logits.float(), -1)
    if temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        confidence = probs.gather(-1, tokens[:, None])[:, 0]
    else:
        confidence, tokens = probs.max(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, tokens


@torch.no_grad()
def dream_generate(
    model: PreTrainedModel,
    prompt_ids: torch.LongTensor,
    steps: int = 128,
    gen_length: int = 128,
    temperature: float = 0.0,
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] = "entropy",
    eps: float = 1e-3,
    return_canvases: bool = False,
    generator: torch.Generator | None = None,
) -> SamplerOutput:
    """Dream's sampler: at step i of S, reveal ``1 - s/t`` of the remaining masks.

    prompt_ids: [batch, prompt] (equal lengths).
    """
    _check_positive(steps=steps, gen_length=gen_length)
    algorithms = ("origin", "maskgit_plus", "topk_margin", "entropy")
    if alg not in algorithms:
        raise ValueError(f"alg must be one of {algorithms}, got {alg!r}.")
    top_k = _scores_top_k(model, "dream", temperature, alg=alg)
    mask_id = mask_token_id(model)
    x = _canvas(prompt_ids, gen_length, mask_id)
    timesteps = torch.linspace(1, eps, steps + 1, device="cpu")  # read as Python floats
    output = SamplerOutput(sequences=x)
    for i in range(steps):
        if return_canvases:
            output.canvases.append(x.clone())
        masked = x == mask_id
        logits = token_logits(model, x)
        t, s = timesteps[i].item(), timesteps[i + 1].item()
        last = i == steps - 1
        if alg == "origin":
            p_transfer = 1.0 if last else 1 - s / t
            reveal = torch.rand(x.shape, generator=generator).to(x.device) < p_transfer
            tokens = _dream_confidence(logits[masked & reveal], "origin", temperature,
                                       generator, top_k)[1]
            x = x.clone()
            x[masked & reveal] = tokens
            continue
        confidence, tokens = _dream_confidence(logits[masked], alg, temperature, generator,
                                               top_k)
        per_row = masked.sum() / masked.shape[0]
        count = int(per_row) if last else int(per_row * (1 - s / t))
        if count == 0:
            continue
        full_confidence = torch.full(x.shape, -torch.inf, device=x.device)
        full_confidence[masked] = confidence
        candidates = torch.full_like(x, mask_id)
        candidates[masked] = tokens
        chosen = full_confidence.topk(count, dim=-1).indices
        x = x.scatter(1, chosen, candidates.gather(1, chosen))
    output.sequences = x
    return output
