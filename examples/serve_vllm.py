"""Serve a LLaDA or Dream checkpoint (FP or STaR-Quant) with vLLM and generate from a prompt.

Run in the serving environment (``pip install "starquant-plugin[serve]"``, see
``docs/serving.md``); vLLM finds the plugin through its entry point, nothing to import::

    python examples/serve_vllm.py out/llada-w4a4 --prompt "The history of" --gen-length 32
    python examples/serve_vllm.py starquant_plugin/assets/tiny-dream --steps 16

Each denoising step is one batched ``LLM.encode(..., pooling_task="token_classify")`` call;
the engine returns each position's top tokens and log-probabilities, and the project's
sampler (LLaDA: semi-autoregressive low-confidence remasking; Dream: maskgit_plus) commits
tokens in this process.
"""

import argparse
import os

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a LLaDA / Dream folder (FP or STaR-Quant)")
    parser.add_argument("--prompt", default="The history of")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=None, help="LLaDA only")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny canvases need little
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # INFO shows vLLM's start-up log
    from transformers import AutoTokenizer
    from vllm import LLM

    from starquant_plugin.integrations.vllm.driver import denoise, shutdown
    from starquant_plugin.models.families import family_of

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    llm = LLM(args.checkpoint, runner="pooling", enforce_eager=True,
              dtype=getattr(torch, args.dtype), max_model_len=1024, seed=0)
    family = family_of(llm.model_config.hf_config).name
    kwargs = {"steps": args.steps, "gen_length": args.gen_length}
    if family == "llada":
        kwargs["block_length"] = args.block_length or args.gen_length
    else:
        kwargs["alg"] = "maskgit_plus"
    prompt = tokenizer(args.prompt)["input_ids"]
    try:
        output = denoise(llm, [prompt], **kwargs)
    finally:
        shutdown(llm)  # vLLM 0.32 would otherwise stop its engine at exit, and may abort
    generated = output.sequences[0, len(prompt):].tolist()
    print(f"{args.prompt!r} -> {tokenizer.decode(generated)!r}")
    print(f"({output.engine_calls} engine calls, one per denoising step)")


if __name__ == "__main__":
    main()
