"""``starquant quantize``: a LLaDA or Dream model in, a STaR-Quant checkpoint out.

Everything that can be checked is checked before the model is loaded: the output directory
(and its lock, held to the end, so a second run to it is refused at once), the recipe (parsed
and validated), the calibration source; free disk space once the model's size is known, before
calibrating. Then: calibration rows of denoising states, llm-compressor's ``oneshot`` with the
recipe, and ``save_starquant`` writing the checkpoint, its tokenizer, the recipe it ran,
``quantization_report.json`` and the sha256 manifest in one atomic step.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import get_args

import yaml

from starquant_plugin.assets import calibration_text
from starquant_plugin.cli.errors import UserError, add_command, non_negative_int, positive_int
from starquant_plugin.cli.loading import DTYPES, load_model, resolve_model
from starquant_plugin.cli.logs import route_llmcompressor_logs, status
from starquant_plugin.cli.table import markdown_table
from starquant_plugin.config import METHODS, SchemeName

REPORT_FILE = "quantization_report.json"

EXAMPLE = """examples:
  starquant quantize tiny-llada --scheme W4A4 --out tiny-llada-w4a4
  starquant quantize GSAI-ML/LLaDA-8B-Base --recipe recipes/llada_w4a4.yaml \\
      --calib winogrande --samples 128 --seq-len 256 --out llada-8b-w4a4
  starquant quantize ./my-dream --scheme W8A8 --method smoothquant \\
      --calib-text corpus.txt --out my-dream-w8a8

MODEL is a local folder, a Hub id, or a bundled tiny model (tiny-llada, tiny-dream).
Calibration defaults to the bundled held-out prose (fine for the tiny models; use
--calib winogrande, as the paper does, or your own text for real models). --calib winogrande
needs allenai/winogrande in the local Hugging Face cache when offline.
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "quantize", "quantize a LLaDA/Dream model into a STaR-Quant checkpoint",
        __doc__, EXAMPLE)
    parser.add_argument("model", metavar="MODEL", help="model folder, Hub id or tiny-llada/dream")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--recipe", metavar="FILE", help="llm-compressor recipe YAML")
    how.add_argument("--scheme", choices=get_args(SchemeName),
                     help="quantization scheme (with --method)")
    parser.add_argument("--method", choices=sorted(METHODS), default="starquant",
                        help="with --scheme: STaR-Quant or a baseline preset")
    parser.add_argument("--out", required=True, metavar="DIR", help="new checkpoint directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoint already in --out")
    calib = parser.add_mutually_exclusive_group()
    calib.add_argument("--calib-text", metavar="FILE", help="calibrate on this UTF-8 text file")
    calib.add_argument("--calib-dataset", metavar="NAME",
                       help="a datasets name (or local .json/.jsonl/.csv/.parquet/.txt file)")
    calib.add_argument("--calib", choices=["winogrande"],
                       help="the paper's recipe: WinoGrande-XL train sentences")
    parser.add_argument("--calib-config", metavar="NAME", help="with --calib-dataset: config")
    parser.add_argument("--calib-split", default="train", metavar="SPLIT",
                        help="with --calib-dataset: split")
    parser.add_argument("--calib-column", default="text", metavar="COLUMN",
                        help="with --calib-dataset: text column")
    parser.add_argument("--samples", type=positive_int, metavar="N", default=32,
                        help="calibration rows")
    parser.add_argument("--seq-len", type=positive_int, metavar="N", default=128,
                        help="tokens per row")
    parser.add_argument("--seed", type=int, metavar="N", default=0,
                        help="seed of the calibration rows (and, with --scheme, of the fit)")
    parser.add_argument("--epochs", type=non_negative_int, metavar="N",
                        help="override the SGAT fit epochs (0 = no fit; default: the "
                             "recipe's or method's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="load dtype; scales and STaR tensors are stored in it")
    parser.add_argument("--verbose", action="store_true", help="show llm-compressor INFO logs")
    parser.set_defaults(func=run)


def scheme_recipe(scheme: str, method: str, seed: int) -> str:
    """The recipe YAML a ``--scheme``/``--method`` run stands for (saved with the checkpoint).

    >>> print(scheme_recipe("W4A4", "rtn", 0).strip())
    starquant_stage:
      quantization_modifiers:
        STaRQuantModifier:
          scheme: W4A4
          transform: identity
          state_gating: false
          tac: false
          kv_rotation: false
          k_smoothing: 0.0
          seed: 0
    """
    fields = {"scheme": scheme, **METHODS[method], "seed": seed}
    return yaml.safe_dump({"starquant_stage": {"quantization_modifiers": {
        "STaRQuantModifier": fields}}}, sort_keys=False)


def _check_arguments(args: argparse.Namespace) -> None:
    dataset_only = {"calib_config": None, "calib_split": "train", "calib_column": "text"}
    stray = [f"--{k.replace('_', '-')}" for k, v in dataset_only.items()
             if getattr(args, k) != v]
    if stray and not args.calib_dataset:
        raise UserError(f"{', '.join(stray)} only apply with --calib-dataset NAME; add it or "
                        "drop them.")


def _recipe(args: argparse.Namespace):
    """(llm-compressor Recipe, its YAML text, where it came from); parsed and validated now,
    before the model is loaded."""
    from starquant_plugin.integrations.llmcompressor import (
        DecoderBlockModifier,
        load_starquant_recipe,
    )
    from starquant_plugin.integrations.llmcompressor.recipe import recipe_that_ran

    if args.recipe:
        path = Path(args.recipe)
        if not path.exists():
            raise UserError(f"--recipe {path} does not exist; pass a recipe YAML file (e.g. "
                            "one from recipes/) or use --scheme.")
        given, source = path, str(path)
        recipe = load_starquant_recipe(path)  # messages name the file
    else:
        given = scheme_recipe(args.scheme, args.method, args.seed)
        source = f"--scheme {args.scheme} --method {args.method}"
        recipe = load_starquant_recipe(given)
    modifiers = [m for m in recipe.modifiers if isinstance(m, DecoderBlockModifier)]
    if args.epochs is not None:
        for modifier in modifiers:
            modifier.epochs = args.epochs
    return recipe, modifiers, recipe_that_ran(recipe, given), source


def _calibration_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    from starquant_plugin.integrations.calibration_texts import (
        WINOGRANDE,
        DatasetSource,
        calibration_char_budget,
        load_dataset_texts,
        read_text_file,
    )

    budget = calibration_char_budget(args.samples, args.seq_len)
    if args.calib_text:  # read only as far as the rows need
        return read_text_file(args.calib_text, max_chars=budget), f"text file {args.calib_text}"
    if args.calib or args.calib_dataset:
        source = WINOGRANDE if args.calib else DatasetSource(
            args.calib_dataset, args.calib_config, args.calib_split, args.calib_column)
        return load_dataset_texts(source, budget, args.seed), f"dataset {source.describe()}"
    return [calibration_text()], "bundled held-out prose (assets.calibration_text)"


def _versions() -> dict[str, str]:
    names = ("starquant-plugin", "torch", "transformers", "llmcompressor", "compressed-tensors")
    return {"python": platform.python_version()} | {n: metadata.version(n) for n in names}


def run(args: argparse.Namespace) -> None:
    from starquant_plugin.integrations.output_lock import output_lock
    from starquant_plugin.integrations.saving import check_output_dir

    start = time.time()
    _check_arguments(args)
    model_source = resolve_model(args.model)
    # before any slow step: not the model's own folder (nor inside or above it), not the
    # current one, nothing an overwrite would destroy; then locked, so that a second run to
    # the same --out is refused now rather than replacing this one's result at its end
    out = check_output_dir(args.out, overwrite=args.overwrite, reading=model_source,
                           overwrite_option="--overwrite")
    with output_lock(out):
        _quantize(args, model_source, out, start)


def _refuse_quantized(model, name: str) -> None:
    """A checkpoint that is already quantized (STaR-Quant or another method) has no FP weights
    to calibrate; llm-compressor's ``oneshot`` would refuse it only after calibration."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return
    method = config.get("quant_method") if isinstance(config, dict) else getattr(
        config, "quant_method", None)
    raise UserError(f"MODEL {name} is already quantized (quant_method {method!r}); STaR-Quant "
                    "quantizes a full-precision model: pass the FP model it was made from.")


def _weight_bits(modifiers: list) -> int:
    """Bits per weight of the widest scheme in the recipe (W4A4 -> 4)."""
    return max((int(modifier.scheme[1]) for modifier in modifiers), default=16)


def _quantize(args: argparse.Namespace, model_source: str, out: Path, start: float) -> None:
    from starquant_plugin.integrations.output_dirs import check_free_space
    from starquant_plugin.integrations.saving import estimate_checkpoint_bytes

    route_llmcompressor_logs(args.verbose)
    recipe, modifiers, recipe_text, recipe_source = _recipe(args)
    texts, calib_source = _calibration_texts(args)
    timings = {}

    status(f"loading {args.model} ({args.dtype}) ...")
    tick = time.time()
    model, tokenizer = load_model(model_source, args.dtype)
    timings["load_s"] = time.time() - tick
    _refuse_quantized(model, args.model)
    bits = _weight_bits(modifiers)
    check_free_space(out, estimate_checkpoint_bytes(model, bits),
                     what=f"the {bits}-bit checkpoint of {args.model}")

    from llmcompressor import oneshot

    from starquant_plugin.integrations.calibration_dataset import dllm_calibration_dataset
    from starquant_plugin.integrations.saving import save_starquant
    from starquant_plugin.models.families import family_of

    status(f"building {args.samples} calibration rows of {args.seq_len} tokens from "
           f"{calib_source} ...")
    tick = time.time()
    dataset = dllm_calibration_dataset(model, tokenizer, texts, num_samples=args.samples,
                                       seq_len=args.seq_len, seed=args.seed)
    timings["calibration_rows_s"] = time.time() - tick
    status(f"quantizing with {recipe_source} ...")
    tick = time.time()
    # the rows are already a seeded sample: llm-compressor's shuffle would reorder them by
    # the process' global RNG, so two runs with one --seed would fit different transforms
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=args.samples,
            shuffle_calibration_samples=False)
    timings["oneshot_s"] = time.time() - tick

    quantization_report = next((m.report for m in modifiers if m.report is not None), None)
    report = {
        "model": args.model,
        "family": family_of(model).name,
        "recipe": recipe_source,
        "args": modifiers[0].starquant_args().model_dump() if modifiers else None,
        "calibration": {"source": calib_source, "samples": args.samples,
                        "seq_len": args.seq_len, "seed": args.seed},
        "dtype": args.dtype,
        "timings": timings,
        "fit": _finite(quantization_report.groups) if quantization_report else {},
        "versions": _versions(),
    }
    status(f"saving to {out} ...")
    tick = time.time()
    save_starquant(model, out, tokenizer=tokenizer, recipe=recipe_text,
                   overwrite=args.overwrite, overwrite_option="--overwrite", extra_files={
                       REPORT_FILE: json.dumps(report, indent=2, default=str) + "\n"})
    timings["save_s"] = time.time() - tick
    print_summary(report, out, time.time() - start)


SHOWN_GROUPS = 16
"""Linear groups listed in the terminal; all of them are in the JSON report."""


def _finite(value: object) -> object:
    """NaN (a loss that was never computed, e.g. RTN's) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def print_summary(report: dict, out: Path, seconds: float) -> None:
    """What was written, the fit's residuals per linear group and where the time went."""
    fit = report["fit"]
    if fit:
        shown = fit
        if len(fit) > SHOWN_GROUPS:
            worst = sorted(fit, key=lambda k: -max(fit[k]["residual_masked"] or 0,
                                                   fit[k]["residual_unmasked"] or 0))
            shown = {key: fit[key] for key in worst[:SHOWN_GROUPS]}
            print(f"{len(fit)} linear groups; the {SHOWN_GROUPS} with the largest residuals "
                  f"(all in {REPORT_FILE}):")
        print(markdown_table(shown, ["residual_masked", "residual_unmasked", "final_loss"],
                             label="linear group", digits=4))
        print("residual_*: relative FP-exactness residual of the transform per token state "
              "(0 without gates); final_loss: the fit's last loss (- without a fit).\n")
    timings = " | ".join(f"{name[:-2]} {value:.1f} s" for name, value in
                         report["timings"].items())
    print(f"timings: {timings} | total {seconds:.1f} s")
    args = report["args"] or {}
    print(f"wrote {out} ({args.get('scheme', '?')} STaR-Quant checkpoint, tokenizer, "
          f"recipe.yaml, {REPORT_FILE}, starquant_manifest.json)")
