"""``starquant lm-eval``: lm-evaluation-harness's own command line, with the ``starquant``
model (LLaDA/Dream, FP or STaR-Quant) registered.

Everything after ``lm-eval`` goes to lm-eval unchanged. lm-eval 0.4.13 finds models only in
its registry and loads no plugins, so a plain ``lm_eval`` process cannot know a model defined
outside it; this command imports the adapter (``integrations.lm_eval``) first, exactly as
LLaDA's and Dream's evaluation scripts do. Needs the ``eval`` extra.
"""

from __future__ import annotations

import argparse
import sys

from starquant_plugin.cli.errors import UserError

COMMAND = "lm-eval"

EXAMPLE = """examples:
  starquant lm-eval --model starquant --model_args pretrained=tiny-llada-w4a4,mc_num=32 \\
      --tasks piqa,winogrande --batch_size 16
  starquant lm-eval --model starquant \\
      --model_args pretrained=GSAI-ML/LLaDA-8B-Base,mc_num=128,cfg_scale=0.5 \\
      --tasks arc_challenge --batch_size 32 --device cuda
  starquant lm-eval --model starquant --model_args pretrained=tiny-llada \\
      --tasks my_task --include_path ./my_tasks --gen_kwargs steps=64,gen_length=64

--model_args of the starquant model: pretrained (folder, Hub id, tiny-llada/tiny-dream),
mc_num (Monte-Carlo ELBO draws, a multiple of --batch_size), cfg_scale, steps, gen_length,
block_length, remasking (LLaDA), alg (Dream), temperature, greedy_check, max_length, dtype,
seed. See docs/evaluation.md.
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Listed in ``starquant --help``; ``main`` hands the rest of the line to lm-eval."""
    commands.add_parser(COMMAND, help="lm-evaluation-harness with the starquant model "
                        "(all arguments are lm-eval's)", add_help=False)


def run_lm_eval(argv: list[str]) -> None:
    """Register the adapter, then run lm-eval's CLI on ``argv``."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import starquant_plugin.integrations.lm_eval  # noqa: F401  registers "starquant"
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "lm_eval":
            raise UserError("lm-eval is not installed; install the eval extra: pip install "
                            "'starquant-plugin[eval]' (lm-eval==0.4.13).") from error
        raise
    if argv in ([], ["-h"], ["--help"]):
        print(__doc__.strip().replace("``", "") + "\n\n" + EXAMPLE
              + "\nlm-eval's own help follows.\n")
        argv = ["run", "--help"]
    sys.argv = ["starquant lm-eval", *argv]
    cli_evaluate()
