"""Regenerate the measured tables of ``docs/results.md`` (and the README's summary) from the
benchmark JSON.

    python benchmarks/report.py            # rewrites the generated sections in place
    python benchmarks/report.py --check    # exit 1 if a page is out of date

Reads ``benchmarks/results/quality-*.json`` (rows of ``benchmarks/quality.py``), the focused
same-code re-runs beside them (``agreement-stress.json``, ``epochs15-stress.json``,
``agreement-clean.json``, ``tac-on-baselines.json``, ``float-quality-*.json``),
``variants.json`` and
``calibration-cost.json``
(``benchmarks/calibration_cost.py``). Every
quality number is a mean ± sample standard deviation over the seeds a row was run with
(``n`` in the tables). Gap closed is computed per seed against that seed's RTN and FP rows of
the same model, variant and scheme, ``(CE_RTN - CE) / (CE_RTN - CE_FP)``, then averaged.
Each section is written between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->`` markers;
the text around them is hand-written reading of the numbers.
"""

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
RATIOS = ("0.15", "0.5")
METHOD_ORDER = ("fp", "rtn", "smoothquant", "quarot", "quarot_gptq", "flatquant", "tac",
                "sgat", "starquant")


def mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def percent(values: list[float]) -> str:
    return mean_std([100 * v for v in values], 1) + " %" if values else ""


def label(row: dict) -> str:
    """Method name with its non-default overrides, e.g. ``starquant (kv_rotation=true)``."""
    if not row["overrides"]:
        return row["method"]
    extra = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(row["overrides"].items()))
    return f"{row['method']} ({extra})"


def load_rows(results: Path, pattern: str = "quality-*.json") -> list[dict]:
    rows = []
    for path in sorted(results.glob(pattern)):
        for row in json.loads(path.read_text()):
            rows.append(row | {"source": path.name})
    return rows


def grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(model, variant, scheme, label) -> the rows of its seeds."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["variant"], row["scheme"], label(row))].append(row)
    return groups


def reference(rows: list[dict], model: str, variant: str, method: str, scheme: str,
              seed: int) -> dict | None:
    for row in rows:
        if (row["model"], row["variant"], row["method"], row["seed"]) == (
                model, variant, method, seed) and not row["overrides"] and (
                method == "fp" or row["scheme"] == scheme):
            return row
    return None


def gap_closed(rows: list[dict], group: list[dict], ratio: str) -> list[float]:
    values = []
    for row in group:
        fp = reference(rows, row["model"], row["variant"], "fp", row["scheme"], row["seed"])
        rtn = reference(rows, row["model"], row["variant"], "rtn", row["scheme"], row["seed"])
        key = f"ce@{ratio}"
        if fp and rtn and rtn[key] != fp[key]:
            values.append((rtn[key] - row[key]) / (rtn[key] - fp[key]))
    return values


def excess(rows: list[dict], group: list[dict], ratio: str) -> list[float]:
    values = []
    for row in group:
        fp = reference(rows, row["model"], row["variant"], "fp", row["scheme"], row["seed"])
        if fp:
            values.append(row[f"ce@{ratio}"] - fp[f"ce@{ratio}"])
    return values


def order(key: tuple) -> tuple:
    model, variant, scheme, name = key
    method = name.split(" ")[0]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return model, variant, scheme != "FP", scheme, rank, name


def quality_table(rows: list[dict], select) -> str:
    """Markdown table of every group whose key passes ``select(model, variant, scheme, name)``."""
    header = ["model", "variant", "scheme", "method", "n", "CE@0.15", "CE@0.5",
              "CE@0.15 - FP", "gap closed @0.15", "gap closed @0.5", "ELBO/token",
              "gen. agreement", "calib. s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = grouped(rows)
    for key in sorted(groups, key=order):
        if not select(*key):
            continue
        group = groups[key]
        model, variant, scheme, name = key
        is_ref = name in ("fp", "rtn")
        seconds = statistics.mean(r["calib_seconds"] for r in group)
        cells = [model, variant, scheme, name, str(len(group)),
                 mean_std([r["ce@0.15"] for r in group]), mean_std([r["ce@0.5"] for r in group]),
                 "" if name == "fp" else mean_std(excess(rows, group, "0.15")),
                 "" if is_ref else percent(gap_closed(rows, group, "0.15")),
                 "" if is_ref else percent(gap_closed(rows, group, "0.5")),
                 mean_std([r["elbo"] for r in group]),
                 mean_std([r["gen_agreement"] for r in group]),
                 "" if name == "fp" else f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict], pairs: list[tuple[str, tuple[str, ...]]],
                 scheme: str = "W4A4") -> str:
    """For each ``(target, others)`` of ``pairs``: ``target`` minus each of ``others`` per seed
    (same calibration rows and evaluation masks), at ``scheme``, by model and variant:
    negative CE differences favour ``target``."""
    header = ["model", "variant", "comparison", "n", "ΔCE@0.15", "ΔCE@0.5",
              "seeds lower @0.15 / @0.5", "Δ gen. agreement",
              "std of excess CE@0.15 (target / other)"]
    with_se = any("gen_agreement_se" in row for row in rows)
    if with_se:  # how much of the agreement spread sampling the prompts alone explains
        header.append("prompt s.e. of Δ agreement")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = grouped(rows)
    for model, variant in sorted({(k[0], k[1]) for k in groups}):
        for target, others in pairs:
            mine = {r["seed"]: r for r in groups.get((model, variant, scheme, target), [])}
            for other in others:
                theirs = {r["seed"]: r for r in groups.get((model, variant, scheme, other), [])}
                seeds = sorted(set(mine) & set(theirs))
                if not seeds:
                    continue
                diff = {key: [mine[s][key] - theirs[s][key] for s in seeds]
                        for key in ("ce@0.15", "ce@0.5", "gen_agreement")}
                spread = [mean_std(excess(rows, [g[s] for s in seeds], "0.15")).split(" ± ")[-1]
                          if len(seeds) > 1 else "" for g in (mine, theirs)]
                lower = [sum(d < 0 for d in diff[key]) for key in ("ce@0.15", "ce@0.5")]
                cells = [model, variant, f"{target} − {other}", str(len(seeds)),
                         mean_std(diff["ce@0.15"]), mean_std(diff["ce@0.5"]),
                         f"{lower[0]} / {lower[1]} of {len(seeds)}",
                         mean_std(diff["gen_agreement"]),
                         " / ".join(spread) if any(spread) else ""]
                if with_se:  # sqrt(se_a^2 + se_b^2) per seed: no smaller than the paired s.e.
                    # when the two models' per-prompt agreements correlate positively
                    se = [(mine[s].get("gen_agreement_se", float("nan")) ** 2
                           + theirs[s].get("gen_agreement_se", float("nan")) ** 2) ** 0.5
                          for s in seeds]
                    cells.append(f"{statistics.mean(se):.3f}")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variants_table(results: Path) -> str:
    """Per model and site: the outlier ratio of the clean and the stress variant, and the
    stress target (the 8B ratio scaled to the tiny width)."""
    path = results / "variants.json"
    if not path.exists():
        return "_No variants.json yet: run `benchmarks/quality.py --variant stress`._"
    variants = {(v["model"], v["variant"]): v for v in json.loads(path.read_text())}
    lines = ["| model | block.reader input | clean | stress | stress target | rescaled channels "
             "(factor, chosen by) |", "|---|---|---|---|---|---|"]
    for (model, variant), stress in sorted(variants.items()):
        if variant != "stress":
            continue
        clean = variants.get((model, "clean"), {"ratios": {}})
        for site, ratio in stress["ratios"].items():
            channels = [c for c in stress["channels"] if f"{c['block']}.{c['reader']}" == site]
            described = ", ".join(f"{c['factor']:.0f}x {c['chosen_by']}" for c in channels)
            lines.append(f"| {model} | {site} | {clean['ratios'].get(site, float('nan')):.1f} | "
                         f"{ratio:.1f} | {stress['targets'][site]:.1f} | {described} |")
    return "\n".join(lines)


def setup_line(rows: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    samples = sorted({r.get("samples") for r in rows if r["method"] != "fp"} - {None})
    epochs = sorted({r.get("epochs") for r in rows if r["method"] != "fp"} - {None})
    prompts = sorted({r.get("prompts", 32) for r in rows})  # rows before the field: 32
    masks = sorted({(r["eval_rows"], r["mask_draws"]) for r in rows if "mask_draws" in r})
    files = sorted({r["source"] for r in rows})
    scored = "".join(f"masked CE on {n} held-out rows x {k} mask draws; " for n, k in masks)
    return (f"Seeds {seeds}; calibration rows {samples} x 128 tokens; SGAT epochs {epochs}; "
            f"{scored}generation-agreement prompts {prompts}; "
            f"source: {', '.join(f'`benchmarks/results/{f}`' for f in files)}.")


def calibration_cost_section(results: Path) -> str:
    path = results / "calibration-cost.json"
    if not path.exists():
        return "_Not measured yet: run `benchmarks/calibration_cost.py`._"
    cost = json.loads(path.read_text())
    lines = ["| quantity | value |", "|---|---|"]
    for name, value in cost["table"]:
        lines.append(f"| {name} | {value} |")
    return "\n".join(lines) + "\n\n" + cost["setup"]


UNGATED = "starquant (state_gating=false, tac=false)"
"""The learned transform without gates or TAC, started and fitted as STaR-Quant is: the
control that separates gating + TAC from the initialisation and schedule."""
FINAL = "stress-w4a4-*.json"
"""The headline runs: every method on the same code, 15 epochs, 5 seeds, low-noise CE."""
FINAL_8BIT = "stress-w4a8-w8a8-*.json"
"""The headline settings at W4A8 and W8A8: RTN, FlatQuant-style and STaR-Quant, 3 seeds."""

MAIN = ("fp", "rtn", "smoothquant", "quarot", "quarot_gptq", "flatquant", "tac", "sgat",
        "starquant")


def sections(results: Path) -> dict[str, str]:
    all_rows = load_rows(results)
    clean = [r for r in all_rows if r["variant"] == "clean"]
    rows = [r for r in all_rows if r["variant"] == "stress"]
    w4a4 = [r for r in rows if r["scheme"] in ("FP", "W4A4")]
    others = [r for r in rows if r["scheme"] in ("W4A8", "W8A8")]
    return {
        **family_sections(results),
        "quality-clean": (setup_line(clean) + "\n\n" + quality_table(clean, lambda *key: True)
                          + "\n\n" + paired_table(clean, default_pairs(clean))
                          if clean else "_Not measured yet._"),
        "stress-variants": variants_table(results),
        "quality-w4a4": setup_line(w4a4) + "\n\n" + quality_table(
            rows, lambda m, v, s, n: s in ("FP", "W4A4") and n in MAIN),
        "quality-paired": paired_table(rows, [
            ("starquant", tuple(m for m in MAIN[2:] if m != "starquant")),
            ("sgat", ("flatquant", "quarot")),
            *default_pairs(rows)]),
        "quality-ablation": quality_table(
            rows, lambda m, v, s, n: s == "W4A4" and (n in ("tac", "sgat", "starquant")
                                                      or n not in MAIN)),
        "quality-w4a8-w8a8": (setup_line(others) + "\n\n" if others else "") + quality_table(
            rows, lambda m, v, s, n: s in ("W4A8", "W8A8")),
        "quality-agreement": same_code_section(results, "agreement-stress.json",
                                               [("starquant", ("flatquant", "quarot"))]),
        "quality-epochs15": same_code_section(results, "epochs15-stress.json",
                                              [("starquant", ("flatquant",))]),
        "quality-clean-agreement": same_code_section(results, "agreement-clean.json"),
        "calibration-cost": calibration_cost_section(results),
        "quality-final": same_code_section(results, FINAL, [
            ("starquant", ("flatquant", "quarot", "quarot_gptq", "smoothquant", UNGATED, "sgat",
                           "tac")),
            ("sgat", ("flatquant", UNGATED)),
            (UNGATED, ("flatquant",))]),
        "tac-on-baselines": same_code_section(
            results, TAC_ON_BASELINES,
            [(f"{method} (tac=true)", (method,)) for method in TAC_BASELINES]),
        "quality-final-w4a8-w8a8": same_code_section(
            results, FINAL_8BIT, [("starquant", ("flatquant", "rtn"))],
            schemes=("W4A8", "W8A8")),
        "quality-float-formats": same_code_section(
            results, FLOAT_FORMATS, [("starquant", ("flatquant", "quarot", "rtn"))],
            schemes=FLOAT_SCHEMES),
    }


FLOAT_FORMATS = "float-quality-*.json"
"""The float schemes (issue 26): RTN, QuaRot-style, FlatQuant-style and STaR-Quant, clean and
stress models, 3 seeds."""
FLOAT_SCHEMES = ("W8A8-FP8", "W4A8-FP8", "W4A4-MXFP4", "W4A4-NVFP4")


TAC_ON_BASELINES = "tac-on-baselines.json"
"""W4A4 RTN, QuaRot-style, FlatQuant-style and SGAT without and with TAC (``--set tac=true``:
what ``TACModifier`` after each adds), clean and stress models, paired by seed. The rows
without TAC ran with ``--set tac=false``, the presets' own value, stored without the override."""
TAC_BASELINES = ("rtn", "quarot", "flatquant", "sgat")

PRESETS = ("rtn", "smoothquant", "quarot", "quarot_gptq", "flatquant", "starquant")
OLD_DEFAULT = "starquant (k_smoothing=0, kv_rotation=false, tac_shrinkage=0.2)"
"""STaR-Quant's defaults before issue 22: no K/V rotation, no key smoothing, TAC at 0.2."""
FIXED_TAC = "starquant (k_smoothing=0, tac_shrinkage=0.2)"
"""The default the one-factor ablations on the tuning set were run against."""
TUNING_PAIRS = [
    ("starquant", ("flatquant", "starquant (k_smoothing=0)")),
    ("starquant (k_smoothing=0)", (FIXED_TAC, "starquant (k_smoothing=0, tac=false)")),
    (FIXED_TAC, tuple(label({"method": "starquant", "overrides": {
        "k_smoothing": 0, "tac_shrinkage": 0.2, field: value}}) for field, value in (
        ("init_rotation", "random"), ("init_scale_alpha", 0.3), ("lr_schedule", "cosine"),
        ("state_gating", False), ("kv_rotation", False)))),
]
"""Each step to the final default on the tuning set, and each one-factor ablation."""
COMPONENTS = [("starquant", ("starquant (k_smoothing=0)",)),
              ("starquant (k_smoothing=0)", ("starquant (k_smoothing=0, tac=false)",))]
"""What each part adds on the held-out family: STaR-Quant with and without it, paired by
seed (TAC was ablated before key smoothing became a default, so against that configuration)."""


def family_sections(results: Path) -> dict[str, str]:
    """The seeded stress family (issue 22): its variants, the tuning ablation, every preset on
    the held-out and confirmation variants, what each component adds, the clean models."""
    tuning = load_rows(results, TUNING)
    held = load_rows(results, HELD_OUT)
    confirmation = load_rows(results, CONFIRMATION)
    clean = load_rows(results, CLEAN_DEFAULTS)

    def scheme_rows(rows: list[dict], scheme: str) -> list[dict]:
        return [r for r in rows if r["scheme"] in ("FP", scheme)]

    def missing(name: str) -> str:
        return f"_Not measured yet: no `benchmarks/results/{name}`._"

    sections = {"family-variants": family_variants_table(results),
                "family-tuning": (
                    setup_line(tuning) + "\n\n" + family_config_table(tuning, "W4A4") + "\n\n"
                    + family_paired_table(tuning, "W4A4", TUNING_PAIRS)
                    if tuning else missing(TUNING))}
    for scheme in ("W4A4", "W4A8"):
        rows = scheme_rows(held, scheme)
        sections[f"family-held-out-{scheme.lower()}"] = (
            setup_line(rows) + "\n\nExcess CE over FP at t = 0.15 / 0.5:\n\n"
            + family_excess_table(rows, scheme, PRESETS) + "\n\nSTaR-Quant against each "
            "preset, over the family:\n\n"
            + family_paired_table(rows, scheme, [("starquant", BASELINES)])
            + "\n\nPer variant:\n\n"
            + paired_table(rows, [("starquant", BASELINES)], scheme)
            if rows else missing(HELD_OUT))
    star_configs = [r for r in scheme_rows(held, "W4A4") if r["method"] in ("fp", "starquant")]
    sections["family-components"] = (
        family_config_table(star_configs, "W4A4") + "\n\n"
        + family_paired_table(scheme_rows(held, "W4A4"), "W4A4", COMPONENTS)
        if held else missing(HELD_OUT))
    sections["family-confirmation"] = (
        setup_line(confirmation) + "\n\n"
        + family_excess_table(confirmation, "W4A4", ("rtn", "flatquant", "starquant"))
        + "\n\n" + family_paired_table(confirmation, "W4A4", [("starquant", ("flatquant",))])
        + "\n\n" + paired_table(confirmation, [("starquant", ("flatquant",))])
        if confirmation else missing(CONFIRMATION))
    sections["clean-defaults"] = (
        setup_line(clean) + "\n\n" + quality_table(clean, lambda *key: True) + "\n\n"
        + paired_table(clean, [("starquant", (OLD_DEFAULT,))])
        if clean else missing(CLEAN_DEFAULTS))
    return sections


def default_pairs(rows: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """STaR-Quant with each of its measured overrides against the default and the baselines."""
    return [(name, ("starquant", "flatquant", "quarot")) for name in sorted(
        {label(r) for r in rows if r["method"] == "starquant" and r["overrides"]})]


def same_code_section(results: Path, name: str,
                      pairs: list[tuple[str, tuple[str, ...]]] | None = None,
                      schemes: tuple[str, ...] = ("W4A4",)) -> str:
    """The rows of one file of focused re-runs (every method in it on the same code and
    settings), with ``pairs``' paired differences (default: each STaR-Quant override against
    the default), paired within each of ``schemes``: ``stress-w4a4-*.json`` (the headline:
    every W4A4 method at the defaults, 5 seeds, low-noise CE), ``stress-w4a8-w8a8-*.json``
    (the same settings at 8-bit activations), ``agreement-stress.json`` (216 generation prompts),
    ``epochs15-stress.json`` (15 SGAT epochs), ``agreement-clean.json`` (the clean models, 216
    prompts)."""
    rows = load_rows(results, name)
    if not rows:
        return f"_Not measured yet: no `benchmarks/results/{name}`._"
    paired = [(f"Paired by seed, {scheme}:\n\n" if len(schemes) > 1 else "")
              + paired_table(rows, pairs or default_pairs(rows), scheme) for scheme in schemes]
    return (setup_line(rows) + "\n\n" + quality_table(rows, lambda *key: True) + "\n\n"
            + "\n\n".join(paired))


TUNING = "tuning-*.json"
"""One-factor ablations of STaR-Quant on the tuning variants of the stress family."""
HELD_OUT = "held-out-*.json"
"""Every preset on the held-out variants of the stress family (never used to choose)."""
CONFIRMATION = "confirmation-*.json"
"""RTN, FlatQuant-style and STaR-Quant on the confirmation variants, run with the final
defaults."""
CLEAN_DEFAULTS = "clean-defaults-*.json"
"""The clean bundled models with STaR-Quant's defaults before and after issue 22."""
BASELINES = ("smoothquant", "quarot", "quarot_gptq", "flatquant")


def family_variants_table(results: Path) -> str:
    """Per variant of the stress family: how many channels it rescales and the largest outlier
    ratio (channel absmax / median channel absmax, any block) at each kind of site."""
    path = results / "variants.json"
    variants = [v for v in json.loads(path.read_text()) if v["variant"].startswith("outliers-")]
    if not variants:
        return "_No family variants in variants.json yet: run `benchmarks/quality.py " \
               "--variant tuning --variant held-out --variant confirmation --describe-only`._"
    sites = {"q/k/v input": ("q_proj",), "output-projection input": ("attn_out", "o_proj"),
             "gate/up input": ("ff_proj", "gate_proj"), "down-projection input":
             ("ff_out", "down_proj")}
    lines = ["| model | variant | rescaled channels | largest ratio: " + " | ".join(sites)
             + " | K (k_proj output) |", "|---|---|---|" + "---|" * (len(sites) + 1)]
    for v in sorted(variants, key=lambda v: (v["model"], int(v["variant"].split("-")[1]))):
        cells = [max(r for site, r in v["ratios"].items() if site.endswith(names))
                 for names in sites.values()]
        keys = [r["after"] for site, r in v["family_ratios"].items() if site.endswith("k_proj")]
        cells.append(max(keys) if keys else 0.0)
        lines.append(f"| {v['model']} | {v['variant']} | {len(v['channels'])} | "
                     + " | ".join(f"{c:.0f}" if c else "–" for c in cells) + " |")
    return "\n".join(lines)


def family_excess_table(rows: list[dict], scheme: str, names: tuple[str, ...]) -> str:
    """Excess CE over FP at t = 0.15 and 0.5 (``a / b`` per cell) of each of ``names`` on every
    variant, mean over seeds; per model a family-mean row (mean over variants, ± the std over
    seeds of the per-seed family mean) and the share of RTN's gap STaR-Quant closes."""
    groups = grouped(rows)
    header = ["model", "variant", "n", "FP CE@0.15", *names, "starquant gap closed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(per_seed: dict[int, tuple[float, float]]) -> str:
        if not per_seed:
            return ""
        values = list(per_seed.values())
        return " / ".join(mean_std([v[i] for v in values]) for i in (0, 1))

    for model in sorted({key[0] for key in groups}):
        variants = sorted({key[1] for key in groups if key[0] == model},
                          key=lambda v: (len(v), v))
        family: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(
            lambda: defaultdict(list))
        closed_family: dict[int, list[float]] = defaultdict(list)
        for variant in variants:
            cells, seeds = [], set()
            for name in names:
                group = groups.get((model, variant, scheme, name), [])
                per_seed = {}
                for row in group:
                    fp = reference(rows, model, variant, "fp", scheme, row["seed"])
                    if fp:
                        per_seed[row["seed"]] = tuple(row[f"ce@{r}"] - fp[f"ce@{r}"]
                                                      for r in RATIOS)
                        family[name][row["seed"]].append(per_seed[row["seed"]])
                seeds |= set(per_seed)
                cells.append(cell(per_seed))
            star = groups.get((model, variant, scheme, "starquant"), [])
            closed = {r: gap_closed(rows, star, r) for r in RATIOS}
            for row in star:
                closed_family[row["seed"]] += gap_closed(rows, [row], "0.15")
            fp_rows = groups.get((model, variant, "FP", "fp"), [])
            lines.append("| " + " | ".join(
                [model, variant, str(len(seeds)), mean_std([r["ce@0.15"] for r in fp_rows]),
                 *cells, " / ".join(percent(closed[r]) for r in RATIOS)]) + " |")
        means = []
        for name in names:
            complete = {seed: tuple(statistics.mean(v[i] for v in values) for i in (0, 1))
                        for seed, values in family[name].items()
                        if len(values) == len(variants)}
            means.append(cell(complete))
        closed_mean = [statistics.mean(v) for v in closed_family.values()
                       if len(v) == len(variants)]
        lines.append("| " + " | ".join(
            [model, f"**mean of {len(variants)}**", "", "", *means,
             percent(closed_mean) + " @0.15"]) + " |")
    return "\n".join(lines)


def family_config_table(rows: list[dict], scheme: str) -> str:
    """One row per model and configuration (method with its overrides): excess CE over FP at
    t = 0.15 / 0.5 on each variant (mean over seeds) and the mean over the variants."""
    groups = grouped(rows)
    lines = []
    for model in sorted({key[0] for key in groups}):
        variants = sorted({key[1] for key in groups if key[0] == model},
                          key=lambda v: (len(v), v))
        if not lines:
            lines = ["| model | configuration | " + " | ".join(variants) + " | mean |",
                     "|---|---|" + "---|" * (len(variants) + 1)]
        names = sorted({key[3] for key in groups if key[0] == model and key[2] == scheme},
                       key=lambda n: order((model, "", scheme, n)))
        for name in names:
            cells, means = [], {r: [] for r in RATIOS}
            for variant in variants:
                group = groups.get((model, variant, scheme, name), [])
                values = {r: excess(rows, group, r) for r in RATIOS}
                if not values["0.15"]:
                    cells.append("")
                    continue
                for r in RATIOS:
                    means[r].append(statistics.mean(values[r]))
                cells.append(" / ".join(f"{statistics.mean(values[r]):.3f}" for r in RATIOS))
            complete = len(means["0.15"]) == len(variants)
            mean = " / ".join(f"{statistics.mean(means[r]):.4f}" for r in RATIOS)
            lines.append(f"| {model} | {name} | " + " | ".join(cells)
                         + f" | {mean if complete else ''} |")
    return "\n".join(lines)


def family_paired_table(rows: list[dict], scheme: str,
                        pairs: list[tuple[str, tuple[str, ...]]]) -> str:
    """For each ``(target, others)`` of ``pairs``: ``target`` minus each of ``others``, paired
    by variant and seed, over each model's family: mean ± std over (variant, seed) pairs, how
    many are lower, and the worst variant (largest mean difference) at t = 0.15 and 0.5."""
    groups = grouped(rows)
    header = ["model", "comparison", "pairs", "ΔCE@0.15", "ΔCE@0.5", "lower @0.15 / @0.5",
              "worst variant @0.15", "worst variant @0.5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in sorted({key[0] for key in groups}):
        variants = sorted({key[1] for key in groups if key[0] == model})
        for target, other in [(t, o) for t, others in pairs for o in others]:
            diffs: dict[str, list[float]] = {r: [] for r in RATIOS}
            worst: dict[str, tuple[float, str]] = {}
            for variant in variants:
                mine = {r["seed"]: r for r in groups.get((model, variant, scheme, target), [])}
                theirs = {r["seed"]: r for r in groups.get((model, variant, scheme, other), [])}
                seeds = sorted(set(mine) & set(theirs))
                for ratio in RATIOS:
                    d = [mine[s][f"ce@{ratio}"] - theirs[s][f"ce@{ratio}"] for s in seeds]
                    diffs[ratio] += d
                    if d and (ratio not in worst or statistics.mean(d) > worst[ratio][0]):
                        worst[ratio] = (statistics.mean(d), variant)
            if not diffs["0.15"]:
                continue
            lower = [sum(d < 0 for d in diffs[r]) for r in RATIOS]
            lines.append("| " + " | ".join(
                [model, f"{target} − {other}", str(len(diffs["0.15"])),
                 mean_std(diffs["0.15"]), mean_std(diffs["0.5"]),
                 f"{lower[0]} / {lower[1]} of {len(diffs['0.15'])}",
                 *(f"{worst[r][0]:+.3f} ({worst[r][1]})" for r in RATIOS)]) + " |")
    return "\n".join(lines)


def readme_table(rows: list[dict]) -> str:
    """The README's summary: every preset at W4A4 on the held-out variants of the stress family,
    excess CE over FP and the share of RTN's gap closed, mean ± std over (variant, seed)."""
    header = ["model", "method", "runs", "excess CE@0.15", "excess CE@0.5", "gap closed @0.15",
              "gap closed @0.5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = grouped([r for r in rows if r["scheme"] == "W4A4"])
    for model in sorted({key[0] for key in groups}):
        for name in PRESETS:
            group = [r for key, g in groups.items() if (key[0], key[3]) == (model, name)
                     for r in g]
            if group:
                lines.append("| " + " | ".join(
                    [model, name, str(len(group)),
                     *(mean_std(excess(rows, group, r)) for r in RATIOS),
                     *("" if name == "rtn" else percent(gap_closed(rows, group, r))
                       for r in RATIOS)]) + " |")
    return "\n".join(lines)


def render(page: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", re.S)
        if not pattern.search(page):
            raise ValueError(f"The page has no <!-- BEGIN {name} --> ... <!-- END {name} --> "
                             "markers; add them where the table belongs.")
        page = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), page)
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if a page differs from the JSON")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    pages = {PAGE: sections(args.results),
             README: {"readme-results": readme_table(load_rows(args.results, HELD_OUT))}}
    stale = []
    for path, generated in pages.items():
        page = path.read_text()
        new = render(page, generated)
        if new != page:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
                print(f"wrote {path}")
    if args.check and stale:
        sys.exit(f"{', '.join(stale)} out of date: run python benchmarks/report.py")


if __name__ == "__main__":
    main()
