"""``starquant`` command line: ``starquant demo`` runs the main job on the bundled models."""

import argparse
import time

import torch

from starquant_plugin.assets import TINY_MODELS, heldout_text
from starquant_plugin.models.evaluation import masked_token_metrics, text_rows
from starquant_plugin.models.families import family_of
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.models.sampling import dream_generate, llada_generate

DEMO_PROMPTS = ("The history of the city", "In mathematics, a function")


def _greedy(model, prompt_ids: torch.LongTensor, gen_length: int = 24) -> torch.LongTensor:
    if family_of(model).name == "dream":
        return dream_generate(model, prompt_ids, steps=gen_length, gen_length=gen_length,
                              alg="maskgit_plus").sequences
    return llada_generate(model, prompt_ids, steps=gen_length, gen_length=gen_length,
                          block_length=gen_length // 3).sequences


def demo(args: argparse.Namespace) -> None:
    """Evaluate each bundled tiny DLLM on held-out text and print a few greedy generations."""
    torch.manual_seed(0)
    for name, path in TINY_MODELS.items():
        start = time.time()
        model, tokenizer = load_dllm(path)
        rows = text_rows(tokenizer, heldout_text(), max_rows=args.rows)
        metrics = masked_token_metrics(model, rows)
        print(f"\n== tiny {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
              f"params, {len(rows)} held-out rows of {rows.shape[1]} tokens)")
        print("mask ratio | masked CE (nats) | accuracy")
        for ratio, values in metrics.items():
            print(f"{ratio:10.2f} | {values['ce']:16.3f} | {values['acc']:8.3f}")
        for prompt in DEMO_PROMPTS:
            prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            output = _greedy(model, prompt_ids)[0, prompt_ids.shape[1]:]
            print(f"{prompt!r} -> {tokenizer.decode(output)!r}")
        print(f"({time.time() - start:.1f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="starquant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="evaluate the bundled tiny DLLMs")
    demo_parser.add_argument("--rows", type=int, default=64, help="held-out rows to score")
    demo_parser.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
