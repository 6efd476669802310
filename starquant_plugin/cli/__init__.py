"""starquant: quantize, evaluate, inspect and publish diffusion LLMs (LLaDA, Dream) with
STaR-Quant.

One module per command; each registers its sub-parser (``add_parser``) and keeps its heavy
imports inside its ``run`` so ``starquant --help`` stays quick. Every command reports a user's
mistake as one line naming the fix and exits 1 (``errors.run_reporting_errors``); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from starquant_plugin.cli import (
    demo,
    evaluate,
    inspect_model,
    lm_eval_harness,
    push,
    quantize,
    serve,
    verify,
)
from starquant_plugin.cli.errors import run_reporting_errors

EPILOG = """commands in a typical session:
  starquant quantize tiny-llada --scheme W4A4 --out tiny-llada-w4a4
  starquant eval tiny-llada-w4a4 --reference tiny-llada
  starquant inspect tiny-llada --quantized tiny-llada-w4a4 --out inspect-llada
  starquant verify tiny-llada-w4a4
  starquant push tiny-llada-w4a4 me/tiny-llada-w4a4 --dry-run
  starquant serve tiny-llada-w4a4 --port 8000
  starquant lm-eval --model starquant --model_args pretrained=tiny-llada-w4a4 --tasks ...
  starquant demo --out demo-checkpoints

Run `starquant COMMAND --help` for each command's options and an example.
MODEL arguments take a folder, a Hugging Face Hub id, or tiny-llada / tiny-dream (bundled)."""

COMMANDS = (quantize, evaluate, inspect_model, verify, push, serve, lm_eval_harness, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starquant", description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [lm_eval_harness.COMMAND]:  # the rest is lm-eval's own command line
        sys.exit(run_reporting_errors(lm_eval_harness.COMMAND,
                                      lambda: lm_eval_harness.run_lm_eval(argv[1:]),
                                      debug=False))
    args = build_parser().parse_args(argv)
    sys.exit(run_reporting_errors(args.command, lambda: args.func(args), args.debug))


__all__ = ["build_parser", "main"]
