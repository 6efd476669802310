"""How much the bundled tiny DLLMs learned: held-out masked CE against a unigram model and the
same architecture at random init, plus a few greedy generations. Prints a table, writes JSON.

    python benchmarks/tiny_models.py [--rows 128] [--json results/tiny_models.json]
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from starquant_plugin.assets import TINY_MODELS, evaluation_text
from starquant_plugin.models.evaluation import (
    MASK_RATIOS,
    greedy_generate,
    masked_token_metrics,
    text_rows,
    unigram_cross_entropy,
)
from starquant_plugin.models.loading import load_dllm

PROMPTS = ("The history of the city", "In mathematics, a function", "The war began when")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--json", type=Path, default=Path("results/tiny_models.json"))
    args = parser.parse_args()
    results = {}
    print("| model | variant | " + " | ".join(f"CE@{t} (acc)" for t in MASK_RATIOS) + " |")
    print("|---|---|" + "---|" * len(MASK_RATIOS))
    for family, path in TINY_MODELS.items():
        trained, tokenizer = load_dllm(path)
        torch.manual_seed(0)
        random_init = AutoModelForCausalLM.from_config(trained.config).float().eval()
        rows = text_rows(tokenizer, evaluation_text(), max_rows=args.rows)
        unigram = unigram_cross_entropy(rows, rows, len(tokenizer))
        entry = {"rows": len(rows), "seq_len": rows.shape[1], "unigram_ce": unigram}
        for variant, model in (("trained", trained), ("random init", random_init)):
            metrics = masked_token_metrics(model, rows, progress=False)
            entry[variant] = metrics
            cells = [f"{metrics[t]['ce']:.3f} ({metrics[t]['acc']:.3f})" for t in MASK_RATIOS]
            print(f"| tiny-{family} | {variant} | " + " | ".join(cells) + " |")
        print(f"| tiny-{family} | unigram (fit on the eval text) | "
              + " | ".join(f"{unigram:.3f}" for _ in MASK_RATIOS) + " |")
        entry["generations"] = {}
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            text = tokenizer.decode(greedy_generate(trained, ids)[0, ids.shape[1]:])
            entry["generations"][prompt] = text
        results[family] = entry
    for family, entry in results.items():
        for prompt, text in entry["generations"].items():
            print(f"tiny-{family}: {prompt!r} -> {text!r}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
