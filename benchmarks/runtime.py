"""Size, CPU latency and peak memory of STaR-Quant checkpoints vs their bf16 originals.

For each bundled tiny model (TINY_LLADA; TINY_DREAM when present) and each scheme (W8A8,
W4A4): load it in bf16 as shipped, quantize, ``save_starquant``, reload with ``from_pretrained``
(bf16) in a fresh process, and measure on-disk and in-memory bytes (transformer-block weights
and whole model, STaR tensors included), forward latency and peak RSS; the same for the bf16
original. Then one synthetic LLaDA-8B-shaped block (d=4096, MLP 12288) built from
``StarQuantLinear``s. Prints a table and writes JSON::

    OMP_NUM_THREADS=1 python benchmarks/runtime.py --out results/runtime.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from starquant_plugin.integrations.format import (
    bytes_by_part,
    checkpoint_tensor_bytes,
    module_tensor_bytes,
)

BF16_BYTES = 2


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_bytes(path: Path, block_pattern: str) -> dict[str, int]:
    """Bytes of the tensors in ``path``'s shards: whole model, block tensors, STaR tensors."""
    return bytes_by_part(checkpoint_tensor_bytes(path), block_pattern)


def memory_bytes(model: torch.nn.Module, block_pattern: str) -> dict[str, int]:
    return bytes_by_part(module_tensor_bytes(model), block_pattern)


def _latency_ms(run, repeats: int = 10) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def measure_checkpoint(path: str, seq: int) -> dict:
    """Runs in a fresh process: reload ``path`` and measure it."""
    from transformers import AutoModelForCausalLM

    import starquant_plugin  # noqa: F401  (registers the quantizer)
    from starquant_plugin.models.families import family_of

    base_rss = _rss_mib()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 100, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latency = _latency_ms(lambda: model(ids))
    return {"memory": memory_bytes(model, family_of(model).block_pattern), "latency_ms": latency,
            "peak_rss_mib": _rss_mib(), "peak_rss_over_imports_mib": _rss_mib() - base_rss}


def measure_synthetic(scheme: str, seq: int, d: int = 4096, d_mlp: int = 12288) -> dict:
    """Runs in a fresh process: one LLaDA-8B-shaped block's 7 linears (d 4096, MLP 12288), x
    through each in turn. Quantized: stored in bf16 like a checkpoint of a bf16 model, with
    the default structured transforms (k = d/64, Kronecker factors) and TAC on o_proj; the
    values are random (sizes and latency do not depend on them). FP: float32 linears."""
    from starquant_plugin.config import StarQuantArgs
    from starquant_plugin.method import (
        MaskState,
        SGATResult,
        StarQuantInputTransform,
        StarQuantLinear,
        TACParams,
        scheme_args,
    )
    from starquant_plugin.method.quantizers import fake_quantize_weight
    from starquant_plugin.method.runtime import weight_qparams

    groups = {("q_proj", "k_proj", "v_proj"): (d, d), ("o_proj",): (d, d),
              ("gate_proj", "up_proj"): (d_mlp, d), ("down_proj",): (d, d_mlp)}
    args = StarQuantArgs(scheme=scheme if scheme != "FP" else "W4A4")
    base_rss = _rss_mib()
    generator = torch.Generator().manual_seed(0)
    state = MaskState()
    state.mask_state = torch.rand(1, seq, generator=generator) < 0.5
    layers = {}
    for names, (out_features, in_features) in groups.items():
        transform = None
        if scheme != "FP":
            weight_args, act_args = scheme_args(scheme)
            k, (n1, n2) = args.exclusive_width(in_features), args.factors(in_features)
            sgat = SGATResult(
                exclusive=torch.linalg.qr(torch.randn(in_features, 2 * k,
                                                      generator=generator))[0],
                channel_scale=torch.ones(in_features), left=torch.eye(n1), right=torch.eye(n2),
                act_clip=torch.ones(2), weight_clip=torch.ones(out_features))
            g = args.tac_group_size
            tac = TACParams(torch.eye(g).repeat(in_features // g, 1, 1),
                            torch.zeros(in_features)) if names == ("o_proj",) else None
            transform = StarQuantInputTransform(sgat, act_args, state, tac, torch.bfloat16)
        for index, name in enumerate(names):
            weight = torch.randn(out_features, in_features, generator=generator) * 0.02
            if transform is None:
                layer = torch.nn.Linear(in_features, out_features, bias=False)
                layer.weight.data = weight
            else:
                scale, _ = weight_qparams(weight, weight_args)
                layer = StarQuantLinear(
                    fake_quantize_weight(weight, weight_args), None, transform,
                    owns_transform=index == 0, weight_args=weight_args,
                    weight_scale=scale.bfloat16())
            del weight
            layers[name] = layer
    block = torch.nn.ModuleDict(layers)
    sizes = memory_bytes(block, block_pattern="")  # every tensor is a block tensor
    x = torch.randn(1, seq, d, generator=generator)
    h = torch.randn(1, seq, d_mlp, generator=generator)

    def run():
        for name, layer in block.items():
            layer(h if name == "down_proj" else x)

    with torch.no_grad():
        latency = _latency_ms(run, repeats=3)
    params = sum(o * i * len(names) for names, (o, i) in groups.items())
    return {"memory": sizes, "disk": sizes, "bf16_block_bytes": params * BF16_BYTES,
            "latency_ms": latency, "peak_rss_mib": _rss_mib(),
            "peak_rss_over_imports_mib": _rss_mib() - base_rss}


def _subprocess(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode:
        raise RuntimeError(f"measurement {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _calibration_rows(vocab: int, mask_id: int, n: int = 16, seq: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, vocab, (n, seq), generator=generator)
    return rows.masked_fill(torch.rand(rows.shape, generator=generator) < 0.5, mask_id)


def run_all(out: Path, seq: int, schemes: tuple[str, ...], work_dir: Path) -> dict:
    from transformers import AutoConfig

    from starquant_plugin.assets import TINY_MODELS
    from starquant_plugin.config import StarQuantArgs
    from starquant_plugin.integrations.saving import save_starquant
    from starquant_plugin.models.families import family_of, mask_token_id
    from starquant_plugin.models.loading import load_dllm
    from starquant_plugin.pipeline import quantize_dllm

    results: dict = {"seq": seq, "models": {}, "synthetic_block_d4096": {}}
    for family, original in TINY_MODELS.items():
        if not (original / "config.json").is_file():
            continue
        pattern = family_of(AutoConfig.from_pretrained(original)).block_pattern
        reference = disk_bytes(original, pattern)  # the bundled checkpoints are bf16
        rows = {"FP": {"disk": reference, **_subprocess("--measure", str(original),
                                                        "--seq", str(seq))}}
        for scheme in schemes:
            model, tokenizer = load_dllm(original, dtype=torch.bfloat16)  # as shipped
            args = StarQuantArgs(scheme=scheme, epochs=1)
            quantize_dllm(model, _calibration_rows(model.config.vocab_size,
                                                   mask_token_id(model)), args, progress=False)
            path = save_starquant(model, work_dir / f"{family}-{scheme}", args=args,
                                  tokenizer=tokenizer, overwrite=True)
            del model
            rows[scheme] = {"disk": disk_bytes(path, pattern),
                            **_subprocess("--measure", str(path), "--seq", str(seq))}
        for row in rows.values():
            for where in ("disk", "memory"):
                row[f"{where}_blocks_vs_bf16"] = row[where]["blocks"] / reference["blocks"]
                row[f"{where}_whole_vs_bf16"] = row[where]["whole"] / reference["whole"]
        results["models"][family] = {"bf16": reference, "rows": rows}
    for scheme in ("FP", *schemes):
        row = _subprocess("--synthetic", scheme, "--seq", str(seq))
        row["memory_blocks_vs_bf16"] = row["memory"]["blocks"] / row["bf16_block_bytes"]
        row["disk_blocks_vs_bf16"] = row["memory_blocks_vs_bf16"]
        star = row["memory"]["star"]
        row["blocks_vs_bf16_without_star"] = (row["memory"]["blocks"] - star) / row[
            "bf16_block_bytes"]
        results["synthetic_block_d4096"][scheme] = row
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


def print_table(results: dict) -> None:
    header = (f"{'model':<14}{'scheme':<7}{'disk blk/bf16':>14}{'mem blk/bf16':>13}"
              f"{'disk all/bf16':>14}{'STaR MiB':>9}{'blk MiB':>9}{'lat ms':>9}{'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for family, entry in results["models"].items():
        for scheme, row in entry["rows"].items():
            print(f"{family:<14}{scheme:<7}{row['disk_blocks_vs_bf16']:>14.3f}"
                  f"{row['memory_blocks_vs_bf16']:>13.3f}{row['disk_whole_vs_bf16']:>14.3f}"
                  f"{row['disk']['star'] / 2**20:>9.2f}{row['disk']['blocks'] / 2**20:>9.2f}"
                  f"{row['latency_ms']:>9.1f}{row['peak_rss_mib']:>9.0f}")
    for scheme, row in results["synthetic_block_d4096"].items():
        print(f"{'block d=4096':<14}{scheme:<7}{row['disk_blocks_vs_bf16']:>14.3f}"
              f"{row['memory_blocks_vs_bf16']:>13.3f}{'':>14}"
              f"{row['memory']['star'] / 2**20:>9.0f}{row['memory']['blocks'] / 2**20:>9.0f}"
              f"{row['latency_ms']:>9.1f}{row['peak_rss_mib']:>9.0f}")
    print("blk = transformer-block tensors (linears incl. STaR tensors; norms excluded); "
          "bf16 = the same parameters at 2 bytes; FP rows: the bf16 tiny originals, float32 "
          "linears for the d=4096 block.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/runtime.json"))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--schemes", nargs="+", default=["W8A8", "W4A4"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--synthetic", help=argparse.SUPPRESS)
    options = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if options.measure:
        print(json.dumps(measure_checkpoint(options.measure, options.seq)))
        return
    if options.synthetic:
        print(json.dumps(measure_synthetic(options.synthetic, options.seq)))
        return
    with tempfile.TemporaryDirectory(prefix="starquant-bench-") as work_dir:
        results = run_all(options.out, options.seq, tuple(options.schemes), Path(work_dir))
    print_table(results)
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
