"""Quality benchmark: each model x variant x scheme x method x seed through the same harness.

For every run: masked-token CE and accuracy at t = 0.15 / 0.5 / 0.85, ELBO log-likelihood per
token of held-out continuations, greedy-generation token agreement with the FP model of the
same variant, calibration wall time and peak resident memory. Prints one line per run and
writes JSON (one row per run, rewritten after every run; ``--resume`` skips rows already in
it). ``benchmarks/report.py`` turns the JSON into the tables of ``docs/results.md``. A
benchmark, not a test.

    python benchmarks/quality.py                                  # both bundled models, clean
    python benchmarks/quality.py --variant clean --variant stress --seeds 0 1 2 \\
        --json benchmarks/results/quality-w4a4.json
    python benchmarks/quality.py --model /path/to/LLaDA-8B-Base --schemes W4A4 --samples 128

Variants: ``clean`` is the model as shipped; ``stress`` adds 8B-style outlier channels by an
exactly function-preserving rescaling (``starquant_plugin.models.outliers``); ``outliers-N``
is variant ``N`` of the seeded stress family (``starquant_plugin.models.outlier_family``), and
``tuning`` / ``held-out`` / ``confirmation`` stand for all variants of that set. Channels are
chosen once per model from 32 calibration states of seed 0, so every seed and method sees the
same model.
Evaluation text is the bundled held-out split, tokenized with the model's own tokenizer;
calibration uses a disjoint slice of it (``assets.calibration_text``). The seed changes the
calibration rows, the evaluation masks and the fit's initialisation.
"""

import argparse
import copy
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import get_args

import psutil
import torch

from starquant_plugin.assets import TINY_MODELS, calibration_text, evaluation_text
from starquant_plugin.config import METHODS, SchemeName, method_args
from starquant_plugin.models.calibration import build_calibration_states
from starquant_plugin.models.evaluation import (
    MASK_RATIOS,
    greedy_generate,
    quality_summary,
    text_rows,
)
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.models.outlier_family import (
    CONFIRMATION_SEEDS,
    HELD_OUT_SEEDS,
    TUNING_SEEDS,
    add_family_outliers_,
)
from starquant_plugin.models.outliers import add_stress_outliers_, outlier_ratios
from starquant_plugin.pipeline import quantize_dllm

SCHEMES = ("W4A4", "W4A8", "W8A8")
"""The default schemes; ``--schemes`` takes every preset (FP8 ones too)."""
FAMILY_SETS = {"tuning": TUNING_SEEDS, "held-out": HELD_OUT_SEEDS,
               "confirmation": CONFIRMATION_SEEDS}
STRESS_ROWS, STRESS_SEED = 32, 0


class PeakMemory:
    """Peak resident set size (bytes) above the level at entry, sampled every 20 ms."""

    def __enter__(self):
        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
        self.peak, self._running = 0, True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self._process.memory_info().rss - self._base)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()


def load_variant(path: Path, variant: str, dtype: torch.dtype):
    """(model in ``dtype``, tokenizer, description) of a variant; the description holds the
    outlier ratio of every site and, for the stress variant, the rescaled channels."""
    model, tokenizer = load_dllm(path, dtype=dtype)
    reference, _ = load_dllm(path)  # float32, for the sampler that makes trajectory states
    rows = build_calibration_states(reference, text_rows(tokenizer, calibration_text()),
                                    STRESS_ROWS, seed=STRESS_SEED)
    description: dict = {"model": path.name, "variant": variant}
    if variant == "stress":
        report = add_stress_outliers_(model, rows)
        description["targets"] = {site: r["target"] for site, r in report.ratios.items()}
    elif variant.startswith("outliers-"):
        report = add_family_outliers_(model, rows, int(variant.removeprefix("outliers-")))
        description["family_ratios"] = report.ratios
    if variant != "clean":
        description["channels"] = [asdict(c) for c in report.channels]
    description["ratios"] = outlier_ratios(model, rows)
    return model, tokenizer, description


def variant_names(name: str) -> list[str]:
    """``--variant`` value -> the variants it stands for."""
    if name in FAMILY_SETS:
        return [f"outliers-{seed}" for seed in FAMILY_SETS[name]]
    if name in ("clean", "stress") or (name.startswith("outliers-")
                                       and name.removeprefix("outliers-").isdigit()):
        return [name]
    raise argparse.ArgumentTypeError(
        f"unknown variant {name!r}: use clean, stress, outliers-N, tuning, held-out or "
        "confirmation")


def row_key(row: dict) -> tuple:
    return (row["model"], row["variant"], row["scheme"], row["method"], row["seed"],
            json.dumps(row["overrides"], sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", type=Path,
                        help="hub-layout LLaDA or Dream directory (repeatable)")
    parser.add_argument("--variant", action="append", type=variant_names,
                        help="clean (as shipped), stress, outliers-N, tuning, held-out or "
                             "confirmation (repeatable; default clean)")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES),
                        choices=get_args(SchemeName))
    parser.add_argument("--methods", nargs="+", default=["fp", *METHODS],
                        choices=["fp", *METHODS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration rows")
    parser.add_argument("--epochs", type=int, default=15, help="SGAT epochs (learned methods)")
    parser.add_argument("--eval-rows", type=int, default=128,
                        help="held-out rows for masked CE (at most 216)")
    parser.add_argument("--mask-draws", type=int, default=1,
                        help="stratified masks per row and ratio for masked CE (8 scores "
                             "every position at t = 0.15 once or more)")
    parser.add_argument("--mask-ratios", nargs="+", type=float, default=list(MASK_RATIOS),
                        help="mask ratios t of masked CE (the tables use 0.15 and 0.5)")
    parser.add_argument("--elbo-rows", type=int, default=16)
    parser.add_argument("--mc-num", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=64,
                        help="generation-agreement prompts (x 32 generated tokens; at most 216, "
                             "one per held-out row)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a StarQuantArgs field for every method; the value is "
                             "JSON, e.g. --set exclusive_fraction=0.03125")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype the model is quantized (and its STaR tensors stored) in; "
                             "evaluation always runs in float32")
    parser.add_argument("--json", type=Path, default=Path("results/quality.json"))
    parser.add_argument("--describe-only", action="store_true",
                        help="only record the variants' outlier ratios (and rescaled channels) "
                             "in variants.json beside --json; run no method")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json and skip those runs")
    args = parser.parse_args()
    overrides = {field: json.loads(value) for field, value in
                 (item.split("=", 1) for item in args.set)}
    dtype = getattr(torch, args.dtype)
    results = json.loads(args.json.read_text()) if args.resume and args.json.exists() else []
    done = {row_key(row) for row in results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    variants_file = args.json.with_name("variants.json")
    variants = json.loads(variants_file.read_text()) if variants_file.exists() else []
    for path in args.model or list(TINY_MODELS.values()):
        for variant in [v for names in args.variant or [["clean"]] for v in names]:
            base, tokenizer, description = load_variant(path, variant, dtype)
            variants = [v for v in variants
                        if (v["model"], v["variant"]) != (path.name, variant)] + [description]
            variants_file.write_text(json.dumps(variants, indent=2) + "\n")
            if args.describe_only:
                continue
            ratios = description["ratios"]
            fp_model = copy.deepcopy(base).float()  # exact upcast
            held_out = text_rows(tokenizer, evaluation_text())
            rows = held_out[: args.eval_rows]
            prompts = held_out[: args.prompts, :16]  # first 16 tokens, up to every held-out row
            fp_generation = greedy_generate(fp_model, prompts)  # once, for every run
            for seed in args.seeds:
                torch.manual_seed(seed)
                calibration = build_calibration_states(
                    fp_model, text_rows(tokenizer, calibration_text()), args.samples, seed=seed)
                for scheme in args.schemes:
                    for method in args.methods:
                        if method == "fp" and scheme != args.schemes[0]:
                            continue
                        key = {"model": path.name, "variant": variant,
                               "scheme": "FP" if method == "fp" else scheme,
                               "method": method, "seed": seed, "overrides": overrides}
                        if row_key(key) in done:
                            continue
                        row = key | run(base, fp_generation, calibration, rows, prompts,
                                        method, scheme, seed, overrides, args)
                        row["outlier_ratio_max"] = max(ratios.values())
                        results.append(row)
                        args.json.write_text(json.dumps(results, indent=2) + "\n")
                        print_row(row, header=len(results) == 1)
    print(f"wrote {variants_file}" if args.describe_only else f"wrote {args.json}")


def run(base, fp_generation, calibration, rows, prompts, method, scheme, seed, overrides,
        args) -> dict:
    """Quantize a copy of ``base`` with ``method`` (unless "fp") and score it against FP."""
    model = copy.deepcopy(base)
    seconds, peak, residuals = 0.0, 0, {}
    if method != "fp":
        start = time.time()
        with PeakMemory() as memory:
            report = quantize_dllm(model, calibration, method_args(
                method, scheme=scheme, seed=seed, epochs=args.epochs, **overrides),
                progress=False)
        seconds, peak = time.time() - start, memory.peak
        residuals = {f"max_{key}": max(g[key] for g in report.groups.values())
                     for key in ("residual_masked", "residual_unmasked")}
        residuals["tac_shrinkage"] = {name: g["tac_shrinkage"] for name, g in
                                      report.groups.items() if "tac_shrinkage" in g}
    model.float()  # exact upcast of the stored tensors
    row = {"dtype": args.dtype, "samples": args.samples, "epochs": args.epochs,
           "prompts": len(prompts), "eval_rows": len(rows), "mask_draws": args.mask_draws,
           "calib_seconds": seconds, "calib_peak_mb": peak / 2**20, **residuals}
    return row | quality_summary(model, fp_generation, rows, prompts, args.elbo_rows,
                                 args.mc_num, seed, args.mask_draws, tuple(args.mask_ratios))


def print_row(row: dict, header: bool) -> None:
    columns = ["variant", "scheme", "method", "seed",
               *[f"ce@{t}" for t in MASK_RATIOS if f"ce@{t}" in row],
               "elbo", "gen_agreement", "calib_seconds"]
    if header:
        print("| model | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
    values = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
    print(f"| {Path(row['model']).name} | " + " | ".join(values) + " |", flush=True)


if __name__ == "__main__":
    main()
