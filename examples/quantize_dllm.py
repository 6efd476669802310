"""Quantize a diffusion LM with STaR-Quant through llm-compressor's ``oneshot`` and a recipe.

    python examples/quantize_dllm.py                       # bundled tiny LLaDA, W4A4 recipe
    python examples/quantize_dllm.py --model GSAI-ML/LLaDA-8B-Base \
        --recipe recipes/llada_w4a4.yaml --num-samples 128 --seq-len 256 --out llada-w4a4
    python examples/quantize_dllm.py --model Dream-org/Dream-v0-Base-7B \
        --recipe recipes/dream_w4a8.yaml --num-samples 128 --seq-len 256

The real checkpoints (LLaDA-8B, Dream-7B) need the Hub and ~16 GB of memory in bf16; calibrate
them on more and longer rows (the paper uses WinoGrande, see ``dllm_calibration_dataset``).
Without ``--recipe`` the W4A4 recipe of the model's family is used. The model is loaded in
``--dtype`` (bf16 by default, the hub checkpoints' dtype), in which the checkpoint stores its
scales and STaR tensors. The script prints masked-token cross-entropy on held-out text before
and after, and with ``--out`` writes the checkpoint (``save_starquant``: atomic, refuses a
directory that already holds files).
"""

import argparse
import time

import torch
from llmcompressor import oneshot

from starquant_plugin.assets import TINY_LLADA, calibration_text, evaluation_text
from starquant_plugin.integrations.calibration_dataset import dllm_calibration_dataset
from starquant_plugin.integrations.llmcompressor import (
    STaRQuantModifier,
    bundled_recipe,
    load_starquant_recipe,
)
from starquant_plugin.integrations.saving import check_output_dir, save_starquant
from starquant_plugin.models.evaluation import masked_token_metrics, text_rows
from starquant_plugin.models.families import family_of
from starquant_plugin.models.loading import load_dllm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TINY_LLADA), help="LLaDA or Dream path/id")
    parser.add_argument("--recipe", help="recipe YAML (default recipes/<family>_w4a4.yaml)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    parser.add_argument("--epochs", type=int, help="override the recipe's SGAT epochs")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", help="write the quantized checkpoint to this new directory")
    args = parser.parse_args(argv)
    if args.out:
        check_output_dir(args.out)  # refuse before calibrating, not after

    torch.manual_seed(0)
    model, tokenizer = load_dllm(args.model, dtype=getattr(torch, args.dtype))
    family = family_of(model)
    recipe = load_starquant_recipe(args.recipe or bundled_recipe(family.name))
    if args.epochs is not None:
        for modifier in recipe.modifiers:
            if isinstance(modifier, STaRQuantModifier):
                modifier.epochs = args.epochs
    dataset = dllm_calibration_dataset(model, tokenizer, [calibration_text()],
                                       num_samples=args.num_samples, seq_len=args.seq_len)
    eval_rows = text_rows(tokenizer, evaluation_text(), seq_len=args.seq_len, max_rows=16)
    before = masked_token_metrics(model, eval_rows, progress=False)

    start = time.time()
    oneshot(model=model, dataset=dataset, recipe=recipe,
            num_calibration_samples=args.num_samples,
            shuffle_calibration_samples=False)  # seeded rows, kept in order: reproducible
    print(f"oneshot: {time.time() - start:.1f} s")

    after = masked_token_metrics(model, eval_rows, progress=False)
    for ratio in before:
        print(f"masked CE at t={ratio}: FP {before[ratio]['ce']:.3f} -> "
              f"quantized {after[ratio]['ce']:.3f} nats/token")
    if args.out:
        print(f"saved {save_starquant(model, args.out, tokenizer=tokenizer, recipe=recipe)}")


if __name__ == "__main__":
    main()
