"""Reload STaR-Quant checkpoints in a process that never saw the quantized models.

    python tests/integrations/reload_in_fresh_process.py MANIFEST.json

MANIFEST lists ``{"checkpoint": dir, "expected": file.safetensors, "dtype": "float32"}``;
each expected file holds ``ids``, ``logits`` (the in-memory quantized model's on ``ids``),
``prompt`` and ``sequences`` (its greedy generation). Prints one JSON line: per checkpoint the
largest logit difference, whether the generation is identical, the number of quantized
linears and the in-memory bytes of the transformer-block tensors (norms excluded).
"""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401  (registers the starquant quantizer)
from starquant_plugin.integrations.format import bytes_by_part, module_tensor_bytes
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.models.families import family_of
from starquant_plugin.models.sampling import dream_generate, llada_generate

SAMPLERS = {"llada": (llada_generate, {"block_length": 8}), "dream": (dream_generate, {})}


def check(entry: dict) -> dict:
    expected = load_file(entry["expected"])
    model = AutoModelForCausalLM.from_pretrained(
        entry["checkpoint"], dtype=getattr(torch, entry["dtype"])).eval()
    family = family_of(model)
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    sample, kwargs = SAMPLERS[family.name]
    sequences = sample(model, expected["prompt"], steps=4, gen_length=8, **kwargs).sequences
    return {"max_abs_logit_diff": (logits.float() - expected["logits"].float()).abs().max().item(),
            "same_generation": torch.equal(sequences, expected["sequences"]),
            "quantized_linears": sum(isinstance(m, StarQuantLinear) for m in model.modules()),
            "block_bytes": bytes_by_part(module_tensor_bytes(model),
                                         family.block_pattern)["blocks"]}


def main() -> None:
    entries = json.loads(open(sys.argv[1], encoding="utf-8").read())
    print(json.dumps([check(entry) for entry in entries]))


if __name__ == "__main__":
    main()
