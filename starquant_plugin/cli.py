"""``starquant`` command line.

``starquant demo`` is the main job: quantize the bundled tiny LLaDA with the W4A4 recipe through
llm-compressor's ``oneshot``, save each result with ``save_starquant``, and print FP vs RTN vs
STaR-Quant quality and checkpoint size side by side.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from starquant_plugin.assets import TINY_LLADA, calibration_text, evaluation_text
from starquant_plugin.config import METHODS
from starquant_plugin.models.evaluation import MASK_RATIOS, quality_summary, text_rows
from starquant_plugin.models.families import family_of
from starquant_plugin.models.loading import load_dllm

DEMO_PROMPT = "The history of the city"


def _oneshot(model, dataset, recipe, num_samples: int) -> float:
    """Quantize ``model`` in place through ``oneshot``; returns seconds."""
    from llmcompressor import oneshot

    start = time.time()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=num_samples)
    return time.time() - start


def demo(args: argparse.Namespace) -> None:
    """FP vs RTN vs STaR-Quant (recipe ``recipes/llada_<scheme>.yaml``) on the tiny LLaDA."""
    from starquant_plugin.integrations.calibration_dataset import dllm_calibration_dataset
    from starquant_plugin.integrations.format import bytes_by_part, checkpoint_tensor_bytes
    from starquant_plugin.integrations.llmcompressor import (
        STaRQuantModifier,
        bundled_recipe,
        load_starquant_recipe,
    )
    from starquant_plugin.integrations.saving import save_starquant
    from starquant_plugin.models.evaluation import greedy_generate

    torch.manual_seed(0)
    fp_model, tokenizer = load_dllm(TINY_LLADA)
    rows = text_rows(tokenizer, evaluation_text(), max_rows=args.rows)
    prompts = rows[:4, :16]
    recipe_path = bundled_recipe("llada", args.scheme)
    print(f"tiny LLaDA ({sum(p.numel() for p in fp_model.parameters()) / 1e6:.1f} M params), "
          f"{args.scheme}, recipe {Path(recipe_path).name}, {args.samples} calibration rows")
    # Built once from the FP model (its sampler records the trajectory states) for both runs.
    dataset = dllm_calibration_dataset(fp_model, tokenizer, [calibration_text()],
                                       num_samples=args.samples)
    pattern = family_of(fp_model).block_pattern
    models = {"FP": (fp_model, 0.0)}
    sizes = {"FP": bytes_by_part(checkpoint_tensor_bytes(TINY_LLADA), pattern)}
    with tempfile.TemporaryDirectory(prefix="starquant-demo-") as work_dir:
        for name, recipe in (
            ("RTN", STaRQuantModifier(scheme=args.scheme, **METHODS["rtn"])),
            ("STaR-Quant", load_starquant_recipe(recipe_path)),
        ):
            model, _ = load_dllm(TINY_LLADA, dtype=torch.bfloat16)  # as shipped
            print(f"quantizing: {name} ...", flush=True)
            seconds = _oneshot(model, dataset, recipe, args.samples)
            path = save_starquant(model, Path(work_dir) / name)
            sizes[name] = bytes_by_part(checkpoint_tensor_bytes(path), pattern)
            models[name] = (model.float(), seconds)  # exact upcast; scored like FP
    columns = [*(f"ce@{t}" for t in MASK_RATIOS), *(f"acc@{t}" for t in MASK_RATIOS), "elbo",
               "gen_agreement"]
    print(f"\n| model | {' | '.join(columns)} | oneshot s |")
    print("|---" * (len(columns) + 2) + "|")
    for name, (model, seconds) in models.items():
        row = quality_summary(model, fp_model, rows, prompts)
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns)
              + f" | {seconds:.1f} |", flush=True)
    print("\nce: masked-token cross-entropy (nats) at mask ratio t; acc: its accuracy; elbo: "
          "Monte-Carlo ELBO per token of held-out continuations; gen_agreement: share of "
          "greedy-generated tokens equal to FP's.")
    print("\n| checkpoint | whole MiB | block MiB | blocks vs bf16 | STaR tensors MiB |")
    print("|---|---|---|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size['whole'] / 2**20:.2f} | {size['blocks'] / 2**20:.2f} | "
              f"{size['blocks'] / sizes['FP']['blocks']:.3f}x | {size['star'] / 2**20:.3f} |")
    print("FP is the bundled bf16 checkpoint; the quantized ones are written by save_starquant "
          "(int codes + bf16 scales and STaR tensors; embeddings and LM head stay bf16).")
    prompt_ids = tokenizer(DEMO_PROMPT, return_tensors="pt")["input_ids"]
    for name, (model, _) in models.items():
        generated = greedy_generate(model, prompt_ids)[0, prompt_ids.shape[1]:]
        print(f"{name:>10}: {DEMO_PROMPT!r} -> {tokenizer.decode(generated)!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="starquant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="quantize the bundled tiny LLaDA and compare")
    demo_parser.add_argument("--scheme", default="W4A4", choices=["W4A4", "W4A8", "W8A8"])
    demo_parser.add_argument("--samples", type=int, default=32, help="calibration rows")
    demo_parser.add_argument("--rows", type=int, default=64, help="held-out rows to score")
    demo_parser.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
