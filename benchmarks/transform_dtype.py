"""What running the STaR transform in bf16 costs in quality (issue 23).

A STaR-Quant model served in bf16 computes its input transform (TAC, the exclusive-subspace
projection, the channel scale and the Kronecker map) in bf16 (``star_transform``: the STaR
tensors' dtype, the model's), each intermediate rounded to bf16, where the fit computed it in
float32. This script quantizes the tiny models (clean and outlier variants, several seeds,
bf16 checkpoints), runs each in bf16 twice, with the STaR tensors as stored (bf16 transform)
and converted to float32 (the transform as the fit did it), and reports masked CE at
t = 0.15 / 0.5 and the share of activation codes that differ.
Usage: ``python benchmarks/transform_dtype.py [--seeds 0 1 2] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from quality import load_variant  # benchmarks/ is the script's own folder

from starquant_plugin.assets import TINY_MODELS, calibration_text, evaluation_text
from starquant_plugin.config import method_args
from starquant_plugin.method.input_transform import StarQuantInputTransform
from starquant_plugin.method.quantizers import quantize_activation
from starquant_plugin.method.runtime import StarQuantLinear
from starquant_plugin.models.calibration import build_calibration_states
from starquant_plugin.models.evaluation import masked_token_metrics, text_rows
from starquant_plugin.pipeline import quantize_dllm

RATIOS = (0.15, 0.5)


def transform_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every input transform's STaR tensors in ``dtype`` (bf16 -> float32 -> bf16 is exact)."""
    for module in model.modules():
        if isinstance(module, StarQuantInputTransform):
            module.to(dtype)


def code_flips(model: torch.nn.Module, rows: torch.Tensor) -> float:
    """Share of activation codes that the bf16 transform changes against the float32 one,
    each layer's input (one forward of the bf16-transform model) quantized both ways."""
    counts, float32_twins = [0, 0], {}

    def compare(linear: StarQuantLinear, args: tuple) -> None:
        transform, x = linear.transform, args[0]
        mask_state = transform._mask_state_for(x)
        twin = float32_twins.setdefault(id(transform), copy.deepcopy(transform).float())
        bf16, fp32 = (quantize_activation(*t._transformed(x, mask_state))[0]
                      for t in (transform, twin))
        counts[0] += (fp32 != bf16).sum().item()
        counts[1] += fp32.numel()

    hooks = [module.register_forward_pre_hook(compare) for module in model.modules()
             if isinstance(module, StarQuantLinear)]
    with torch.no_grad():
        model(rows)
    for hook in hooks:
        hook.remove()
    return counts[0] / counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["clean", "stress", "outliers-100"])
    parser.add_argument("--schemes", nargs="+", default=["W4A4", "W8A8"])
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15, help="SGAT epochs")
    parser.add_argument("--json", type=Path, default=Path("results/transform-dtype.json"))
    args = parser.parse_args()
    results = []
    for path in TINY_MODELS.values():
        for variant in args.variants:
            base, tokenizer, _ = load_variant(path, variant, torch.bfloat16)
            rows = text_rows(tokenizer, evaluation_text())[: args.eval_rows]
            for seed in args.seeds:
                calibration = build_calibration_states(
                    copy.deepcopy(base).float(), text_rows(tokenizer, calibration_text()), 64,
                    seed=seed)
                for scheme in args.schemes:
                    model = copy.deepcopy(base)
                    method = method_args("starquant", scheme=scheme, seed=seed,
                                         epochs=args.epochs)
                    quantize_dllm(model, calibration, method, progress=False)
                    row = {"model": path.name, "variant": variant, "seed": seed,
                           "scheme": scheme, "epochs": args.epochs,
                           "code_flips": code_flips(model, rows[:8])}
                    for name, dtype in (("fp32_transform", torch.float32),
                                        ("bf16_transform", torch.bfloat16)):
                        transform_in(model, dtype)
                        metrics = masked_token_metrics(model, rows, RATIOS, seed=seed,
                                                       progress=False)
                        row |= {f"{name}_ce@{t}": metrics[t]["ce"] for t in RATIOS}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
