"""Quality benchmark: each model x scheme x method through the same harness.

For every run: masked-token CE and accuracy at t = 0.15 / 0.5 / 0.85, ELBO log-likelihood per
token of held-out continuations, greedy-generation token agreement with the FP model,
calibration wall time and peak resident memory. Prints a table and writes JSON (one row per
model x scheme x method). A benchmark, not a test.

    python benchmarks/quality.py                                  # both bundled models
    python benchmarks/quality.py --model /path/to/LLaDA-8B-Base --schemes W4A4 --samples 128

Evaluation text for any model is the bundled held-out split, tokenized with that model's own
tokenizer; calibration uses a disjoint slice of it (``assets.calibration_text``).
"""

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
import torch

from starquant_plugin.assets import TINY_MODELS, calibration_text, evaluation_text
from starquant_plugin.config import METHODS, method_args
from starquant_plugin.models.calibration import build_calibration_states
from starquant_plugin.models.evaluation import MASK_RATIOS, quality_summary, text_rows
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.pipeline import quantize_dllm

SCHEMES = ("W4A4", "W4A8", "W8A8")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", type=Path,
                        help="hub-layout LLaDA or Dream directory (repeatable)")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--methods", nargs="+", default=["fp", *METHODS],
                        choices=["fp", *METHODS])
    parser.add_argument("--samples", type=int, default=128, help="calibration rows")
    parser.add_argument("--epochs", type=int, default=15, help="SGAT epochs (learned methods)")
    parser.add_argument("--eval-rows", type=int, default=128)
    parser.add_argument("--elbo-rows", type=int, default=16)
    parser.add_argument("--mc-num", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a StarQuantArgs field for every method; the value is "
                             "JSON, e.g. --set exclusive_fraction=0.03125")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype the model is quantized (and its STaR tensors stored) in; "
                             "evaluation always runs in float32")
    parser.add_argument("--json", type=Path, default=Path("results/quality.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    overrides = {field: json.loads(value) for field, value in
                 (item.split("=", 1) for item in args.set)}
    results = []
    for path in args.model or list(TINY_MODELS.values()):
        fp_model, tokenizer = load_dllm(path)
        rows = text_rows(tokenizer, evaluation_text(), max_rows=args.eval_rows)
        prompts = rows[: args.prompts, :16]
        calibration = build_calibration_states(
            fp_model, text_rows(tokenizer, calibration_text()), args.samples, seed=args.seed)
        for scheme in args.schemes:
            for method in args.methods:
                if method == "fp" and scheme != args.schemes[0]:
                    continue
                model, _ = load_dllm(path, dtype=getattr(torch, args.dtype))
                seconds, peak, residuals = 0.0, 0, {}
                if method != "fp":
                    start = time.time()
                    with PeakMemory() as memory:
                        report = quantize_dllm(model, calibration, method_args(
                            method, scheme=scheme, seed=args.seed, epochs=args.epochs,
                            **overrides), progress=False)
                    seconds, peak = time.time() - start, memory.peak
                    residuals = {f"max_{key}": max(g[key] for g in report.groups.values())
                                 for key in ("residual_masked", "residual_unmasked")}
                model.float()  # exact upcast of the stored tensors
                row = {"model": str(path), "scheme": "FP" if method == "fp" else scheme,
                       "method": method, "overrides": overrides, "dtype": args.dtype,
                       "calib_seconds": seconds, "calib_peak_mb": peak / 2**20, **residuals}
                row |= quality_summary(model, fp_model, rows, prompts, args.elbo_rows,
                                       args.mc_num, args.seed)
                results.append(row)
                print_row(row, header=len(results) == 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


def print_row(row: dict, header: bool) -> None:
    columns = ["scheme", "method", *[f"ce@{t}" for t in MASK_RATIOS],
               *[f"acc@{t}" for t in MASK_RATIOS], "elbo", "gen_agreement", "calib_seconds",
               "calib_peak_mb"]
    if header:
        print("| model | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
    values = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
    print(f"| {Path(row['model']).name} | " + " | ".join(values) + " |", flush=True)


if __name__ == "__main__":
    main()
