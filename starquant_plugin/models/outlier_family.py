"""A seeded family of outlier-stressed variants, so defaults are chosen on some and judged on
others.

``outliers.py``'s one stress variant puts outliers of fixed ratios on fixed channel choices;
defaults tuned on it did not carry over to variants built differently. Here every seed draws
its own variant of the same model, each rescaling exact in full precision (powers of two, as
in ``outliers.py``; logits stay bit-identical):

* **sites**: each (block, site) is stressed with probability ``SITE_PROBABILITY``; sites are
  the four ``DLLMFamily.scale_pairs`` (norm -> q/k/v, ``v_proj`` -> output projection, i.e.
  V channels, norm -> gate/up, ``up_proj`` -> down projection) and **K channels**: a RoPE
  pair ``(j, j + head_dim / 2)`` of ``k_proj`` times ``a``, the same pair of every query head
  that reads it divided by ``a`` (``Q K^T`` unchanged; the 4-bit K quantizer after RoPE sees
  the outlier);
* **channels**: 1-3 per stressed site, each chosen by a rule drawn at random: the largest
  masked/unmasked energy ratio among channels at least as large as the median (a
  state-dependent outlier), the largest magnitude, or uniformly at random;
* **factors**: ``2^k`` with ``k`` drawn uniformly from 2-6 (4x-64x) per channel;
* **massive activations**: in 1-2 random blocks, the down-projection input channel whose
  energy sits on the fewest tokens (largest absmax / RMS over tokens, among channels at least
  as large as the median) is scaled so that its peak reaches 256-1024x the median channel's
  absmax: large values on a handful of positions, as 7-8B models show there.

``TUNING_SEEDS`` and ``HELD_OUT_SEEDS`` were fixed before any method ran on them: defaults are
chosen on the first and reported on the second (``docs/results.md``); ``CONFIRMATION_SEEDS``
are a second report set, run once the defaults were final.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from starquant_plugin.models.families import DLLMFamily, decoder_blocks, family_of, mask_token_id
from starquant_plugin.models.outliers import (
    RescaledChannel,
    StressReport,
    capture_activations,
    reader_columns,
    rescale_channel_,
    writer_stats,
    writer_width,
)

TUNING_SEEDS = (0, 1, 2, 3)
"""Variant seeds every default is chosen on."""
HELD_OUT_SEEDS = (100, 101, 102, 103)
"""Variant seeds results are reported on; never used to choose anything."""
CONFIRMATION_SEEDS = (200, 201, 202, 203)
"""Variant seeds first run after the last default changed. Key smoothing was found by
diagnosing STaR-Quant's worst held-out variant (then chosen on the tuning set), so the
held-out set is no longer blind to it; these are."""

SITES = ("norm", "value", "mlp_norm", "mlp_up", "key")
"""Stressable sites: the ``DLLMFamily.scale_pairs`` in order, then K channels."""
RULES = ("state", "magnitude", "random")
SITE_PROBABILITY = 0.6
CHANNELS_PER_SITE = (1, 3)
LOG2_FACTORS = (2, 6)
MASSIVE_BLOCKS = (1, 2)
LOG2_MASSIVE_RATIOS = (8, 10)
MAX_LOG2_FACTOR = 12


@dataclass(frozen=True)
class PlannedOutlier:
    """One channel a variant rescales: where, how it is chosen and by how much.

    ``site``: one of ``SITES`` or ``"massive"`` (the down-projection input, chosen by
    ``rule == "tokens"``); ``log2``: the factor's exponent, or for a massive activation the
    exponent of the peak's target ratio to the median channel (the factor follows from data).
    """

    block: int
    site: str
    rule: str
    log2: int


def outlier_plan(family: str, seed: int, n_blocks: int) -> list[PlannedOutlier]:
    """The channels variant ``seed`` of a ``family`` model of ``n_blocks`` blocks rescales
    (drawn without data; the data then picks each rule's channel)."""
    draw = random.Random(f"{family}-{seed}")
    plan = []
    for block in range(n_blocks):
        for site in SITES:
            if draw.random() >= SITE_PROBABILITY:
                continue
            for _ in range(draw.randint(*CHANNELS_PER_SITE)):
                plan.append(PlannedOutlier(block, site, draw.choice(RULES),
                                           draw.randint(*LOG2_FACTORS)))
    for block in sorted(draw.sample(range(n_blocks), min(n_blocks,
                                                         draw.randint(*MASSIVE_BLOCKS)))):
        plan.append(PlannedOutlier(block, "massive", "tokens",
                                   draw.randint(*LOG2_MASSIVE_RATIOS)))
    return plan


def key_partner(channel: int, head_dim: int) -> int:
    """The other channel of ``channel``'s RoPE pair (``rotate_half`` layout)."""
    half = head_dim // 2
    head, offset = divmod(channel, head_dim)
    return head * head_dim + (offset + half) % head_dim


@torch.no_grad()
def rescale_key_channel_(block: nn.Module, family: DLLMFamily, channel: int, log2_factor: int,
                         head_dim: int) -> None:
    """Multiply K's RoPE pair of ``channel`` (``k_proj`` rows and bias) by ``2^log2_factor``
    and the same pair of every query head that reads that KV head by the inverse: RoPE
    rotates within the pair, so both stay scaled after it and ``Q K^T`` is unchanged."""
    query_name, key_name = family.query_key
    query, key = block.get_submodule(query_name), block.get_submodule(key_name)
    factor = 2.0**log2_factor
    for c in (channel, key_partner(channel, head_dim)):
        key.weight[c].mul_(factor)
        rows = reader_columns(c, key.out_features, query.out_features, head_dim)
        query.weight[rows] = query.weight[rows] / factor
        if key.bias is not None:
            key.bias[c].mul_(factor)
        if query.bias is not None:
            query.bias[rows] = query.bias[rows] / factor


def _pick(score: torch.Tensor | None, absmax: torch.Tensor, taken: set[int],
          draw: random.Random, at_least_median: bool) -> int:
    """The free channel (not in ``taken``) with the largest ``score``, only among channels at
    least as large as the median if ``at_least_median`` (so a state-dependent or
    token-concentrated channel is not mere noise); ``score=None`` draws one at random."""
    free = torch.ones_like(absmax, dtype=torch.bool)
    free[list(taken)] = False
    if score is None:
        return draw.choice(torch.nonzero(free).flatten().tolist())
    if at_least_median:
        free &= absmax >= absmax.median()
    return int(torch.where(free, score, torch.full_like(score, -math.inf)).argmax())


@torch.no_grad()
def add_family_outliers_(model: PreTrainedModel, rows: torch.LongTensor, seed: int
                         ) -> StressReport:
    """Turn ``model`` (in place) into variant ``seed`` of the stress family; its
    full-precision function is unchanged bit for bit.

    ``rows: [n, seq]`` token ids of denoising states: they choose the channels (statistics of
    the unmodified model; each site's rescaling leaves every other site's activations as they
    were). ``report.ratios`` holds, per stressed ``"<block>.<reader>"`` (``"<block>.<k_proj>"``
    for K), the largest channel absmax / median channel absmax before and after.
    """
    family = family_of(model)
    blocks = decoder_blocks(model, family)
    plan = outlier_plan(family.name, seed, len(blocks))
    draw = random.Random(f"{family.name}-{seed}-channels")
    state = (rows == mask_token_id(model)).reshape(-1)
    pair_of = {"norm": 0, "value": 1, "mlp_norm": 2, "mlp_up": 3, "massive": 3}
    points = {}
    for outlier in plan:
        block = blocks[outlier.block]
        if outlier.site == "key":
            points[(outlier.block, "key")] = (block.get_submodule(family.query_key[1]), "output")
        else:
            pair = pair_of[outlier.site]
            points[(outlier.block, pair)] = (
                block.get_submodule(family.scale_pairs[pair][1][0]), "input")
    activations = capture_activations(model, rows, points)
    report = StressReport()
    taken: dict[tuple, set[int]] = {}
    stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # absmax kept up to date
    for outlier in plan:
        block = blocks[outlier.block]
        head_dim = block.get_submodule(family.attention_module).head_dim
        is_key = outlier.site == "key"
        point = (outlier.block, "key" if is_key else pair_of[outlier.site])
        writer, readers = ((family.query_key[1], (family.query_key[0],)) if is_key
                           else family.scale_pairs[point[1]])
        x = activations[point]
        median = x.abs().amax(0).median().clamp_min(1e-30)
        if point not in stats:
            stats[point] = writer_stats(x, state, writer_width(block.get_submodule(writer)),
                                        head_dim)
        absmax, state_ratio = stats[point]
        used = taken.setdefault(point, set())
        if outlier.site == "massive":  # reader width = writer width at the down projection
            concentration = x.abs().amax(0) / x.pow(2).mean(0).sqrt().clamp_min(1e-30)
            channel = _pick(concentration, absmax, used, draw, at_least_median=True)
            target = 2.0**outlier.log2 * median.item()
            log2 = round(math.log2(target / absmax[channel].clamp_min(1e-30).item()))
            log2 = max(0, min(log2, MAX_LOG2_FACTOR))
        else:
            score = {"state": state_ratio, "magnitude": absmax, "random": None}[outlier.rule]
            channel = _pick(score, absmax, used, draw, at_least_median=outlier.rule == "state")
            log2 = outlier.log2
        used.update({channel, key_partner(channel, head_dim)} if is_key else {channel})
        if log2 == 0:
            continue
        site = f"{outlier.block}.{writer if is_key else readers[0]}"
        ratio = report.ratios.setdefault(site, {"before": (absmax / median).max().item()})
        if is_key:
            rescale_key_channel_(block, family, channel, log2, head_dim)
            absmax[key_partner(channel, head_dim)] *= 2.0**log2
        else:
            rescale_channel_(block, writer, readers, channel, log2, head_dim)
        absmax[channel] *= 2.0**log2
        ratio["after"] = (absmax / median).max().item()
        report.channels.append(RescaledChannel(outlier.block, writer, readers[0], channel,
                                               2.0**log2, outlier.rule,
                                               state_ratio[channel].item()))
    return report
