"""Load time of an 8B-width STaR-Quant checkpoint with the load-time checks and without them.

    OMP_NUM_THREADS=1 python benchmarks/load_cost.py --json benchmarks/results/load-cost.json

The weights are made by the benchmark: a LLaDA model at LLaDA-8B's widths (``LLaDAConfig``'s
defaults: d 4096, 32 heads, MLP 12288, vocabulary 126464) with ``--layers`` decoder blocks
(2), random init, quantized W4A4 with the ``rtn`` preset (``quantize_dllm`` on a few random
calibration rows) and saved in bf16 with ``save_starquant``. Then, in this process,
``AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)`` is timed ``--repeats`` times per
variant, interleaved (one load of each per round, after one untimed load that warms the page
cache): as shipped, and with the checks replaced by no-ops (the header check against every
tensor's spec before loading and building those specs, the NaN/inf scan after it, and
``check_consistency``). The on-disk check ``check_checkpoint`` (what ``save_starquant`` runs:
the specs vLLM's per-tensor checker streams against, on every tensor) is timed alone too.
Seconds per GB are per 10^9 bytes of shards.
"""

import argparse
import gc
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401  registers llada and quant_method starquant
from starquant_plugin.config import method_args
from starquant_plugin.integrations import checkpoint_model, hf_quantizer
from starquant_plugin.integrations import format as checkpoint_format
from starquant_plugin.integrations.saving import save_starquant
from starquant_plugin.models.llada.configuration_llada import LLaDAConfig
from starquant_plugin.pipeline import quantize_dllm

MASK_ID = 126336


def make_checkpoint(path: Path, layers: int) -> None:
    """LLaDA-8B widths, ``layers`` blocks, random init, W4A4 rtn, saved in bf16."""
    torch.manual_seed(0)
    config = LLaDAConfig(n_layers=layers, mask_token_id=MASK_ID)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    rows = torch.randint(3, 126000, (4, 32))
    rows[:, ::2] = MASK_ID
    args = method_args("rtn", scheme="W4A4")
    quantize_dllm(model, rows, args, progress=False)
    save_starquant(model, path, args=args)


@contextmanager
def checks_off():
    """The load-time checks of the transformers path as no-ops (restored on exit)."""
    saved = {(module, name): getattr(module, name) for module, name in (
        (hf_quantizer, "check_headers"), (hf_quantizer, "tensor_specs"),
        (hf_quantizer, "checkpoint_float_dtype"), (hf_quantizer, "check_tensor_values"),
        (checkpoint_format, "check_consistency"))}
    for (module, name) in saved:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for (module, name), function in saved.items():
            setattr(module, name, function)


def load(path: Path, checks: bool) -> float:
    gc.collect()
    start = time.perf_counter()
    if checks:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        with checks_off():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    del model
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/load-cost.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "llada-8b-width-w4a4"
        make_checkpoint(path, args.layers)
        gb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
        load(path, checks=True)  # warm the page cache
        times = {"checks as shipped": [], "checks bypassed": [], "check_checkpoint alone": []}
        for _ in range(args.repeats):
            times["checks as shipped"].append(load(path, checks=True))
            times["checks bypassed"].append(load(path, checks=False))
            start = time.perf_counter()
            checkpoint_model.check_checkpoint(path)
            times["check_checkpoint alone"].append(time.perf_counter() - start)
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t), "runs_s": t,
                   "s_per_gb": statistics.median(t) / gb} for name, t in times.items()}
    extra = (rows["checks as shipped"]["median_s"] - rows["checks bypassed"]["median_s"])
    result = {"setup": f"LLaDA-8B widths, {args.layers} blocks, W4A4 rtn, bf16, {gb:.2f} GB "
                       f"of shards; from_pretrained(dtype=bfloat16), warm page cache, "
                       f"{args.repeats} interleaved repeats", "checkpoint_gb": gb,
              "checks_extra_s": extra, "checks_extra_s_per_gb": extra / gb, "loads": rows}
    print(f"{result['setup']}\n\n| load | median s | min s | s per GB |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['s_per_gb']:.2f} |")
    print(f"\nchecks add {extra:.2f} s ({extra / gb:.2f} s per GB)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
