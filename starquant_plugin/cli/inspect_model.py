"""``starquant inspect``: plots of the two problems STaR-Quant exists for, on your model.

Quantizes the FP model three ways with the core path (RTN; SGAT without TAC; STaR-Quant =
SGAT + TAC), adds ``--quantized DIR`` if given, and writes PNG figures and ``report.md``
(plus the numbers as ``inspect.json``) into a new ``--out`` directory: activation magnitude
per channel for masked vs unmasked tokens, hidden-state error vs FP across the steps of a real
sampler run with and without TAC, and the per-layer error of every linear group.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import get_args

from starquant_plugin.cli.errors import UserError, add_command, non_negative_int, positive_int
from starquant_plugin.cli.loading import load_model
from starquant_plugin.cli.logs import status
from starquant_plugin.config import SchemeName

FIGURES = {"activation_by_state": "activation_by_state.png",
           "state_disparity": "state_disparity.png",
           "denoising_error": "denoising_error.png",
           "linear_group_error": "linear_group_error.png"}
VARIANTS = {"RTN": "rtn", "SGAT, no TAC": "sgat", "STaR-Quant": "starquant"}
"""Display name -> ``config.METHODS`` preset quantized in-process for the comparison."""

INSPECT_EPOCHS = 2
"""The in-process fits' default epochs: the plots compare methods, not a finished fit."""

EXAMPLE = """examples:
  starquant inspect tiny-llada --out inspect-llada                # under a minute on 2 cores
  starquant inspect tiny-llada --quantized tiny-llada-w4a4 --out inspect-llada-ckpt
  starquant inspect GSAI-ML/LLaDA-8B-Base --layers 0,15,31 --samples 64 --out inspect-8b

Writes DIR/report.md (open it in any Markdown viewer), the PNGs it embeds and inspect.json.
Needs matplotlib (the eval or dev extra).

The defaults (2 SGAT epochs, 16 calibration rows, 16 sampler steps) are smaller than a real
quantization's, to finish in minutes: RTN, SGAT and STaR-Quant get the same rows and the same
fit from the same start, so their order and the gap TAC makes stay what the plots compare
(tiny-llada, mean per-layer error RTN / SGAT / STaR-Quant: 0.221 / 0.129 / 0.125 at the
defaults, 0.221 / 0.119 / 0.117 at 15 epochs, 32 rows). The activation plots measure the FP
model alone. --quantized adds a checkpoint made with the full fit; --epochs 15 --samples 32
--steps 64 gives the in-process models the method's own settings.
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "inspect",
        "plots of state disparity, error across denoising steps and per-layer error",
        __doc__, EXAMPLE)
    parser.add_argument("model", metavar="MODEL", help="FP model folder, Hub id or tiny-llada")
    parser.add_argument("--quantized", metavar="DIR",
                        help="a STaR-Quant checkpoint of MODEL to add to the comparison")
    parser.add_argument("--out", required=True, metavar="DIR", help="new report directory")
    parser.add_argument("--scheme", choices=get_args(SchemeName), default="W4A4",
                        help="scheme of the in-process RTN/SGAT/STaR-Quant models")
    parser.add_argument("--epochs", type=non_negative_int, metavar="N", default=INSPECT_EPOCHS,
                        help="SGAT fit epochs of the in-process SGAT and STaR-Quant models "
                        "(fewer than the method's 15: see the note below)")
    parser.add_argument("--samples", type=positive_int, metavar="N", default=16,
                        help="calibration rows")
    parser.add_argument("--seq-len", type=positive_int, metavar="N", default=128,
                        help="tokens per row")
    parser.add_argument("--rows", type=positive_int, metavar="N", default=16,
                        help="held-out rows measured")
    parser.add_argument("--prompts", type=positive_int, metavar="N", default=4,
                        help="sampler prompts")
    parser.add_argument("--steps", type=positive_int, metavar="N", default=16,
                        help="sampler steps")
    parser.add_argument("--gen-length", type=positive_int, metavar="N", default=64,
                        help="tokens generated")
    parser.add_argument("--block-length", type=positive_int, metavar="N", default=32,
                        help="LLaDA block length")
    parser.add_argument("--layers", help="blocks in the per-channel grid, e.g. 0,3 (default: "
                        "up to 4 spread over the model)")
    parser.add_argument("--seed", type=int, metavar="N", default=0,
                        help="seed of calibration, masks and fits")
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> Path:
    if args.seq_len <= 16:
        raise UserError(f"--seq-len {args.seq_len} leaves no room after the 16-token prompts; "
                        "pass more than 16.")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty directory; nothing "
                        "was written. Choose a new directory.")
    if args.quantized and not Path(args.quantized).is_dir():
        raise UserError(f"--quantized {args.quantized} is not a directory; pass the folder "
                        "starquant quantize wrote.")
    return out


def _layers(spec: str | None, num_blocks: int) -> list[int]:
    if spec is None:
        count = min(4, num_blocks)
        return sorted({round(i * (num_blocks - 1) / max(count - 1, 1)) for i in range(count)})
    try:
        layers = sorted({int(part) for part in spec.split(",")})
    except ValueError as error:
        raise UserError(f"--layers {spec!r} is not a comma-separated list of block indices "
                        "(e.g. 0,3).") from error
    if not layers or layers[0] < 0 or layers[-1] >= num_blocks:
        raise UserError(f"--layers {spec} must name blocks 0..{num_blocks - 1}.")
    return layers


def _quantized_variants(fp_model, calibration_rows, args) -> dict:
    from starquant_plugin.config import METHODS, method_args
    from starquant_plugin.pipeline import quantize_dllm

    models = {}
    for name, method in VARIANTS.items():
        fit = f", {args.epochs} epochs" if METHODS[method]["transform"] == "learned" else ""
        status(f"quantizing {name} ({args.scheme}{fit}) ...")
        model = copy.deepcopy(fp_model)
        quantize_dllm(model, calibration_rows, method_args(
            method, scheme=args.scheme, epochs=args.epochs, seed=args.seed),
            progress_label=name)
        models[name] = model
    return models


def run(args: argparse.Namespace) -> None:
    out = _check(args)
    try:
        from starquant_plugin.inspection import plots
    except ModuleNotFoundError as error:
        if error.name != "matplotlib":
            raise
        raise UserError("starquant inspect draws with matplotlib, which is not installed; "
                        "install the eval extra: pip install 'starquant-plugin[eval]'.") from error
    import torch

    from starquant_plugin.assets import calibration_text, evaluation_text
    from starquant_plugin.inspection.measure import (
        SamplerSettings,
        activation_profiles,
        denoising_errors,
        linear_group_errors,
    )
    from starquant_plugin.inspection.report import render_report
    from starquant_plugin.models.calibration import (
        StateMix,
        build_calibration_states,
        forward_masking_states,
    )
    from starquant_plugin.models.evaluation import text_rows
    from starquant_plugin.models.families import decoder_blocks, family_of, mask_token_id

    torch.manual_seed(args.seed)
    status(f"loading {args.model} ...")
    fp_model, tokenizer = load_model(args.model)
    family = family_of(fp_model)
    layers = _layers(args.layers, len(decoder_blocks(fp_model, family)))
    checkpoint = None
    if args.quantized:
        status(f"loading {args.quantized} ...")
        checkpoint, checkpoint_tokenizer = load_model(args.quantized, what="--quantized")
        if family_of(checkpoint) != family or (checkpoint_tokenizer.get_vocab()
                                              != tokenizer.get_vocab()):
            raise UserError(f"--quantized {args.quantized} is not a checkpoint of {args.model} "
                            "(different family or tokenizer); pass a checkpoint of MODEL.")
    mix = StateMix(block_length=min(32, args.seq_len - 16))
    status(f"building {args.samples} calibration rows of {args.seq_len} tokens ...")
    calibration_rows = build_calibration_states(
        fp_model, text_rows(tokenizer, calibration_text(), seq_len=args.seq_len),
        args.samples, mix=mix, seed=args.seed)
    models = _quantized_variants(fp_model, calibration_rows, args)
    if checkpoint is not None:
        models[f"checkpoint {Path(args.quantized).name}"] = checkpoint

    clean = text_rows(tokenizer, evaluation_text(), seq_len=args.seq_len, max_rows=args.rows)
    states = forward_masking_states(clean, mask_token_id(fp_model), mix.t_grid, 0,
                                    torch.Generator().manual_seed(args.seed))
    status("measuring activations by token state ...")
    profiles = activation_profiles(fp_model, states)
    status("measuring error across a sampler run ...")
    settings = SamplerSettings(args.steps, args.gen_length, args.block_length)
    denoising = denoising_errors(fp_model, models, clean[:args.prompts, :16], settings)
    status("measuring per-layer error of each linear group ...")
    group_errors = linear_group_errors(fp_model, models, states)

    name = Path(args.model).name
    sampler = (f"{family.name} sampler, {args.steps} steps, {args.gen_length} tokens, "
               f"{args.prompts} prompts")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        grid = {k: p for k, p in profiles.items() if int(k.split(":")[0]) in layers}
        plots.plot_activation_by_state(grid, tmp / FIGURES["activation_by_state"], name)
        plots.plot_state_disparity(profiles, tmp / FIGURES["state_disparity"], name)
        plots.plot_denoising_error(denoising, tmp / FIGURES["denoising_error"], name, sampler)
        plots.plot_linear_group_error(group_errors, tmp / FIGURES["linear_group_error"], name)
        setup = {"model": args.model, "family": family.name,
                 "quantized in-process": f"{', '.join(VARIANTS)} at {args.scheme}, "
                 f"{args.epochs} SGAT epochs, {args.samples} calibration rows x "
                 f"{args.seq_len} tokens (assets.calibration_text)",
                 "checkpoint": args.quantized or "none",
                 "measured on": f"{len(states)} held-out rows x {args.seq_len} tokens "
                 f"(assets.evaluation_text) masked at t in {list(mix.t_grid)}",
                 "sampler": sampler, "seed": args.seed}
        (tmp / "report.md").write_text(render_report(
            name, setup, FIGURES, profiles, denoising, group_errors), encoding="utf-8")
        numbers = {"setup": setup,
                   "activation_profiles": {k: {"masked_rms": p.masked.tolist(),
                                               "unmasked_rms": p.unmasked.tolist(),
                                               "norm_ratio": p.norm_ratio,
                                               "profile_distance": p.profile_distance}
                                           for k, p in profiles.items()},
                   "denoising_errors": {k: asdict(e) for k, e in denoising.items()},
                   "linear_group_errors": group_errors}
        (tmp / "inspect.json").write_text(json.dumps(numbers, indent=1) + "\n",
                                          encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in sorted(out.iterdir()):
        print(out / file.name)
    print(f"open {out / 'report.md'} to read the figures with their explanation")
