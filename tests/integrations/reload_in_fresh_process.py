"""Reload STaR-Quant checkpoints in a process that never saw the quantized models.

    python tests/integrations/reload_in_fresh_process.py MANIFEST.json

MANIFEST lists ``{"checkpoint": dir, "expected": file.safetensors, "dtype": "float32"}``;
each expected file (``record_expected``) holds ``ids``, ``logits`` (the in-memory quantized
model's on ``ids``), ``prompt`` and ``sequences`` (its greedy generation). Prints one JSON
line: per checkpoint the largest logit difference, whether the generation is identical, the
number of quantized linears and the in-memory bytes of the transformer-block tensors (norms
excluded). Tests call ``reload_in_fresh_process(entries)``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401  (registers the starquant quantizer)
from starquant_plugin.integrations.format import bytes_by_part, module_tensor_bytes
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.models.families import family_of, mask_token_id
from starquant_plugin.models.sampling import dream_generate, llada_generate

SAMPLERS = {"llada": (llada_generate, {"block_length": 8}), "dream": (dream_generate, {})}


def _sample(model, prompt: torch.Tensor) -> torch.Tensor:
    sample, kwargs = SAMPLERS[family_of(model).name]
    return sample(model, prompt, steps=4, gen_length=8, **kwargs).sequences


def record_expected(model, file: Path) -> dict:
    """Write the in-memory model's logits on a mixed-state canvas and its greedy generation to
    ``file`` (.safetensors); returns the manifest fields for it."""
    ids = torch.randint(3, 60, (2, 32), generator=torch.Generator().manual_seed(3))
    ids = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(4))
                          < 0.5, mask_token_id(model))
    prompt = torch.randint(3, 60, (1, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = {"ids": ids, "logits": model(ids).logits, "prompt": prompt,
                    "sequences": _sample(model, prompt)}
    save_file({k: v.contiguous() for k, v in expected.items()}, file)
    return {"expected": str(file), "dtype": str(model.dtype).removeprefix("torch.")}


def reload_in_fresh_process(entries: list[dict], work_dir: Path) -> list[dict]:
    """Run this script on ``entries`` (manifest rows) in a new interpreter; its outcomes."""
    manifest = work_dir / "manifest.json"
    manifest.write_text(json.dumps(entries))
    result = subprocess.run([sys.executable, __file__, str(manifest)], capture_output=True,
                            text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check(entry: dict) -> dict:
    expected = load_file(entry["expected"])
    model = AutoModelForCausalLM.from_pretrained(
        entry["checkpoint"], dtype=getattr(torch, entry["dtype"])).eval()
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    return {"max_abs_logit_diff": (logits.float() - expected["logits"].float()).abs().max().item(),
            "same_generation": torch.equal(_sample(model, expected["prompt"]),
                                           expected["sequences"]),
            "quantized_linears": sum(isinstance(m, StarQuantLinear) for m in model.modules()),
            "block_bytes": bytes_by_part(module_tensor_bytes(model),
                                         family_of(model).block_pattern)["blocks"]}


def main() -> None:
    entries = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    print(json.dumps([check(entry) for entry in entries]))


if __name__ == "__main__":
    main()
