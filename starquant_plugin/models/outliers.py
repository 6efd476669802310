"""Stress variants: give a model 8B-style activation outliers without changing its function.

The bundled tiny models have no outlier channels, so W4A4 barely hurts them and a benchmark on
them cannot tell methods apart. The models STaR-Quant is for have them (``docs/results.md``,
"Stress variants", lists the published measurements). This module adds them the way they
arise, by a channel that one layer writes large and the next reads small, and exactly
undoes it in full precision: for each ``(writer, readers)`` pair of
``DLLMFamily.scale_pairs`` a channel ``j`` of the writer (an RMSNorm weight entry, or a
linear's output row and bias) is multiplied by ``a = 2^k`` and the readers' input column(s)
``j`` are divided by ``a``. Powers of two are exact in every float format, so the logits stay
bit-identical in bf16 and fp32 (tests check this).

Which channels: per site, some with the largest masked/unmasked energy ratio (outliers that
depend on the token state, the paper's premise) and some with the largest magnitude (natural
outlier channels, amplified). How large: the site's target ratio ``channel absmax / median
channel absmax`` measured on 7-8B models, scaled by ``sqrt(d / d_ref)`` so that an outlier
carries the same share of a token's energy at the tiny width ``d`` as at the reference width
``d_ref``: a rotation spreads an outlier over ``d`` channels, so a given ratio is harsher at
small ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from starquant_plugin.models.families import (
    DLLMFamily,
    decoder_blocks,
    family_of,
    mask_token_id,
)

REFERENCE_WIDTHS: dict[str, tuple[int, int]] = {"llada": (4096, 12288), "dream": (3584, 18944)}
"""(hidden, MLP) width of the 7-8B model of each family (LLaDA-8B, Dream-v0-7B)."""

NORM, VALUE, MLP_NORM, MLP_UP = range(4)
"""Indices of ``DLLMFamily.scale_pairs``: pre-attention norm, v_proj, pre-MLP norm, up_proj."""


@dataclass(frozen=True)
class OutlierProfile:
    """Target outlier ratios (channel absmax / median channel absmax of a linear's input) at
    the family's 7-8B width, and how many channels per site get one.

    Defaults and their sources are in ``docs/results.md`` ("Stress variants"): norm outputs
    (q/k/v and gate/up inputs) ~100 (SmoothQuant), attention output ~20, down-projection input
    ~1000 in the first and last blocks (massive activations) and ~100 elsewhere.
    """

    norm_ratio: float = 100.0
    attention_ratio: float = 20.0
    down_ratio: float = 100.0
    massive_ratio: float = 1000.0
    massive_blocks: tuple[int, ...] = (0, -1)
    channels_by_state: int = 1
    channels_by_magnitude: int = 1
    max_log2_factor: int = 12

    def site_ratio(self, pair: int, block: int, n_blocks: int) -> float:
        """The reference-width target of pair ``pair`` (``NORM`` ...) in block ``block``."""
        if pair == VALUE:
            return self.attention_ratio
        if pair == MLP_UP:
            massive = {b % n_blocks for b in self.massive_blocks}
            return self.massive_ratio if block in massive else self.down_ratio
        return self.norm_ratio


STRESS = OutlierProfile()
"""The profile of the benchmark's stress variants."""


@dataclass
class RescaledChannel:
    """One rescaled channel: ``factor`` (a power of two) on ``writer``'s channel ``channel``,
    read by ``reader`` (and the other readers of the pair)."""

    block: int
    writer: str
    reader: str
    channel: int
    factor: float
    chosen_by: str  # "state" (masked/unmasked energy ratio) or "magnitude"
    state_ratio: float  # masked / unmasked mean energy of the channel before rescaling


@dataclass
class StressReport:
    """What ``add_stress_outliers_`` did: the rescaled channels and, per (block, reader), the
    outlier ratio (channel absmax / median channel absmax) before and after and the target."""

    channels: list[RescaledChannel] = field(default_factory=list)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)


@torch.no_grad()
def capture_activations(model: PreTrainedModel, rows: torch.LongTensor,
                        points: dict[Hashable, tuple[nn.Module, str]]
                        ) -> dict[Hashable, torch.Tensor]:
    """float32 ``[tokens, d]`` at each of ``points``: ``key -> (module, "input" | "output")``,
    over ``rows: [n, seq]`` run through ``model`` in batches of 8."""
    captured: dict[Hashable, list[torch.Tensor]] = {}
    handles = []
    for key, (module, where) in points.items():
        def keep(value: torch.Tensor, key=key) -> None:
            captured.setdefault(key, []).append(value.detach().float().flatten(0, -2))
        if where == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _module, args, keep=keep: keep(args[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda _module, _args, output, keep=keep: keep(output)))
    try:
        for start in range(0, len(rows), 8):
            model(rows[start : start + 8])
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in captured.items()}


def reader_inputs(model: PreTrainedModel, rows: torch.LongTensor, family: DLLMFamily
                  ) -> dict[tuple[int, int], torch.Tensor]:
    """Input ``[tokens, d]`` (float32) of each pair's first reader, keyed (block, pair)."""
    return capture_activations(model, rows, {
        (b, p): (block.get_submodule(readers[0]), "input")
        for b, block in enumerate(decoder_blocks(model, family))
        for p, (_writer, readers) in enumerate(family.scale_pairs)})


def channel_ratio(x: torch.Tensor) -> torch.Tensor:
    """``x: [tokens, d]`` -> ``[d]`` channel absmax / median channel absmax."""
    absmax = x.abs().amax(0)
    return absmax / absmax.median().clamp_min(1e-30)


def outlier_ratios(model: PreTrainedModel, rows: torch.LongTensor) -> dict[str, float]:
    """Largest outlier ratio (channel absmax / median channel absmax) of each pair's reader
    input, keyed ``"<block>.<reader>"``; ``rows: [n, seq]`` token ids (denoising states)."""
    family = family_of(model)
    inputs = reader_inputs(model, rows, family)
    return {f"{b}.{family.scale_pairs[p][1][0]}": channel_ratio(x).max().item()
            for (b, p), x in inputs.items()}


def writer_width(module: nn.Module) -> int:
    """Channels a writer writes: a linear's output rows or an RMSNorm's weight entries."""
    return module.out_features if isinstance(module, nn.Linear) else module.weight.numel()


def reader_columns(channel: int, writer_width: int, reader_width: int, head_dim: int
                    ) -> list[int]:
    """Input columns of a reader that read the writer's ``channel``: the same index, or with
    grouped-query attention every query head's copy of the KV head's channel (query head
    ``h`` reads KV head ``h // groups``)."""
    if reader_width == writer_width:
        return [channel]
    groups = reader_width // writer_width
    if groups * writer_width != reader_width or writer_width % head_dim:
        raise ValueError(
            f"Got a writer of width {writer_width} read by {reader_width} columns; expected "
            "equal widths or grouped-query attention (reader width = groups x writer width, "
            f"both multiples of head_dim {head_dim}). Check DLLMFamily.scale_pairs."
        )
    kv_head, offset = divmod(channel, head_dim)
    return [(kv_head * groups + g) * head_dim + offset for g in range(groups)]


@torch.no_grad()
def rescale_channel_(block: nn.Module, writer: str, readers: tuple[str, ...], channel: int,
                     log2_factor: int, head_dim: int) -> None:
    """Multiply ``writer``'s ``channel`` by ``2^log2_factor`` and divide what reads it by the
    same; exact in any float dtype. ``writer``: an RMSNorm (1-D ``weight``) or a linear (output
    row and bias); ``readers``: linears whose input columns read the channel."""
    factor = 2.0**log2_factor
    module = block.get_submodule(writer)
    module.weight[channel].mul_(factor)
    if getattr(module, "bias", None) is not None:
        module.bias[channel].mul_(factor)
    width = writer_width(module)
    for name in readers:
        reader = block.get_submodule(name)
        columns = reader_columns(channel, width, reader.in_features, head_dim)
        reader.weight[:, columns] = reader.weight[:, columns] / factor


def writer_stats(x: torch.Tensor, state: torch.Tensor, writer_width: int, head_dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per writer channel: absmax of what its readers see, and masked / unmasked mean energy.

    ``x: [tokens, reader_width]``, ``state: [tokens]`` (True = [MASK]). With grouped-query
    attention a writer channel reaches several reader columns: take their max and their sum.
    """
    absmax = x.abs().amax(0)
    energy_m = x[state].pow(2).mean(0) if state.any() else torch.zeros_like(absmax)
    energy_u = x[~state].pow(2).mean(0) if (~state).any() else torch.zeros_like(absmax)
    if x.shape[1] != writer_width:
        groups = x.shape[1] // writer_width
        kv_heads = writer_width // head_dim

        def per_writer(v: torch.Tensor, reduce: str) -> torch.Tensor:
            v = v.reshape(kv_heads, groups, head_dim)
            return (v.amax(1) if reduce == "max" else v.sum(1)).reshape(-1)

        absmax = per_writer(absmax, "max")
        energy_m, energy_u = per_writer(energy_m, "sum"), per_writer(energy_u, "sum")
    return absmax, energy_m / energy_u.clamp_min(1e-12)


def _choose_channels(absmax: torch.Tensor, state_ratio: torch.Tensor, profile: OutlierProfile
                     ) -> list[tuple[int, str]]:
    """Channels to rescale: ``channels_by_state`` with the largest masked/unmasked energy
    ratio among channels at least as large as the median (so a state-dependent channel is
    not mere noise), then ``channels_by_magnitude`` of the largest among the rest."""
    eligible = absmax >= absmax.median()
    by_state = torch.where(eligible, state_ratio, torch.full_like(state_ratio, -1.0))
    chosen = [(int(c), "state") for c in by_state.topk(profile.channels_by_state).indices]
    taken = {c for c, _ in chosen}
    for c in absmax.argsort(descending=True).tolist():
        if len(chosen) >= profile.channels_by_state + profile.channels_by_magnitude:
            break
        if c not in taken:
            chosen.append((c, "magnitude"))
    return chosen


@torch.no_grad()
def stress_block_(
    block: nn.Module, family: DLLMFamily, inputs: dict[int, torch.Tensor], state: torch.Tensor,
    targets: dict[int, float], profile: OutlierProfile = STRESS, index: int = 0,
    report: StressReport | None = None,
) -> StressReport:
    """Rescale channels of one decoder block in place towards ``targets``.

    ``inputs``: per pair index of ``family.scale_pairs``, the FP input ``[tokens, d]`` of the
    pair's first reader (before any rescaling); ``state: [tokens]`` True for [MASK] tokens;
    ``targets``: per pair index, the outlier ratio to reach at this block's width. Each chosen
    channel (``_choose_channels``) gets the power of two that brings its ratio closest to the
    target, never below 1: a channel already past the target is left alone.
    """
    report = StressReport() if report is None else report
    head_dim = block.get_submodule(family.attention_module).head_dim
    for p, (writer, readers) in enumerate(family.scale_pairs):
        if p not in targets:
            continue
        x = inputs[p]
        width = writer_width(block.get_submodule(writer))
        median = x.abs().amax(0).median().clamp_min(1e-30)
        absmax, state_ratio = writer_stats(x, state, width, head_dim)
        before = (absmax / median).max().item()
        for channel, reason in _choose_channels(absmax, state_ratio, profile):
            size = absmax[channel].clamp_min(1e-30).item()
            k = max(0, min(round(math.log2(targets[p] * median.item() / size)),
                           profile.max_log2_factor))
            if k == 0:
                continue
            rescale_channel_(block, writer, readers, channel, k, head_dim)
            absmax[channel] *= 2.0**k
            report.channels.append(RescaledChannel(index, writer, readers[0], channel,
                                                   2.0**k, reason, state_ratio[channel].item()))
        report.ratios[f"{index}.{readers[0]}"] = {
            "before": before, "after": (absmax / median).max().item(), "target": targets[p]}
    return report


def width_scaled_targets(profile: OutlierProfile, family: DLLMFamily, block: int,
                         n_blocks: int, widths: dict[int, int]) -> dict[int, float]:
    """Per pair index, ``profile``'s reference-width ratio times ``sqrt(d / d_ref)`` for the
    reader width ``widths[pair]``: the same share of a token's energy in the outlier."""
    hidden, mlp = REFERENCE_WIDTHS[family.name]
    return {p: profile.site_ratio(p, block, n_blocks)
            * math.sqrt(d / (mlp if p == MLP_UP else hidden)) for p, d in widths.items()}


@torch.no_grad()
def add_stress_outliers_(
    model: PreTrainedModel, rows: torch.LongTensor, profile: OutlierProfile = STRESS
) -> StressReport:
    """Give ``model`` (in place) outlier channels of ``profile``'s magnitudes, scaled to its
    width; its full-precision function is unchanged bit for bit.

    ``rows: [n, seq]`` token ids of denoising states (they choose the channels and measure
    their size; e.g. ``build_calibration_states`` on text disjoint from evaluation).
    """
    family = family_of(model)
    state = (rows == mask_token_id(model)).reshape(-1)
    inputs = reader_inputs(model, rows, family)
    blocks = decoder_blocks(model, family)
    report = StressReport()
    for b, block in enumerate(blocks):
        block_inputs = {p: inputs[(b, p)] for p in range(len(family.scale_pairs))}
        targets = width_scaled_targets(profile, family, b, len(blocks),
                                       {p: x.shape[1] for p, x in block_inputs.items()})
        stress_block_(block, family, block_inputs, state, targets, profile, b, report)
    return report
