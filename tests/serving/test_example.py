"""``examples/serve_vllm.py`` runs as its docstring shows, with vLLM's default multiprocess
engine, prints the transformers sampler's text (the bundled FP LLaDA, 8 greedy steps) and
exits cleanly (without ``driver.shutdown`` it aborted at exit in 2 of 6 runs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from starquant_plugin.assets import TINY_LLADA
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.models.sampling import llada_generate

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "serve_vllm.py"
PROMPT = "The history of"


@pytest.mark.slow
def test_serve_example_prints_the_transformers_samplers_text(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), str(TINY_LLADA), "--prompt", PROMPT, "--steps", "8",
         "--gen-length", "8"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={key: value for key, value in os.environ.items()
             if key != "VLLM_ENABLE_V1_MULTIPROCESSING"})
    assert result.returncode == 0, result.stderr[-4000:]
    model, _ = load_dllm(TINY_LLADA)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA)
    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        sequences = llada_generate(model, prompt, steps=8, gen_length=8,
                                   block_length=8).sequences
    expected = tokenizer.decode(sequences[0, prompt.shape[1]:].tolist())
    assert f"{PROMPT!r} -> {expected!r}" in result.stdout, result.stdout[-2000:]
    assert "(8 engine calls, one per denoising step)" in result.stdout
