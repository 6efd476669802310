"""One device check: an LLaDA-8B-shaped model through ``starquant quantize``, reload and
serving on this machine's GPU (or, without CUDA, on its CPU at reduced sizes), in one table.

    scripts/device_check.sh                       # the same as the line below
    .venv/bin/python benchmarks/device_check.py --json device-check.json
    STARQUANT_VLLM_PYTHON=/path/to/vllm-env/bin/python scripts/device_check.sh  # + vLLM

Steps, each quantizing or measuring process a fresh one (``--worker``):

1. An FP bf16 LLaDA model with the published LLaDA-8B widths (d 4096, 32 heads x 128,
   n_kv_heads 32, MLP 12288, vocabulary 126464, mask id 126336) and ``--blocks`` blocks,
   **random weights made here** (``serve.save_8b_model``): speed, memory and bytes only, not
   quality. Saved with the bundled tiny LLaDA's tokenizer, its mask token dropped (its id, 2,
   is not the 8B mask id; ``config.json``'s mask id is the one used).
2. ``starquant quantize`` with the default recipes ``recipes/llada_w4a4.yaml`` and
   ``llada_w8a8.yaml`` (``--epochs``, ``--samples`` x ``--seq-len`` rows of the bundled
   prose), run in-process by a worker that reads the peak memory around it: on CUDA
   ``torch.cuda.max_memory_allocated`` (llm-compressor's sequential pipeline onloads one block
   at a time to the GPU), on the CPU the process' peak RSS. Calibration seconds per block:
   ``oneshot_s`` of the CLI's ``quantization_report.json`` over the blocks; the fit's share
   from its per-group ``fit_*_seconds``.
3. Each checkpoint and the bf16 original reloaded in a fresh process (transformers
   ``from_pretrained`` with the project's quantizer, ``serve.load_for_speed``): bytes on disk
   and in memory, one forward checked finite, one warm-up and ``--steps`` timed denoising
   steps of ``--batch`` canvases of ``--canvas`` tokens (``serve.time_settings``), the GEMM
   kernel of its quantized linears (``StarQuantLinear.gemm_kernel``).
4. Where ``STARQUANT_VLLM_PYTHON`` names an interpreter that imports vLLM (vLLM cannot share
   an environment with llm-compressor), the same steps through vLLM's engine
   (``serve.py --worker-8b vllm``) and the route each scheme's layers chose
   (``integrations/vllm/gemm.py``); otherwise skipped with the reason.

Without CUDA (or ``--device cpu``) the same steps run on the CPU at ``CPU_SHAPE`` (d 256,
vocabulary 2048, the tiny tokenizer's mask id) with 2 blocks, 1 epoch and 4 rows: a smoke run
in about a minute (``tests/test_device_check.py`` runs it). On CUDA the sizes are the 8B
widths. The CUDA path has not yet been run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve import SHAPE_8B, gemm_routes, load_for_speed, save_8b_model, time_settings

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "llada"
SCHEMES = ("W4A4", "W8A8")
"""The default recipes run everywhere (``recipes/llada_<scheme>.yaml``)."""
CPU_SHAPE = {"d_model": 256, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 768,
             "vocab_size": 2048, "embedding_size": 2048, "mask_token_id": 2,
             "rope_theta": 500000.0, "max_sequence_length": 1024}
"""The CPU mode's model: the bundled tiny LLaDA's widths and tokenizer, random weights."""
VLLM_PYTHON_ENV = "STARQUANT_VLLM_PYTHON"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Sizes:
    """What one mode runs: model blocks, calibration and the timed denoising."""

    blocks: int
    samples: int
    seq_len: int
    epochs: int
    canvas: int
    batch: int
    steps: int


MODES = {
    "cuda": Sizes(blocks=2, samples=16, seq_len=128, epochs=1, canvas=256, batch=4, steps=8),
    "cpu": Sizes(blocks=2, samples=4, seq_len=64, epochs=1, canvas=64, batch=1, steps=2),
}


FP8_SCHEMES = ("W8A8-FP8", "W4A8-FP8")
"""Run where the GPU has FP8 tensor cores (``recipes/llada_w8a8-fp8.yaml``, ...)."""
FP4_SCHEMES = ("W4A4-NVFP4", "W4A4-MXFP4")
"""Run on every CUDA GPU: vLLM's weight-only FP4 kernels (Marlin FP4 before Blackwell) take
their weights, the plugin quantizes the activations (``integrations/vllm/gemm.py``)."""


def extra_schemes(device: str) -> tuple[str, ...]:
    """Schemes beyond ``SCHEMES`` that this device runs: the FP4 ones on a GPU, and the FP8
    ones where it has FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell),
    where vLLM's FP8 GEMM serves W8A8-FP8 (``integrations/vllm/gemm.py``)."""
    if device != "cuda":
        return ()
    import torch

    if torch.cuda.get_device_capability(0) >= (8, 9):
        print("GPU with FP8 tensor cores: the FP8 and FP4 schemes run too.", flush=True)
        return FP8_SCHEMES + FP4_SCHEMES
    print("GPU: the FP4 schemes run too (weight-only FP4 kernels).", flush=True)
    return FP4_SCHEMES


def device_name(device: str) -> str:
    """The GPU's name and compute capability, or the CPU's model name (``lscpu``)."""
    if device == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        return f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        lscpu = ""
    names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines()
             if line.startswith("Model name")]
    return f"{names[0] if names else platform.processor() or 'unknown CPU'}, " \
           f"{os.cpu_count()} logical CPUs"


# ---------------------------------------------------------------- workers (fresh processes)


def _peak_memory_mib(device: str) -> float:
    """This process' peak: GPU memory allocated by torch (CUDA) or resident set (CPU)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize_worker(device: str, argv: list[str]) -> dict:
    """``starquant <argv>`` in this process, with the peak memory around it."""
    import torch
    from llmcompressor.utils.dev import get_main_device

    from starquant_plugin.cli import main as starquant

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    code: int | str | None = 0
    try:
        starquant(argv)
    except SystemExit as exit_:
        code = exit_.code
    if code:
        raise SystemExit(f"starquant {' '.join(argv)} exited with {code}")
    if device == "cuda":
        torch.cuda.synchronize()
    return {"peak_memory_mib": _peak_memory_mib(device),
            "calibration_device": str(get_main_device())}


def reload_worker(device: str, checkpoint: str, sizes: Sizes, threads: int) -> dict:
    """Reload ``checkpoint`` (transformers, the project's quantizer), check one forward, time
    the denoising steps, name the GEMM kernels."""
    import torch
    from runtime import memory_bytes  # benchmarks/runtime.py, beside this script

    from starquant_plugin.models.families import family_of

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    generate, model = load_for_speed("transformers", checkpoint, FAMILY, threads, sizes.canvas,
                                     sizes.batch, device)
    load_s = time.perf_counter() - start
    ids = torch.randint(3, model.config.vocab_size, (1, sizes.canvas),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids.to(device)).logits
    finite = bool(torch.isfinite(logits).all())
    del logits
    timing = time_settings(generate, FAMILY, [(sizes.canvas, sizes.batch)], sizes.steps,
                           threads, device)[0]
    return {"load_s": load_s, "logits_finite": finite,
            "memory_bytes": memory_bytes(model, family_of(model).block_pattern),
            "step_ms": timing["step_ms"], "tokens_per_s": timing["canvas_tokens_per_s"],
            "gemm": gemm_routes("transformers", model, sizes.canvas * sizes.batch),
            "peak_memory_mib": _peak_memory_mib(device)}


# ---------------------------------------------------------------- the check


def _run(command: list[str], env: dict[str, str], what: str) -> str:
    """Run ``command``; its stderr's tail on failure. Returns stdout."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-1500:]}\n{result.stderr[-3000:]}")
    return result.stdout


def _worker(args: list, env: dict[str, str], what: str) -> dict:
    """This script in ``--worker`` mode in a fresh process; its result from a JSON file."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        _run([sys.executable, __file__, "--worker-out", out.name, "--worker", json.dumps(args)],
             env, what)
        return json.loads(Path(out.name).read_text())


def make_model(path: Path, device: str, blocks: int) -> dict:
    """The random-weight FP bf16 model and a tokenizer that agrees with its mask id."""
    from transformers import AutoTokenizer

    from starquant_plugin.assets import TINY_MODELS

    shape = SHAPE_8B[FAMILY] if device == "cuda" else CPU_SHAPE
    config = save_8b_model(FAMILY, blocks, path, shape)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODELS[FAMILY])
    tokenizer.save_pretrained(path)
    if tokenizer.mask_token_id != config.mask_token_id:  # the 8B mask id is past its vocab
        tokenizer_config = path / "tokenizer_config.json"
        fields = json.loads(tokenizer_config.read_text())
        fields.pop("mask_token", None)
        tokenizer_config.write_text(json.dumps(fields, indent=2))
    return {key: getattr(config, key) for key in shape} | {"n_layers": blocks}


def vllm_interpreter() -> tuple[str | None, str]:
    """(``STARQUANT_VLLM_PYTHON`` if it imports vLLM, else None; why)."""
    python = os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        return None, (f"{VLLM_PYTHON_ENV} is not set (point it at the python of an environment "
                      "with vLLM and this project's serve extra)")
    probe = "import vllm, starquant_plugin; print(vllm.__version__)"
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    if result.returncode:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{python} cannot import vllm and starquant_plugin: {tail}"
    return python, f"vLLM {result.stdout.strip()} from {python}"


def serve_vllm(python: str, checkpoint: str, device: str, sizes: Sizes, threads: int,
               env: dict[str, str]) -> dict:
    """``serve.py --worker-8b vllm`` in ``python``: step time, tokens/s, GEMM routes."""
    command = [python, str(ROOT / "benchmarks" / "serve.py"), "--family", FAMILY, "--steps",
               str(sizes.steps), "--device", device, "--worker-8b", "vllm", checkpoint,
               str(threads), json.dumps([[sizes.canvas, sizes.batch]])]
    env = env | {"VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "WARNING")}
    measured = json.loads(_run(command, env, f"vLLM on {checkpoint}").strip().splitlines()[-1])[0]
    return {"step_ms": measured["step_ms"], "tokens_per_s": measured["canvas_tokens_per_s"],
            "gemm": measured["gemm"]}


def calibration_per_block(report: dict, blocks: int) -> dict:
    """Seconds per block from ``quantization_report.json``: the whole ``oneshot`` (captures,
    fit, TAC, propagation) and the SGAT fit alone (its per-group setup and epochs)."""
    fit = sum(value for group in report["fit"].values() for key, value in group.items()
              if key.startswith("fit_") and key.endswith("_seconds") and value is not None)
    timings = report["timings"]
    return {"calibration_s_per_block": timings["oneshot_s"] / blocks,
            "fit_s_per_block": fit / blocks, "oneshot_s": timings["oneshot_s"],
            # the rows' trajectory part runs the FP model's sampler where the CLI loaded it
            # (the CPU), before oneshot
            "calibration_rows_s": timings["calibration_rows_s"]}


def run_check(args: argparse.Namespace, device: str, work: Path) -> dict:
    from runtime import disk_bytes  # benchmarks/runtime.py, beside this script

    from starquant_plugin.models.families import FAMILIES

    sizes = MODES[device]
    for name in asdict(sizes):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    threads = args.threads or ((os.cpu_count() or 1) if device == "cuda" else 1)
    env = os.environ | OFFLINE | {"OMP_NUM_THREADS": str(threads)}
    schemes = SCHEMES + extra_schemes(device)
    pattern = FAMILIES[FAMILY].block_pattern
    result: dict[str, Any] = {
        "mode": device, "device": device_name(device),
        "weights": "random (made by this script; speed, memory and bytes only, not quality)",
        "sizes": asdict(sizes), "threads": threads, "schemes": {}}
    print(f"device check, {device.upper()} mode, on {result['device']}", flush=True)
    tick = time.perf_counter()
    fp = work / "llada-bf16"
    result["model"] = make_model(fp, device, sizes.blocks)
    print(f"built the {'8B-shaped' if device == 'cuda' else 'reduced (CPU mode)'} model with "
          f"random weights in {time.perf_counter() - tick:.0f} s: {result['model']}",
          flush=True)
    paths = {"bf16": fp}
    for scheme in schemes:
        out = work / f"llada-{scheme.lower()}"
        recipe = ROOT / "recipes" / f"{FAMILY}_{scheme.lower()}.yaml"
        print(f"starquant quantize {scheme} ({recipe.relative_to(ROOT)}, {sizes.samples} rows "
              f"x {sizes.seq_len} tokens, {sizes.epochs} epoch(s)) ...", flush=True)
        quantized = _worker(["quantize", device, "quantize", str(fp), "--recipe",
                             str(recipe), "--samples", str(sizes.samples), "--seq-len",
                             str(sizes.seq_len), "--epochs", str(sizes.epochs), "--out",
                             str(out)], env, f"starquant quantize {scheme}")
        report = json.loads((out / "quantization_report.json").read_text())
        result["schemes"][scheme] = {"quantize": quantized | calibration_per_block(
            report, sizes.blocks)}
        paths[scheme] = out
    result["schemes"] = {"bf16": {}} | result["schemes"]
    for name, path in paths.items():
        print(f"reloading {name} in a fresh process and timing {sizes.steps} denoising "
              "steps ...", flush=True)
        entry = result["schemes"][name]
        entry["disk_bytes"] = disk_bytes(path, pattern)
        entry["reload"] = _worker(["reload", device, str(path), asdict(sizes), threads], env,
                                  f"reloading {name}")
    python, reason = vllm_interpreter()
    result["vllm"] = reason
    print(f"vLLM: {'serving' if python else 'skipped'}: {reason}", flush=True)
    for name, path in paths.items() if python else ():
        print(f"serving {name} through vLLM ...", flush=True)
        result["schemes"][name]["vllm"] = serve_vllm(python, str(path), device, sizes, threads,
                                                     env)
    add_ratios(result["schemes"])
    return result


def add_ratios(schemes: dict[str, dict]) -> None:
    """Bytes, step time and tokens/s of each entry as ratios to bf16's."""
    base = schemes["bf16"]
    for entry in schemes.values():
        entry["disk_vs_bf16"] = entry["disk_bytes"]["whole"] / base["disk_bytes"]["whole"]
        entry["blocks_vs_bf16"] = entry["disk_bytes"]["blocks"] / base["disk_bytes"]["blocks"]
        for runtime in ("reload", "vllm"):
            if runtime in entry:
                entry[runtime]["step_vs_bf16"] = (entry[runtime]["step_ms"]
                                                  / base[runtime]["step_ms"])
                entry[runtime]["tokens_per_s_vs_bf16"] = (entry[runtime]["tokens_per_s"]
                                                          / base[runtime]["tokens_per_s"])


def table(result: dict) -> str:
    """The one table: a row per model (bf16 and each scheme)."""
    gpu = result["mode"] == "cuda"
    memory = "peak GPU MiB (quantize)" if gpu else "peak RSS MiB (quantize)"
    header = ["model", "calib s/block", "fit s/block", memory, "disk MiB (x bf16)",
              "block MiB (x bf16)", "reload MiB", "step ms", "tok/s (x bf16)", "GEMM",
              "vLLM step ms", "vLLM tok/s (x bf16)", "vLLM GEMM"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in result["schemes"].items():
        quantize, reload, vllm = entry.get("quantize"), entry["reload"], entry.get("vllm")
        disk = entry["disk_bytes"]
        cells = [name,
                 f"{quantize['calibration_s_per_block']:.1f}" if quantize else "-",
                 f"{quantize['fit_s_per_block']:.1f}" if quantize else "-",
                 f"{quantize['peak_memory_mib']:.0f}" if quantize else "-",
                 f"{disk['whole'] / 2**20:.1f} ({entry['disk_vs_bf16']:.2f})",
                 f"{disk['blocks'] / 2**20:.1f} ({entry['blocks_vs_bf16']:.2f})",
                 f"{reload['memory_bytes']['whole'] / 2**20:.1f}",
                 f"{reload['step_ms']:.1f}",
                 f"{reload['tokens_per_s']:.0f} ({reload['tokens_per_s_vs_bf16']:.2f})",
                 ", ".join(reload["gemm"]),
                 f"{vllm['step_ms']:.1f}" if vllm else "skipped",
                 f"{vllm['tokens_per_s']:.0f} ({vllm['tokens_per_s_vs_bf16']:.2f})" if vllm
                 else "skipped",
                 ", ".join(vllm["gemm"]) if vllm else "skipped"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    sizes = result["sizes"]
    model = result["model"]
    mode = ("CUDA mode (not yet run on a GPU when this was written)" if result["mode"] == "cuda"
            else "CPU mode (no CUDA, or --device cpu): reduced sizes, a smoke run")
    return (
        f"{mode}; device: {result['device']}; {result['threads']} CPU thread(s).\n"
        f"LLaDA, d {model['d_model']}, {model['n_heads']} heads, MLP "
        f"{model['mlp_hidden_size']}, vocabulary {model['vocab_size']}, {model['n_layers']} "
        f"blocks, bf16, {result['weights']}. Calibration: default recipes with "
        f"{sizes['epochs']} epoch(s), {sizes['samples']} rows x {sizes['seq_len']} tokens of "
        f"the bundled prose. Denoising: {sizes['steps']} timed steps (after 1 warm-up) of "
        f"{sizes['batch']} canvas(es) of {sizes['canvas']} tokens; tok/s = canvas tokens per "
        "second. calib s/block = starquant quantize's oneshot time / blocks; fit s/block = its "
        "SGAT setup + epochs. Memory peak of the quantizing process ("
        + ("torch.cuda.max_memory_allocated" if result["mode"] == "cuda" else "peak RSS")
        + "). Bytes: tensors on disk; block = the decoder blocks' linears. vLLM: "
        f"{result['vllm']}. Total {result['seconds']:.0f} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda where torch sees one, else the CPU mode")
    parser.add_argument("--json", type=Path, default=Path("device-check.json"))
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the model and checkpoints in DIR (default: a temporary "
                             "folder, deleted)")
    parser.add_argument("--threads", type=int, help="CPU threads (CPU mode: 1)")
    for name in asdict(MODES["cpu"]):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"override (cuda {getattr(MODES['cuda'], name)}, cpu "
                                 f"{getattr(MODES['cpu'], name)})")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        kind, device, *rest = args.worker
        if kind == "quantize":
            out = quantize_worker(device, rest)
        else:
            out = reload_worker(device, rest[0], Sizes(**rest[1]), rest[2])
        Path(args.worker_out).write_text(json.dumps(out))
        return
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; leave --device out for "
                     "the CPU mode.")
    start = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep
    else:
        work = Path(tempfile.mkdtemp(prefix="starquant-device-check-"))
    try:
        result = run_check(args, device, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - start
    result["table"] = table(result)
    result["summary"] = summary(result)
    print("\n" + result["table"] + "\n\n" + result["summary"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
