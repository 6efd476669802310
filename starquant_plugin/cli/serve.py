"""``starquant serve``: an OpenAI-compatible HTTP server for a LLaDA / Dream checkpoint.

FP and STaR-Quant checkpoints, on vLLM's asynchronous engine (the ``serve`` extra); concurrent
requests share the engine's forward passes step by step (``docs/serving.md``).
"""

from __future__ import annotations

import argparse
import os

from starquant_plugin.cli.errors import UserError, add_command
from starquant_plugin.cli.loading import DTYPES

EXAMPLE = """examples:
  starquant serve tiny-llada-w4a4 --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "tiny-llada-w4a4", "prompt": "The history of", "max_tokens": 32}'

Diffusion settings go in the request body next to the OpenAI fields (steps, gen_length,
block_length, remasking for LLaDA; alg, eps for Dream). Stop the server with Ctrl-C.
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "serve", "serve a checkpoint over the OpenAI HTTP API",
                         __doc__, EXAMPLE)
    parser.add_argument("model", metavar="MODEL",
                        help="checkpoint folder, Hub id, or tiny-llada / tiny-dream")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--served-model-name", default=None,
                        help="the `model` name clients send (default: MODEL as given)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype of the engine")
    parser.add_argument("--top-k", type=int, default=2,
                        help="statistics per position the engine returns (0: full "
                             "distributions, needed for temperature > 0 and Dream's entropy "
                             "rule)")
    parser.add_argument("--max-model-len", type=int, default=1024,
                        help="longest prompt + generation in tokens")
    parser.add_argument("--max-gen-length", type=int, default=None,
                        help="longest generation a request may ask for (default: "
                             "--max-model-len)")
    parser.add_argument("--default-gen-length", type=int, default=128,
                        help="generation length when a request gives none")
    parser.add_argument("--max-running", type=int, default=16,
                        help="requests denoised at once (their steps share engine calls)")
    parser.add_argument("--max-waiting", type=int, default=64,
                        help="requests queued behind them; more get 503")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take from arrival; then 504")
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM's INFO log lines (default: warnings and errors only)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from starquant_plugin.cli.loading import resolve_model

    checkpoint = resolve_model(args.model)
    if not args.verbose:  # read by vLLM when it is imported
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        from starquant_plugin.integrations.vllm.openai_server import run_server
    except ImportError as error:
        raise UserError(f"starquant serve needs vLLM ({error}); install the serving "
                        "environment: pip install 'starquant-plugin[serve]' "
                        "(docs/serving.md).") from None
    run_server(checkpoint, host=args.host, port=args.port,
               model_name=args.served_model_name or args.model, dtype=args.dtype,
               top_k=args.top_k, max_model_len=args.max_model_len,
               max_running=args.max_running, max_waiting=args.max_waiting,
               timeout=args.request_timeout, default_gen_length=args.default_gen_length,
               max_gen_length=args.max_gen_length)
