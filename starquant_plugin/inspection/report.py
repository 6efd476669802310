"""The Markdown report of ``starquant inspect``: the figures, what each shows, and the numbers
behind them (so the report can be read, diffed and pasted into an issue)."""

from __future__ import annotations

from statistics import mean

from starquant_plugin.inspection.measure import ChannelProfile, DenoisingErrors


def _table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(model_name: str, setup: dict[str, object], figures: dict[str, str],
                  profiles: dict[str, ChannelProfile], denoising: dict[str, DenoisingErrors],
                  group_errors: dict[str, dict[str, float]]) -> str:
    """Markdown embedding ``figures`` (``{key: file name}`` beside the report)."""
    setup_lines = "\n".join(f"* {key}: {value}" for key, value in setup.items())
    disparity = _table(
        ["block:group input", "RMS masked / unmasked, median channel",
         "all channels pooled", "1 - cos(channel profiles)"],
        [[key, p.channel_ratios().median().item(), p.norm_ratio, p.profile_distance]
         for key, p in profiles.items()])
    steps = len(next(iter(denoising.values())).teacher_forced) if denoising else 0
    temporal = _table(
        ["model", "mean error, FP canvases", "error at last step, own trajectory",
         "tokens != FP at last step"],
        [[name, mean(e.teacher_forced), e.free_running[-1], e.token_disagreement[-1]]
         for name, e in denoising.items()])
    per_group = _table(
        ["model", "mean group error", "worst group", "its error"],
        [[name, mean(values.values()), max(values, key=values.get), max(values.values())]
         for name, values in group_errors.items()])
    return f"""# starquant inspect: {model_name}

{setup_lines}

## 1. Masked vs unmasked tokens (the state disparity SGAT addresses)

A diffusion LM reads two kinds of tokens at once: `[MASK]` positions and text. Their
activations reach the linears with different magnitudes and in different channels, so one
transform and one clipping range fitted to both serve neither well. Each panel is the input of
one linear group: per channel, the RMS over masked tokens (red) and over unmasked tokens
(blue).

![activation magnitude per channel, masked vs unmasked]({figures['activation_by_state']})

![state disparity per block]({figures['state_disparity']})

{disparity}

## 2. Error across the denoising steps (the temporal accumulation TAC addresses)

One sampler run from held-out prompts. Left: every model scores the FP model's own canvases,
so the curve is the error quantization adds at that step. Middle: every model follows its own
trajectory, so errors in earlier choices feed later steps. Right: share of generated positions
(token or mask) that differ from the FP canvas at the same step. "SGAT, no TAC" and
"STaR-Quant" differ only in TAC.

![hidden-state error across denoising steps]({figures['denoising_error']})

{temporal}

The run has {steps} steps.

## 3. Error of each linear group, RTN vs STaR-Quant

Relative output error of every linear group in a full forward pass on held-out denoising
states (so a block's error includes what earlier blocks passed on).

![per-layer error of each linear group]({figures['linear_group_error']})

{per_group}
"""
