"""PNG figures of ``inspection.measure`` results (matplotlib, Agg backend: no display needed).

Each function takes measurements and a path, writes one figure meant to be read without the
code: titled axes with units, a legend, and the takeaway in the title.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  after choosing the backend
import torch  # noqa: E402

from starquant_plugin.inspection.measure import ChannelProfile, DenoisingErrors  # noqa: E402

STATE_COLORS = {"masked": "tab:red", "unmasked": "tab:blue"}
DPI = 110


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def _split_key(key: str) -> tuple[int, str]:
    block, group = key.split(":", 1)
    return int(block), group


def plot_activation_by_state(profiles: dict[str, ChannelProfile], path: Path,
                             model_name: str) -> Path:
    """Grid of blocks x linear groups; each panel: per-channel RMS of the group's input for
    masked and unmasked tokens, channels sorted by the unmasked RMS (log scale)."""
    blocks = sorted({_split_key(k)[0] for k in profiles})
    groups = list(dict.fromkeys(_split_key(k)[1] for k in profiles))
    figure, axes = plt.subplots(len(blocks), len(groups), squeeze=False,
                                figsize=(3.4 * len(groups), 2.4 * len(blocks)))
    for row, block in enumerate(blocks):
        for col, group in enumerate(groups):
            profile = profiles[f"{block}:{group}"]
            order = profile.unmasked.argsort(descending=True)
            axis = axes[row][col]
            for state in ("unmasked", "masked"):
                values = getattr(profile, state)[order].clamp_min(1e-6).numpy()
                axis.plot(values, color=STATE_COLORS[state], linewidth=1,
                          label=f"{state} tokens")
            axis.set_yscale("log")
            low, mid, high = profile.channel_ratios().quantile(
                torch.tensor([0.1, 0.5, 0.9])).tolist()
            axis.set_title(f"block {block} · {group} input\nmasked/unmasked: {mid:.2f} "
                           f"({low:.2f}-{high:.2f})", fontsize=8)
            axis.tick_params(labelsize=7)
            if row == len(blocks) - 1:
                axis.set_xlabel("channel (sorted by unmasked RMS)", fontsize=8)
            if col == 0:
                axis.set_ylabel("RMS over tokens", fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{model_name}: activation magnitude per channel, masked vs unmasked "
                    "tokens (a gap between the curves is the state disparity SGAT fits "
                    "separate transforms for)\npanel titles: masked/unmasked RMS per channel, "
                    "median (10th-90th percentile over channels)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def plot_state_disparity(profiles: dict[str, ChannelProfile], path: Path,
                         model_name: str) -> Path:
    """Per linear group, over blocks: RMS ratio masked/unmasked and profile distance."""
    groups = list(dict.fromkeys(_split_key(k)[1] for k in profiles))
    figure, (ratio_axis, distance_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for group in groups:
        keys = sorted((k for k in profiles if _split_key(k)[1] == group), key=_split_key)
        blocks = [_split_key(k)[0] for k in keys]
        ratio_axis.plot(blocks, [profiles[k].channel_ratios().median().item() for k in keys],
                        marker="o", label=group)
        distance_axis.plot(blocks, [profiles[k].profile_distance for k in keys], marker="o",
                           label=group)
    ratio_axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ratio_axis.set(xlabel="decoder block", ylabel="masked / unmasked RMS (median channel)",
                   yscale="log", title="magnitude gap per channel (1 = none)")
    distance_axis.set(xlabel="decoder block", ylabel="1 - cosine of channel profiles",
                      title="which channels are loaded")
    for axis in (ratio_axis, distance_axis):
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.legend(fontsize=7, title="input of", title_fontsize=7)
    figure.suptitle(f"{model_name}: how differently masked and unmasked tokens drive each "
                    "linear group", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def plot_denoising_error(errors: dict[str, DenoisingErrors], path: Path, model_name: str,
                         sampler: str) -> Path:
    """Three panels over sampler steps: error on FP's canvases, error on each model's own
    trajectory, and the share of generated tokens differing from FP's canvas."""
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = (("teacher_forced", "relative error of last hidden states",
               "on FP's canvases (error added per step)"),
              ("free_running", "relative error of last hidden states",
               "on each model's own trajectory (accumulated)"),
              ("token_disagreement", "share of generated positions != FP",
               "tokens differing from FP's canvas"))
    for axis, (field_name, ylabel, title) in zip(axes, panels, strict=True):
        for name, series in errors.items():
            values = getattr(series, field_name)
            axis.plot(range(len(values)), values, label=name, linewidth=1.4)
        axis.set(xlabel="denoising step", ylabel=ylabel, title=title)
        axis.title.set_fontsize(9)
        axis.legend(fontsize=7)
    figure.suptitle(f"{model_name}: quantization error vs FP across a sampler run ({sampler});"
                    " 'SGAT, no TAC' and 'STaR-Quant' differ only by TAC", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def plot_linear_group_error(errors: dict[str, dict[str, float]], path: Path,
                            model_name: str) -> Path:
    """One panel per linear group (q/k/v, attention output, gate/up, down): the relative
    output error of each model over the decoder blocks (log scale)."""
    keys = next(iter(errors.values()))
    groups = list(dict.fromkeys(_split_key(k)[1] for k in keys))  # data-flow order
    figure, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.6),
                                sharey=True, squeeze=False)
    for axis, group in zip(axes[0], groups, strict=True):
        for name, values in errors.items():
            points = sorted((_split_key(k)[0], v) for k, v in values.items()
                            if _split_key(k)[1] == group)
            axis.plot([b for b, _ in points], [v for _, v in points], marker="o", label=name)
        axis.set_yscale("log")
        axis.set_title(f"{group} outputs", fontsize=9)
        axis.set_xlabel("decoder block")
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel("relative output error vs FP")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{model_name}: error of each linear group in a full forward pass on "
                    "held-out denoising states (includes error carried from earlier blocks)",
                    fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
