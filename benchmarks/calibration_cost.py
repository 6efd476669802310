"""Calibration cost of one LLaDA-8B-shaped block: seconds and peak memory, and what they mean
for 32 blocks on this CPU and, by FLOPs, on one GPU.

    OMP_NUM_THREADS=1 python benchmarks/calibration_cost.py --epochs 1 \\
        --json benchmarks/results/calibration-cost.json

The block is ``LLaDALlamaBlock`` at LLaDA-8B's shape (d 4096, 32 heads x 128, MLP 12288),
random weights (std 0.02), given stress-level outlier channels at the 8B reference
ratios (``models.outliers``, no width scaling) on synthetic hidden states: masked tokens share
one embedding direction plus noise, unmasked tokens are random, half of the tokens masked.
Calibration: ``--rows`` x ``--seq`` tokens (128 x 256 by default), through
``pipeline.quantize_block``, the function the core path and the llm-compressor modifier use.
One epoch on one shared core takes hours at this width, so the default is ``--epochs 1``; the
fit reports its setup and epoch time per linear group and the 15-epoch figure is extrapolated
per epoch (setup + 15 x epoch + the non-fit work). Peak memory is resident-set size above the
level before calibration (the block, its FP copy and the captured inputs are already there).
The block runs in float32 by default (``--dtype``): the fit is float32 whatever the block's
dtype, and on a CPU without native bf16 (AVX2 only) bf16 block runs would measure the
emulation, not the method.
"""

import argparse
import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from quality import PeakMemory  # benchmarks/quality.py, beside this script

from starquant_plugin.config import method_args
from starquant_plugin.method import MaskState
from starquant_plugin.models.attention import use_kv_quantized_attention
from starquant_plugin.models.families import FAMILIES
from starquant_plugin.models.llada.configuration_llada import LLaDAConfig
from starquant_plugin.models.llada.modeling_llada import LLaDALlamaBlock
from starquant_plugin.models.outliers import STRESS, stress_block_
from starquant_plugin.models.rotary import RotaryEmbedding
from starquant_plugin.pipeline import QuantizationReport, quantize_block

D, HEADS, MLP, BLOCKS = 4096, 32, 12288, 32
"""LLaDA-8B's block shape and depth (``../shared/spec/dllm.md``); ``--d`` etc. shrink it for a
smoke run."""
GPU_TFLOPS = 156.0
"""Assumed GPU throughput: A100 TF32 dense tensor-core peak (NVIDIA's datasheet), at the
utilisation below; the fit's GEMMs are large enough to be compute bound."""
GPU_UTILISATION = 0.5


def synthetic_inputs(rows: int, seq: int, batch: int, d: int, head_dim: int,
                     generator: torch.Generator, dtype: torch.dtype):
    """Per batch the block's (args, kwargs) with hidden states ``[batch, seq, d]``, and the
    token states ``[batch, seq]``."""
    mask_direction = torch.randn(d, generator=generator)
    rotary = RotaryEmbedding(head_dim, 5e5)
    hidden, states = [], []
    for _ in range(0, rows, batch):
        state = torch.rand(batch, seq, generator=generator) < 0.5
        x = torch.randn(batch, seq, d, generator=generator)
        x[state] = 0.3 * x[state] + 3.0 * mask_direction
        hidden.append(x.to(dtype))
        states.append(state)
    position = rotary(hidden[0])
    return [((h, position, None), {}) for h in hidden], states


def add_block_outliers(block, inputs, states, family) -> dict:
    """Stress-level outliers at the 8B reference ratios (no width scaling at d = 4096)."""
    captured: dict[int, list] = {}
    handles = [block.get_submodule(readers[0]).register_forward_pre_hook(
        lambda _m, args, p=p: captured.setdefault(p, []).append(args[0].float().flatten(0, 1)))
        for p, (_w, readers) in enumerate(family.scale_pairs)]
    with torch.no_grad():
        for args, kwargs in inputs[:2]:  # 2 batches are enough to choose channels
            block(*args, **kwargs)
    for handle in handles:
        handle.remove()
    state = torch.cat(states[:2]).reshape(-1)
    targets = {p: STRESS.site_ratio(p, 0, BLOCKS) for p in range(len(family.scale_pairs))}
    report = stress_block_(block, family, {p: torch.cat(x) for p, x in captured.items()},
                           state, targets)
    return report.ratios


def gemm_flops(tokens: int, epochs: int, d: int, mlp: int) -> float:
    """FLOPs of the fit's GEMMs: per epoch forward + backward (3x) over every token, plus one
    full-data loss evaluation per epoch and at the start, for the 4 linear groups."""
    shapes = [(d, 3 * d), (d, d), (d, 2 * mlp), (mlp, d)]  # (in, out) per group
    per_pass = sum(2 * tokens * d_in * d_out for d_in, d_out in shapes)
    return per_pass * (3 * epochs + epochs + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--method", default="starquant")
    parser.add_argument("--d", type=int, default=D)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--mlp", type=int, default=MLP)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, default=Path("results/calibration-cost.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    family = FAMILIES["llada"]
    config = LLaDAConfig(d_model=args.d, n_heads=args.heads, n_kv_heads=args.heads,
                         mlp_hidden_size=args.mlp, n_layers=1, mask_token_id=126336)
    config._attn_implementation = "sdpa"
    block = LLaDALlamaBlock(config, 0)
    for linear in block.modules():
        if isinstance(linear, torch.nn.Linear):
            torch.nn.init.normal_(linear.weight, std=0.02)
    dtype = getattr(torch, args.dtype)
    block = block.to(dtype).eval()
    inputs, states = synthetic_inputs(args.rows, args.seq, args.batch, args.d,
                                      args.d // args.heads, generator, dtype)
    ratios = add_block_outliers(block, inputs, states, family)
    fp_block = copy.deepcopy(block)
    quant_args = method_args(args.method, epochs=args.epochs)
    if quant_args.resolved_kv_bits < 16:  # it sets the block's config, as for a model
        use_kv_quantized_attention(SimpleNamespace(config=config))
    report = QuantizationReport(args=quant_args)
    start = time.perf_counter()
    with PeakMemory() as memory, torch.no_grad():
        quantize_block(block, fp_block, inputs, inputs, states, MaskState(), quant_args,
                       family, report, 0)
    seconds = time.perf_counter() - start
    setup = sum(g.get("fit_setup_seconds", 0.0) for g in report.groups.values())
    epochs_total = sum(g.get("fit_epochs_seconds", 0.0) for g in report.groups.values())
    other = seconds - setup - epochs_total
    per_epoch = epochs_total / max(args.epochs, 1)
    block_15 = other + setup + 15 * per_epoch
    tokens = args.rows * args.seq
    flops_15 = gemm_flops(tokens, 15, args.d, args.mlp)
    gpu_seconds = flops_15 / (GPU_TFLOPS * 1e12 * GPU_UTILISATION)
    cpu_rate = gemm_flops(tokens, args.epochs, args.d, args.mlp) / seconds
    result = {
        "setup": (
            f"One LLaDA-8B-shaped block (d {args.d}, {args.heads} heads x "
            f"{args.d // args.heads}, MLP {args.mlp}, {args.dtype}, "
            f"random weights, stress outliers at the 8B ratios), {args.rows} x {args.seq} "
            f"calibration tokens, `{args.method}` W4A4 through `quantize_block`, measured with "
            f"{args.epochs} SGAT epoch(s) on one core of a shared 2-core CPU "
            f"(`OMP_NUM_THREADS=1`); 15 epochs extrapolated per epoch. GPU: by the fit's GEMM "
            f"FLOPs at {GPU_TFLOPS:.0f} TFLOP/s x {GPU_UTILISATION:.0%} utilisation (A100 TF32 "
            "tensor cores), ignoring the eigendecompositions and data movement."),
        "measured_epochs": args.epochs, "seconds": seconds, "fit_setup_seconds": setup,
        "fit_epoch_seconds": per_epoch, "other_seconds": other,
        "peak_rss_mb": memory.peak / 2**20, "outlier_ratios": ratios,
        "groups": report.groups, "gemm_flops_15_epochs": flops_15,
        "cpu_gemm_gflops_achieved": cpu_rate / 1e9,
        "table": [
            [f"measured block, {args.epochs} epoch(s)", f"{seconds:.0f} s"],
            ["of which SGAT setup (second moments, subspaces, clip search)", f"{setup:.0f} s"],
            ["of which SGAT epochs", f"{epochs_total:.0f} s ({per_epoch:.0f} s per epoch)"],
            ["of which captures, TAC, block runs", f"{other:.0f} s"],
            ["peak RSS above start (block, FP copy and inputs already resident)",
             f"{memory.peak / 2**30:.1f} GiB"],
            ["one block, 15 epochs (extrapolated)", f"{block_15 / 3600:.1f} h"],
            ["32 blocks, 15 epochs, this CPU (one core)", f"{BLOCKS * block_15 / 3600:.0f} h"],
            ["fit GEMM FLOPs per block, 15 epochs", f"{flops_15:.2e}"],
            [f"32 blocks on one GPU by FLOPs ({GPU_TFLOPS:.0f} TFLOP/s x "
             f"{GPU_UTILISATION:.0%})", f"{BLOCKS * gpu_seconds / 60:.0f} min"],
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in result["table"]:
        print(f"{name}: {value}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
