"""``AutoModelForCausalLM.from_pretrained`` on STaR-Quant checkpoints: exact round trip in a
fresh process for both families and every scheme (int, FP8, MXFP4), the W4A4 size target, and a
clear refusal for each kind of broken checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

import starquant_plugin
from starquant_plugin.assets import TINY_DREAM, TINY_LLADA
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.format import (
    bytes_by_part,
    checkpoint_tensor_bytes,
)
from starquant_plugin.integrations.hf_quantizer import StarQuantHfQuantizer, register_hf_quantizer
from starquant_plugin.integrations.saving import save_starquant
from starquant_plugin.models.families import family_of, mask_token_id
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.pipeline import quantize_dllm
from tests.integrations.reload_in_fresh_process import record_expected, reload_in_fresh_process
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada

MODELS = {"llada": tiny_llada, "dream": tiny_dream}


def calibration_rows(seed: int = 0) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 60, (8, 32), generator=generator)
    return rows.masked_fill(torch.rand(rows.shape, generator=generator) < 0.5, MASK_ID)


_CACHE: dict[tuple[str, str], tuple] = {}


def quantized(family: str, scheme: str, tmp_path_factory, **overrides) -> tuple:
    """(in-memory quantized model, its saved checkpoint dir), built once per test session."""
    key = (family, scheme, *sorted(overrides.items()))
    if key not in _CACHE:
        model = MODELS[family]()
        args = StarQuantArgs(scheme=scheme, epochs=1, **overrides)
        quantize_dllm(model, calibration_rows(), args, progress=False)
        path = tmp_path_factory.mktemp(f"{family}-{scheme}") / "ckpt"
        save_starquant(model, path, args=args)
        _CACHE[key] = (model, path)
    return _CACHE[key]


SCHEMES = ("W4A4", "W4A8", "W8A8", "W8A8-FP8", "W4A8-FP8", "W4A4-MXFP4", "W4A4-NVFP4")
BUNDLED = {"llada": TINY_LLADA, "dream": TINY_DREAM}


def _block_bytes(path: Path) -> int:
    pattern = family_of(AutoConfig.from_pretrained(path)).block_pattern
    return bytes_by_part(checkpoint_tensor_bytes(path), pattern)["blocks"]


@pytest.fixture(scope="module")
def fresh_reloads(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Quantize -> save -> reload in one fresh process: the random tiny models (float32) at
    every scheme, and the bundled trained ones at W4A4 as shipped (bf16)."""
    entries, keys = [], []
    for family in MODELS:
        for scheme in SCHEMES:
            model, path = quantized(family, scheme, tmp_path_factory)
            entries.append({"checkpoint": str(path),
                            **record_expected(model, path.parent / "expected.safetensors")})
            keys.append((family, scheme))
        model, path = quantized(family, "W4A4", tmp_path_factory, kv_rotation=False)
        entries.append({"checkpoint": str(path),
                        **record_expected(model, path.parent / "expected.safetensors")})
        keys.append((family, "W4A4 without kv_rotation"))
        model, _ = load_dllm(BUNDLED[family], dtype=torch.bfloat16)
        args = StarQuantArgs(scheme="W4A4", epochs=0)
        rows = torch.randint(3, 2000, (8, 64), generator=torch.Generator().manual_seed(0))
        quantize_dllm(model, rows.masked_fill(rows % 2 == 0, mask_token_id(model)), args,
                      progress=False)
        path = save_starquant(model, tmp_path_factory.mktemp(f"bundled-{family}") / "ckpt",
                              args=args)
        entries.append({"checkpoint": str(path),
                        **record_expected(model, path.parent / "expected.safetensors")})
        keys.append((family, "bundled W4A4 bf16"))
    outcomes = reload_in_fresh_process(entries, tmp_path_factory.mktemp("manifest"))
    return {key: {**outcome, "checkpoint": Path(entry["checkpoint"])}
            for key, entry, outcome in zip(keys, entries, outcomes, strict=True)}


@pytest.mark.parametrize("scheme", [*SCHEMES, "W4A4 without kv_rotation", "bundled W4A4 bf16"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_fresh_process_reload_gives_the_in_memory_logits_and_generation(fresh_reloads, family,
                                                                        scheme):
    outcome = fresh_reloads[(family, scheme)]
    assert outcome["max_abs_logit_diff"] == 0.0  # tolerance 0: bit-exact
    assert outcome["same_generation"]
    blocks = 4 if scheme.startswith("bundled") else 2
    assert outcome["quantized_linears"] == blocks * 7


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_w4a4_block_weights_take_at_most_0_3x_bf16_on_disk_and_in_memory(fresh_reloads,
                                                                          family):
    """Issue target on the trained tiny models (d 256): int4 codes, bf16 scales and the
    structured STaR tensors together stay within 0.3x the bf16 block weights."""
    outcome = fresh_reloads[(family, "bundled W4A4 bf16")]
    original = _block_bytes(BUNDLED[family])
    assert _block_bytes(outcome["checkpoint"]) <= 0.3 * original
    assert outcome["block_bytes"] <= 0.3 * original


def test_reloaded_model_keeps_kv_quantization_and_resaves(tmp_path, tmp_path_factory):
    model, path = quantized("llada", "W4A4", tmp_path_factory)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert loaded.config._attn_implementation == "starquant_sdpa"
    assert all(block.kv_bits == 4 for block in loaded.model.transformer.blocks)
    assert all(block.k_rotation for block in loaded.model.transformer.blocks)  # the default
    again = save_starquant(loaded, tmp_path / "again")  # args come from the loaded config
    reloaded = AutoModelForCausalLM.from_pretrained(again, dtype=torch.float32)
    ids = calibration_rows(4)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_registration_is_idempotent():
    register_hf_quantizer()
    starquant_plugin.register()
    assert AUTO_QUANTIZER_MAPPING["starquant"] is StarQuantHfQuantizer


def _copy(path: Path, to: Path) -> Path:
    to.mkdir()
    for file in path.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def test_truncated_shard_is_refused_with_the_fix(tmp_path, tmp_path_factory):
    _, path = quantized("llada", "W4A4", tmp_path_factory)
    broken = _copy(path, tmp_path / "broken")
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt.*download"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_missing_tensor_is_refused_with_its_name(tmp_path, tmp_path_factory):
    from safetensors.torch import load_file

    _, path = quantized("dream", "W4A4", tmp_path_factory)
    broken = _copy(path, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.gate_proj.input_transform.sgat_left"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mlp.gate_proj.input_transform.sgat_left.*re-save"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_weight_shape_that_is_not_the_linears_shape_is_refused(tmp_path, tmp_path_factory):
    """Its header is right (int64 [2]) and the integer path ignores it, but the reference path
    unpacks the codes by it: a wrong value would fail at the first forward."""
    from safetensors.torch import load_file

    _, path = quantized("llada", "W4A4", tmp_path_factory)
    broken = _copy(path, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    name = "model.transformer.blocks.0.q_proj.weight_shape"
    out_features, in_features = tensors[name].tolist()
    tensors[name] = torch.tensor([out_features, in_features // 2])
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"q_proj.weight_shape is \[{out_features}, "
                                         rf"{in_features // 2}\], expected.*download"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_unknown_format_version_is_refused_with_the_fix(tmp_path, tmp_path_factory):
    _, path = quantized("llada", "W8A8", tmp_path_factory)
    broken = _copy(path, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["starquant"]["version"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="version is 99.*upgrade starquant_plugin"):
        AutoModelForCausalLM.from_pretrained(broken)


@pytest.mark.parametrize("quant_method", ["not-registered", None])
def test_unknown_or_missing_quant_method_is_refused_not_loaded_at_random(
        tmp_path, tmp_path_factory, caplog, quant_method):
    """transformers only warns on an unregistered quant_method and ignores a folder without
    quantization_config, leaving the quantized linears at random init; the model classes'
    from_pretrained turns both into an error naming the fix."""
    _, path = quantized("llada", "W4A4", tmp_path_factory)
    other = _copy(path, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    if quant_method is None:
        del config["quantization_config"]
    else:
        config["quantization_config"]["quant_method"] = quant_method
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized tensor.*random init.*save_starquant"):
        AutoModelForCausalLM.from_pretrained(other)


def test_k_rotation_is_recorded_and_applied_on_load(tmp_path_factory):
    model, path = quantized("dream", "W4A4", tmp_path_factory, kv_rotation=True)
    block = json.loads((path / "config.json").read_text())["quantization_config"]["starquant"]
    assert block["k_rotation"] == "hadamard" and block["args"]["kv_rotation"]
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert all(layer.self_attn.k_rotation for layer in loaded.model.layers)
    ids = calibration_rows(4)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for layer in loaded.model.layers:  # without the K rotation the logits differ
        layer.self_attn.k_rotation = False
    assert not torch.equal(loaded(ids).logits, model(ids).logits)
