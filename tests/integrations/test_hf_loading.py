"""``AutoModelForCausalLM.from_pretrained`` on STaR-Quant checkpoints: exact round trip for both
families and every scheme, and a clear refusal for each kind of broken checkpoint."""

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

import starquant_plugin
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.format import save_starquant
from starquant_plugin.integrations.hf_quantizer import StarQuantHfQuantizer, register_hf_quantizer
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.models.sampling import dream_generate, llada_generate
from starquant_plugin.pipeline import quantize_dllm
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada

MODELS = {"llada": tiny_llada, "dream": tiny_dream}
SAMPLERS = {"llada": llada_generate, "dream": dream_generate}


def calibration_rows(seed: int = 0) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 60, (8, 32), generator=generator)
    return rows.masked_fill(torch.rand(rows.shape, generator=generator) < 0.5, MASK_ID)


_CACHE: dict[tuple[str, str], tuple] = {}


def quantized(family: str, scheme: str, tmp_path_factory) -> tuple:
    """(in-memory quantized model, its saved checkpoint dir), built once per test session."""
    key = (family, scheme)
    if key not in _CACHE:
        model = MODELS[family]()
        args = StarQuantArgs(scheme=scheme, epochs=1)
        quantize_dllm(model, calibration_rows(), args, progress=False)
        path = tmp_path_factory.mktemp(f"{family}-{scheme}") / "ckpt"
        save_starquant(model, path, args=args)
        _CACHE[key] = (model, path)
    return _CACHE[key]


@pytest.mark.parametrize("scheme", ["W4A4", "W4A8", "W8A8"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_reload_gives_exactly_the_in_memory_logits(family, scheme, tmp_path_factory):
    model, path = quantized(family, scheme, tmp_path_factory)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    linears = [m for m in loaded.modules() if isinstance(m, StarQuantLinear)]
    assert len(linears) == 2 * 7
    ids = calibration_rows(3)
    assert torch.equal(loaded(ids).logits, model(ids).logits)  # tolerance 0: bit-exact
    prompt = torch.randint(0, 60, (1, 4), generator=torch.Generator().manual_seed(5))
    sample = SAMPLERS[family]
    kwargs = {"block_length": 8} if family == "llada" else {}
    assert torch.equal(sample(loaded, prompt, steps=4, gen_length=8, **kwargs).sequences,
                       sample(model, prompt, steps=4, gen_length=8, **kwargs).sequences)


def test_reloaded_model_keeps_kv_quantization_and_resaves(tmp_path, tmp_path_factory):
    model, path = quantized("llada", "W4A4", tmp_path_factory)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert loaded.config._attn_implementation == "starquant_sdpa"
    assert all(block.kv_bits == 4 for block in loaded.model.transformer.blocks)
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
    from safetensors.torch import load_file, save_file

    _, path = quantized("dream", "W4A4", tmp_path_factory)
    broken = _copy(path, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.sgat_gates"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.sgat_gates.*re-save"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_unknown_format_version_is_refused_with_the_fix(tmp_path, tmp_path_factory):
    _, path = quantized("llada", "W8A8", tmp_path_factory)
    broken = _copy(path, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["starquant"]["version"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="version is 99.*upgrade starquant_plugin"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_plain_transformers_only_warns_on_an_unknown_quant_method(tmp_path, tmp_path_factory,
                                                                   caplog):
    """Why quant_method is "starquant": a loader without the plugin does not raise, it logs a
    warning and loads the float skeleton with random 4-bit linears (documented in
    docs/format.md). We assert the warning so a change in transformers is noticed."""
    _, path = quantized("llada", "W4A4", tmp_path_factory)
    other = _copy(path, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "not-registered"
    (other / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        model = AutoModelForCausalLM.from_pretrained(other)
    assert "Unknown quantization type" in caplog.text
    assert not any(isinstance(m, StarQuantLinear) for m in model.modules())
