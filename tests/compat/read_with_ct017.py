"""Decompress a STaR-Quant checkpoint's GEMM weights with compressed-tensors' own decompressor.

Standalone (imports only torch, safetensors and compressed_tensors) so it runs in a serving
environment with compressed-tensors 0.17 (vLLM's pin) as well as 0.19 (llm-compressor's)::

    python tests/compat/read_with_ct017.py CHECKPOINT_DIR EXPECTED.safetensors

EXPECTED holds ``{module_name: dequantized weight [out, in]}`` (.safetensors or a torch .pt
dict). Every quantized module of the checkpoint must appear there and decompress to exactly
that tensor (in the dtype the decompressor returns: bfloat16 for NVFP4); exits 1 on any
mismatch or missing module, 0 otherwise.
"""

import argparse
import json
import sys
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open
from safetensors.torch import load_file

WEIGHT_TENSORS = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point",
                  "weight_global_scale")


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                if key.rsplit(".", 1)[-1] in WEIGHT_TENSORS:
                    tensors[key] = handle.get_tensor(key)
    return tensors


def _expected(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def check(checkpoint: Path, expected_file: Path) -> list[str]:
    """Return the list of problems (empty = every weight decompresses exactly)."""
    quantization_config = json.loads((checkpoint / "config.json").read_text())[
        "quantization_config"]
    fmt = quantization_config["format"]
    groups = quantization_config["config_groups"]
    if len(groups) != 1:
        return [f"expected one config group, got {sorted(groups)}"]
    scheme = QuantizationScheme.model_validate(next(iter(groups.values())))
    compressor = BaseCompressor.get_value_from_registry(fmt)
    tensors = _checkpoint_tensors(checkpoint)
    modules = sorted({key.rsplit(".", 1)[0] for key in tensors if key.endswith(".weight_scale")})
    expected = _expected(expected_file)
    problems = []
    if not modules:
        problems.append("no quantized module (no '*.weight_scale') in the checkpoint")
    for module in modules:
        local = {key.rsplit(".", 1)[1]: value for key, value in tensors.items()
                 if key.rsplit(".", 1)[0] == module}
        weight = compressor.decompress(local, scheme)["weight"]
        if module not in expected:
            problems.append(f"{module}: no expected weight in {expected_file}")
        elif weight.shape != expected[module].shape or not torch.equal(
                weight, expected[module].to(weight.dtype)):
            diff = (weight.float() - expected[module].float()).abs().max().item() \
                if weight.shape == expected[module].shape else "shape"
            problems.append(f"{module}: decompressed weight differs (max abs diff {diff})")
    missing = sorted(set(expected) - set(modules))
    problems += [f"{name}: expected but not quantized in the checkpoint" for name in missing]
    print(f"compressed-tensors {compressed_tensors.__version__}, format {fmt}: "
          f"{len(modules)} modules checked, {len(problems)} problems")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("expected", type=Path)
    options = parser.parse_args(argv)
    problems = check(options.checkpoint, options.expected)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
