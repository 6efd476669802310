"""``starquant demo``: FP vs RTN vs STaR-Quant on the bundled tiny LLaDA, in one command.

Quantizes the tiny LLaDA with the W4A4 recipe (and RTN) through llm-compressor's ``oneshot``,
saves each result with ``save_starquant`` (with ``--out`` they are kept, each with its
tokenizer, recipe and ``quality.json``, ready for ``starquant push``), and prints quality and
checkpoint size side by side. llm-compressor's INFO lines go to stderr at WARNING, so stdout
holds the tables.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import get_args

from starquant_plugin.cli.errors import add_command, non_negative_int, positive_int
from starquant_plugin.cli.logs import route_llmcompressor_logs, status
from starquant_plugin.cli.quantize import scheme_recipe
from starquant_plugin.cli.table import markdown_table
from starquant_plugin.config import SchemeName

DEMO_PROMPT = "The history of the city"

EXAMPLE = """examples:
  starquant demo                          # about 2 minutes on 2 CPU cores
  starquant demo --out demo-checkpoints   # keep the RTN and STaR-Quant checkpoints
  starquant demo --scheme W8A8 --samples 64
"""

AGREEMENT_PROMPTS = 16
"""Generation-agreement prompts (16 held-out rows x 32 tokens). With 4, one early divergence
could put STaR-Quant's agreement below RTN's; more would lengthen a command meant to take
about 2 minutes (64 prompts take ~30 s per model to generate on this CPU)."""

CHECKPOINT_NAMES = {"RTN": "rtn", "STaR-Quant": "starquant"}
"""Sub-folders of ``--out``, one per quantized model."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "demo", "quantize the bundled tiny LLaDA and compare FP, RTN and STaR-Quant",
        __doc__, EXAMPLE)
    parser.add_argument("--scheme", default="W4A4", choices=get_args(SchemeName),
                        help="scheme of both quantized models")
    parser.add_argument("--samples", type=positive_int, metavar="N", default=32,
                        help="calibration rows")
    parser.add_argument("--rows", type=positive_int, metavar="N", default=64,
                        help="held-out rows to score")
    parser.add_argument("--epochs", type=non_negative_int,
                        help="override the STaR-Quant recipe's SGAT epochs (0 = no fit)")
    parser.add_argument("--out", metavar="DIR",
                        help="keep the checkpoints in DIR/rtn and DIR/starquant (a new or "
                             "empty directory); without it they are deleted at the end")
    parser.add_argument("--verbose", action="store_true", help="show llm-compressor INFO logs")
    parser.set_defaults(func=run)


def _oneshot(model, dataset, recipe, num_samples: int) -> float:
    """Quantize ``model`` in place through ``oneshot``; returns seconds."""
    from llmcompressor import oneshot

    start = time.time()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=num_samples,
            shuffle_calibration_samples=False)  # seeded rows, kept in order: reproducible
    return time.time() - start


def _output_dir(out: str | None):
    """The folder the checkpoints go to: ``out`` (checked now, before any work) or a
    temporary one."""
    if out is None:
        return tempfile.TemporaryDirectory(prefix="starquant-demo-")
    from starquant_plugin.integrations.saving import check_output_dir

    path = check_output_dir(out, overwrite_option=None)
    for name in CHECKPOINT_NAMES.values():
        check_output_dir(path / name, overwrite_option=None)
    return nullcontext(str(path))


def run(args: argparse.Namespace) -> None:
    """FP vs RTN vs STaR-Quant (recipe ``recipes/llada_<scheme>.yaml``) on the tiny LLaDA."""
    output = _output_dir(args.out)
    route_llmcompressor_logs(args.verbose)

    import torch

    from starquant_plugin.assets import TINY_LLADA, calibration_text, evaluation_text
    from starquant_plugin.integrations.calibration_dataset import dllm_calibration_dataset
    from starquant_plugin.integrations.format import bytes_by_part, checkpoint_tensor_bytes
    from starquant_plugin.integrations.llmcompressor import (
        bundled_recipe,
        load_starquant_recipe,
    )
    from starquant_plugin.integrations.saving import save_starquant, write_text_atomic
    from starquant_plugin.models.evaluation import (
        MASK_RATIOS,
        greedy_generate,
        quality_summary,
        text_rows,
    )
    from starquant_plugin.models.families import family_of
    from starquant_plugin.models.loading import load_dllm

    torch.manual_seed(0)
    fp_model, tokenizer = load_dllm(TINY_LLADA)
    rows = text_rows(tokenizer, evaluation_text(), max_rows=args.rows)
    prompts = rows[:AGREEMENT_PROMPTS, :16]  # the first 16 tokens as prompt
    recipe_path = bundled_recipe("llada", args.scheme)
    print(f"tiny LLaDA ({sum(p.numel() for p in fp_model.parameters()) / 1e6:.1f} M params), "
          f"{args.scheme}, recipe {Path(recipe_path).name}, {args.samples} calibration rows",
          flush=True)
    # Built once from the FP model (its sampler records the trajectory states) for both runs.
    dataset = dllm_calibration_dataset(fp_model, tokenizer, [calibration_text()],
                                       num_samples=args.samples)
    pattern = family_of(fp_model).block_pattern
    models = {"FP": (fp_model, 0.0)}
    sizes = {"FP": bytes_by_part(checkpoint_tensor_bytes(TINY_LLADA), pattern)}
    paths = {}
    with output as work_dir:
        for name, recipe in (
            ("RTN", load_starquant_recipe(scheme_recipe(args.scheme, "rtn", seed=0))),
            ("STaR-Quant", load_starquant_recipe(recipe_path)),
        ):
            if args.epochs is not None:
                for modifier in recipe.modifiers:
                    modifier.epochs = args.epochs
            model, _ = load_dllm(TINY_LLADA, dtype=torch.bfloat16)  # as shipped
            status(f"quantizing: {name} ...")
            seconds = _oneshot(model, dataset, recipe, args.samples)
            paths[name] = save_starquant(model, Path(work_dir) / CHECKPOINT_NAMES[name],
                                         tokenizer=tokenizer, recipe=recipe.yaml())
            sizes[name] = bytes_by_part(checkpoint_tensor_bytes(paths[name]), pattern)
            models[name] = (model.float(), seconds)  # exact upcast; scored like FP
        status("scoring ...")
        columns = [*(f"ce@{t}" for t in MASK_RATIOS), *(f"acc@{t}" for t in MASK_RATIOS),
                   "elbo", "gen_agreement"]
        fp_generation = greedy_generate(fp_model, prompts)  # once, for every model
        quality = {name: quality_summary(model, fp_generation, rows, prompts)
                   for name, (model, _) in models.items()}
        if args.out:
            for name, path in paths.items():  # the Hub card's quality table
                write_text_atomic(path / "quality.json", json.dumps(
                    {"FP (bf16)": quality["FP"], name: quality[name]}, indent=2) + "\n")
    table = {name: row | {"oneshot s": models[name][1]} for name, row in quality.items()}
    print()
    print(markdown_table(table, [*columns, "oneshot s"]))
    print("\nce: masked-token cross-entropy (nats) at mask ratio t; acc: its accuracy; elbo: "
          "Monte-Carlo ELBO per token of held-out continuations; gen_agreement: share of "
          "greedy-generated tokens equal to FP's.\n")
    size_table = {name: {"whole MiB": size["whole"] / 2**20, "block MiB": size["blocks"] / 2**20,
                         "blocks vs bf16": f"{size['blocks'] / sizes['FP']['blocks']:.3f}x",
                         "STaR tensors MiB": size["star"] / 2**20}
                  for name, size in sizes.items()}
    print(markdown_table(size_table, ["whole MiB", "block MiB", "blocks vs bf16",
                                      "STaR tensors MiB"], label="checkpoint", digits=2))
    print("FP is the bundled bf16 checkpoint; the quantized ones are written by save_starquant "
          "(int codes + bf16 scales and STaR tensors; embeddings and LM head stay bf16).\n")
    prompt_ids = tokenizer(DEMO_PROMPT, return_tensors="pt")["input_ids"]
    for name, (model, _) in models.items():
        generated = greedy_generate(model, prompt_ids)[0, prompt_ids.shape[1]:]
        print(f"{name:>10}: {DEMO_PROMPT!r} -> {tokenizer.decode(generated)!r}")
    if args.out:
        print(f"\ncheckpoints kept: {', '.join(str(p) for p in paths.values())} (each with its "
              "tokenizer, recipe.yaml and quality.json; try `starquant eval` or `starquant "
              "push --dry-run` on them)")
    else:
        print("\nthe checkpoints were written to a temporary directory and deleted; pass "
              "--out DIR to keep them")
