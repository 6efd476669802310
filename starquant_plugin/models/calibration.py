"""Calibration states: rows of ``input_ids`` that look like what a DLLM sees while denoising.

Three sources (``../shared/spec/dllm.md``): forward-process masking of text at a grid of t,
semi-autoregressive block states, and canvases recorded from the FP model's own sampler.
Every row keeps its length (no padding); its mask state is simply ``row == mask_id``.
"""

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from starquant_plugin.models.families import family_of, mask_token_id
from starquant_plugin.models.sampling import dream_generate, llada_generate


@dataclass(frozen=True)
class StateMix:
    """How many rows each source contributes, and its knobs.

    Default weights follow DLLMQuant's emphasis on early and late denoising steps: the
    trajectory is cut into four step bins weighted 0.3 / 0.2 / 0.2 / 0.3.
    """

    forward: float = 0.4
    semi_autoregressive: float = 0.3
    trajectory: float = 0.3
    t_grid: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    block_length: int = 32
    prompt_length: int = 16
    trajectory_bins: tuple[float, ...] = (0.3, 0.2, 0.2, 0.3)
    trajectory_steps: int = field(default=16)

    def counts(self, total: int) -> dict[str, int]:
        weights = {"forward": self.forward, "semi_autoregressive": self.semi_autoregressive,
                   "trajectory": self.trajectory}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"State mix weights must be >= 0 and not all 0, got {weights}.")
        norm = sum(weights.values())
        counts = {name: int(total * w / norm) for name, w in weights.items()}
        counts["forward"] += total - sum(counts.values())
        return counts


def forward_masking_states(
    rows: torch.LongTensor, mask_id: int, t_grid: tuple[float, ...], prompt_length: int,
    generator: torch.Generator,
) -> torch.LongTensor:
    """Row i is masked at ``t_grid[i % len(t_grid)]`` (Bernoulli per token, prompt clean)."""
    t = torch.tensor(t_grid)[torch.arange(len(rows)) % len(t_grid)][:, None]
    masked = torch.rand(rows.shape, generator=generator) < t
    masked[:, :prompt_length] = False
    return rows.masked_fill(masked, mask_id)


def semi_autoregressive_states(
    rows: torch.LongTensor, mask_id: int, block_length: int, prompt_length: int,
    generator: torch.Generator,
) -> torch.LongTensor:
    """Clean prefix, current block partly masked, later blocks fully masked."""
    n, seq = rows.shape
    n_blocks = max(1, (seq - prompt_length) // block_length)
    block = torch.randint(0, n_blocks, (n, 1), generator=generator)
    start = prompt_length + block * block_length
    position = torch.arange(seq)[None]
    in_block = (position >= start) & (position < start + block_length)
    fraction = torch.rand(n, 1, generator=generator)
    masked = (position >= start + block_length) | (
        in_block & (torch.rand(rows.shape, generator=generator) < fraction)
    )
    return rows.masked_fill(masked, mask_id)


@torch.no_grad()
def trajectory_states(
    model: PreTrainedModel, rows: torch.LongTensor, mix: StateMix, generator: torch.Generator
) -> torch.LongTensor:
    """Canvases from the FP model's own sampler, prompted with each row's first tokens.

    One canvas per row, drawn from four step bins of the trajectory with ``trajectory_bins``
    weights. Generation runs once for the whole batch.
    """
    n, seq = rows.shape
    gen_length = seq - mix.prompt_length
    steps = mix.trajectory_steps
    prompts = rows[:, : mix.prompt_length].to(model.device)  # sampled where the model is
    if family_of(model).name == "dream":
        canvases = dream_generate(model, prompts, steps=steps, gen_length=gen_length,
                                  alg="entropy", return_canvases=True).canvases
    else:
        block = mix.block_length if gen_length % mix.block_length == 0 else gen_length
        steps = steps - steps % (gen_length // block) or gen_length // block
        canvases = llada_generate(model, prompts, steps=steps, gen_length=gen_length,
                                  block_length=block, return_canvases=True).canvases
    bins = torch.tensor(mix.trajectory_bins, dtype=torch.float)
    chosen_bin = torch.multinomial(bins, n, replacement=True, generator=generator)
    bin_width = len(canvases) / len(bins)
    offset = torch.rand(n, generator=generator)
    step = ((chosen_bin + offset) * bin_width).long().clamp(max=len(canvases) - 1)
    stacked = torch.stack(canvases).to(rows.device)  # [steps, n, seq], back with the rows
    return stacked[step, torch.arange(n)]


def build_calibration_states(
    model: PreTrainedModel, rows: torch.LongTensor, num_samples: int,
    mix: StateMix | None = None, seed: int = 0,
) -> torch.LongTensor:
    """``num_samples`` calibration rows ``[num_samples, seq]`` from clean text rows."""
    mix = mix or StateMix()
    mask_id = mask_token_id(model)
    generator = torch.Generator().manual_seed(seed)
    counts = mix.counts(num_samples)
    source = rows[torch.randperm(len(rows), generator=generator)]
    source = source.repeat((num_samples + len(source) - 1) // len(source), 1)[:num_samples]
    pieces, start = [], 0
    for name, count in counts.items():
        chunk, start = source[start : start + count], start + count
        if count == 0:
            continue
        if name == "forward":
            pieces.append(forward_masking_states(chunk, mask_id, mix.t_grid,
                                                 mix.prompt_length, generator))
        elif name == "semi_autoregressive":
            pieces.append(semi_autoregressive_states(chunk, mask_id, mix.block_length,
                                                     mix.prompt_length, generator))
        else:
            pieces.append(trajectory_states(model, chunk, mix, generator))
    return torch.cat(pieces)
