"""Quality measures for masked diffusion LMs: masked-token CE/accuracy, Monte-Carlo ELBO
likelihood, and agreement of greedy generations between two models.

All randomness comes from fixed-seed generators so two models are scored on identical masks.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from starquant_plugin.models.families import family_of, mask_token_id, token_logits
from starquant_plugin.models.sampling import dream_generate, guided_logits, llada_generate

MASK_RATIOS = (0.15, 0.5, 0.85)


def text_rows(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int = 128, max_rows: int | None = None
) -> torch.LongTensor:
    """Tokenize ``text`` and cut it into equal rows ``[rows, seq_len]`` (no padding)."""
    if seq_len < 1:
        raise ValueError(f"seq_len is {seq_len}; rows need a positive number of tokens.")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_rows = len(ids) // seq_len if max_rows is None else min(len(ids) // seq_len, max_rows)
    if n_rows == 0:
        raise ValueError(f"Text has {len(ids)} tokens, fewer than one row of {seq_len} "
                         "tokens; pass more text or shorter rows.")
    return torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)


def _fixed_count_masks(
    shape: tuple[int, int], ratio: float, generator: torch.Generator, draws: int = 1
) -> torch.Tensor:
    """``[draws, rows, seq]`` masks, exactly ``round(ratio * seq)`` masked positions per row,
    uniformly placed and stratified over draws: each row's positions are ranked once at
    random and draw ``j`` masks ranks ``j * count .. (j + 1) * count`` (wrapping), so draws
    cover every position before any is masked twice. Draw 0 is the single-draw mask."""
    rows, seq = shape
    count = max(1, round(ratio * seq))
    ranks = torch.rand(shape, generator=generator, device="cpu").argsort(dim=1).argsort(dim=1)
    return torch.stack([(ranks - j * count) % seq < count for j in range(draws)])


@torch.no_grad()
def masked_token_metrics(
    model: PreTrainedModel,
    rows: torch.LongTensor,
    mask_ratios: tuple[float, ...] = MASK_RATIOS,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    draws: int = 1,
) -> dict[float, dict[str, float]]:
    """Cross-entropy (nats/token) and accuracy on masked positions at each mask ratio.

    rows: [n, seq] clean token ids. ``draws`` masks per row and ratio, stratified so they
    cover every position before repeating one (``_fixed_count_masks``): more draws score more
    of the held-out tokens, which shrinks the evaluation's own noise when two close models
    are compared. Returns ``{ratio: {"ce": .., "acc": ..}}`` pooled over the draws.
    """
    if draws < 1:
        raise ValueError(f"Got draws={draws}; expected at least one mask per row.")
    mask_id = mask_token_id(model)
    results = {}
    for ratio in mask_ratios:
        generator = torch.Generator().manual_seed(seed)
        # drawn on the CPU generator (the same masks on every device), then moved to the rows
        masks = _fixed_count_masks(tuple(rows.shape), ratio, generator, draws).flatten(0, 1)
        masks = masks.to(rows.device)
        canvases = rows.repeat(draws, 1)
        total_ce, total_correct, total = 0.0, 0, 0
        for start in tqdm(range(0, len(canvases), batch_size), desc=f"masked CE t={ratio}",
                          disable=not progress, leave=False):
            clean = canvases[start : start + batch_size]
            mask = masks[start : start + batch_size]
            logits = token_logits(model, clean.masked_fill(mask, mask_id))[mask].float()
            total_ce += F.cross_entropy(logits, clean[mask], reduction="sum").item()
            total_correct += (logits.argmax(-1) == clean[mask]).sum().item()
            total += mask.sum().item()
        results[ratio] = {"ce": total_ce / total, "acc": total_correct / total}
    return results


def unigram_cross_entropy(fit_rows: torch.LongTensor, eval_rows: torch.LongTensor,
                          vocab_size: int) -> float:
    """CE of predicting every token from add-one unigram frequencies of ``fit_rows``: the
    score of a model that ignores context."""
    counts = torch.bincount(fit_rows.flatten(), minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    return -log_probs[eval_rows.flatten()].mean().item()


@torch.no_grad()
def elbo_log_likelihood(
    model: PreTrainedModel,
    prompt_ids: torch.LongTensor,
    target_ids: torch.LongTensor,
    mc_num: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    cfg_scale: float = 0.0,
) -> float:
    """Monte-Carlo ELBO of ``log p(target | prompt)`` as LLaDA's likelihood evaluation does.

    Each draw masks k target tokens (prompt clean), with k stratified over the batch; the CE on
    masked tokens is weighted by ``L_target / k``. prompt_ids: [P] (may be empty), target_ids:
    [L], on the model's device. ``cfg_scale > 0`` scores with classifier-free guidance
    (``guided_logits``), as LLaDA's evaluation does for some tasks.
    """
    if mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size}).")
    mask_id = mask_token_id(model)
    generator = torch.Generator().manual_seed(seed)
    device = target_ids.device
    target_len, prompt_len = len(target_ids), len(prompt_ids)
    sequence = torch.cat([prompt_ids, target_ids])[None].repeat(batch_size, 1)
    prompt_mask = (torch.arange(sequence.shape[1], device=device) < prompt_len).expand_as(
        sequence)
    losses = []
    for _ in range(mc_num // batch_size):
        k = torch.randint(1, target_len + 1, (), generator=generator, device="cpu").item()
        counts = torch.linspace(k, k + (batch_size - 1) * target_len / batch_size, batch_size,
                                device="cpu")
        counts = ((counts.round().long() - 1) % target_len + 1).to(device)
        ranks = torch.rand(batch_size, target_len, generator=generator,
                           device="cpu").argsort(1).argsort(1)
        target_mask = ranks.to(device) < counts[:, None]
        mask = torch.cat([torch.zeros(batch_size, prompt_len, dtype=torch.bool, device=device),
                          target_mask], 1)
        logits = guided_logits(model, sequence.masked_fill(mask, mask_id), prompt_mask,
                               cfg_scale)
        ce = F.cross_entropy(logits[mask].float(), sequence[mask], reduction="none")
        weights = (target_len / counts)[:, None].expand(-1, sequence.shape[1])[mask]
        losses.append((ce * weights).sum().item() / batch_size)
    return -sum(losses) / len(losses)


@torch.no_grad()
def heldout_elbo(
    model: PreTrainedModel,
    rows: torch.LongTensor,
    prompt_len: int = 32,
    mc_num: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> float:
    """Mean ELBO per target token of each row's continuation after its first ``prompt_len``."""
    total = 0.0
    for row in tqdm(rows, desc="ELBO", disable=not progress, leave=False):
        total += elbo_log_likelihood(model, row[:prompt_len], row[prompt_len:], mc_num=mc_num,
                                     batch_size=min(mc_num, 16), seed=seed)
    return total / (len(rows) * (rows.shape[1] - prompt_len))


def agreement_per_prompt(
    generate: Callable[[PreTrainedModel, torch.LongTensor], torch.LongTensor],
    reference: PreTrainedModel | torch.LongTensor,
    candidate: PreTrainedModel,
    prompts: torch.LongTensor,
) -> torch.Tensor:
    """``[prompts]``: per prompt, the fraction of generated positions where two models'
    greedy generations agree.

    generate(model, prompts) -> [batch, prompt + gen] token ids (a sampler with fixed settings).
    reference: the reference model, or its ``generate(reference, prompts)`` computed once when
    several candidates are compared with it.
    """
    prompt_len = prompts.shape[1]
    if not isinstance(reference, torch.Tensor):
        reference = generate(reference, prompts)
    a = reference[:, prompt_len:]
    b = generate(candidate, prompts)[:, prompt_len:]
    return (a == b).float().mean(dim=1)


def generation_agreement(
    generate: Callable[[PreTrainedModel, torch.LongTensor], torch.LongTensor],
    reference: PreTrainedModel | torch.LongTensor,
    candidate: PreTrainedModel,
    prompts: torch.LongTensor,
) -> float:
    """Fraction of generated positions where two models' greedy generations agree, over all
    prompts (the mean of ``agreement_per_prompt``, same arguments)."""
    return agreement_per_prompt(generate, reference, candidate, prompts).mean().item()


def greedy_generate(model: PreTrainedModel, prompts: torch.LongTensor,
                    gen_length: int = 32) -> torch.LongTensor:
    """Deterministic generation with the family's own sampler: one token per step, LLaDA in
    two semi-autoregressive blocks, Dream with maskgit_plus confidence."""
    if family_of(model).name == "dream":
        return dream_generate(model, prompts, steps=gen_length, gen_length=gen_length,
                              alg="maskgit_plus").sequences
    return llada_generate(model, prompts, steps=gen_length, gen_length=gen_length,
                          block_length=gen_length // 2).sequences


def quality_summary(
    model: PreTrainedModel,
    reference: PreTrainedModel | torch.LongTensor,
    rows: torch.LongTensor,
    prompts: torch.LongTensor,
    elbo_rows: int = 16,
    mc_num: int = 16,
    seed: int = 0,
    mask_draws: int = 1,
    mask_ratios: tuple[float, ...] = MASK_RATIOS,
) -> dict[str, float]:
    """One flat row of quality numbers for ``model``: masked CE/accuracy per mask ratio of
    ``mask_ratios`` (``mask_draws`` stratified masks per row), held-out ELBO per token, and
    greedy-generation agreement with ``reference`` (the FP model, or its ``greedy_generate``
    output for ``prompts``) with its standard error over prompts (``gen_agreement_se``)."""
    metrics = masked_token_metrics(model, rows, mask_ratios, seed=seed, progress=False,
                                   draws=mask_draws)
    row = {f"ce@{t}": metrics[t]["ce"] for t in mask_ratios}
    row |= {f"acc@{t}": metrics[t]["acc"] for t in mask_ratios}
    row["elbo"] = heldout_elbo(model, rows[:elbo_rows], mc_num=mc_num, seed=seed,
                               progress=False)
    per_prompt = agreement_per_prompt(greedy_generate, reference, model, prompts)
    row["gen_agreement"] = per_prompt.mean().item()
    # what sampling the prompts alone contributes to it: std over prompts / sqrt(prompts)
    row["gen_agreement_se"] = (per_prompt.std() / len(per_prompt) ** 0.5).item() \
        if len(per_prompt) > 1 else 0.0
    return row
