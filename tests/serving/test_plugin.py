"""The vLLM plugin without an engine: entry point, idempotent registration, what the quant
config accepts and refuses, and that other quantization methods stay vLLM's."""

import copy
import importlib.metadata

import pytest
import torch
from vllm.model_executor.layers.quantization import (
    QUANTIZATION_METHODS,
    get_quantization_config,
)

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.format import quantization_config_dict
from starquant_plugin.integrations.vllm import register
from starquant_plugin.integrations.vllm.models import ARCHITECTURES, LLaDAForMaskedDiffusion
from starquant_plugin.integrations.vllm.quant_config import StarQuantVllmConfig
from starquant_plugin.pipeline import quantize_dllm
from tests.models.tiny import MASK_ID, tiny_llada


@pytest.fixture(scope="module")
def llada_quantization_config() -> dict:
    model = tiny_llada()
    rows = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    args = StarQuantArgs(scheme="W4A4", epochs=0)
    quantize_dllm(model, rows.masked_fill(rows % 2 == 0, MASK_ID), args, progress=False)
    return quantization_config_dict(model, args)


def test_the_entry_point_names_register():
    (entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins")
                if e.name == "starquant"]
    assert entry.value == "starquant_plugin.integrations.vllm:register"
    assert entry.load() is register


def test_register_is_idempotent_and_leaves_other_methods_alone():
    before = get_quantization_config("compressed-tensors")
    register()
    register()
    assert QUANTIZATION_METHODS.count("starquant") == 1
    assert get_quantization_config("starquant") is StarQuantVllmConfig
    assert get_quantization_config("compressed-tensors") is before
    from vllm import ModelRegistry

    assert set(ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())


def test_another_quant_method_is_not_claimed():
    assert StarQuantVllmConfig.override_quantization_method(
        {"quant_method": "compressed-tensors"}, None) is None
    with pytest.raises(ValueError, match="expected 'starquant'"):
        StarQuantVllmConfig({"quant_method": "compressed-tensors", "config_groups": {}})


def test_groups_map_onto_vllm_fused_layers(llada_quantization_config):
    config = StarQuantVllmConfig.from_config(llada_quantization_config)
    config.apply_vllm_mapper(LLaDAForMaskedDiffusion.hf_to_vllm_mapper.get_rename_mapper())
    config.packed_modules_mapping = dict(LLaDAForMaskedDiffusion.packed_modules_mapping)
    qkv = config.group_of("model.layers.0.self_attn.qkv_proj")
    assert qkv["linears"] == ["model.transformer.blocks.0.q_proj",
                              "model.transformer.blocks.0.k_proj",
                              "model.transformer.blocks.0.v_proj"]
    assert config.group_of("model.layers.1.mlp.gate_up_proj")["linears"][0].endswith("ff_proj")
    assert config.group_of("model.layers.1.self_attn.o_proj")["tac_group_size"] == 16
    assert config.group_of("lm_head") is None
    assert config.kv_bits == 4


def test_k_rotation_reaches_the_attention_layers(llada_quantization_config):
    config = copy.deepcopy(llada_quantization_config)
    assert StarQuantVllmConfig(config).k_rotation  # the default at W4A4
    config["starquant"]["k_rotation"] = None
    config["starquant"]["args"]["kv_rotation"] = False
    assert not StarQuantVllmConfig(config).k_rotation


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["starquant"]["args"].update(future_knob=1), "does not implement"),
    (lambda c: c["starquant"].update(k_rotation="givens"), "k_rotation"),
    (lambda c: c["starquant"].update(version=3), "version is 3"),
    (lambda c: c["config_groups"]["group_0"]["input_activations"].update(strategy="tensor"),
     "per tensor dynamic but args.scheme W4A4"),
])
def test_unknown_runtime_behaviour_is_refused(llada_quantization_config, change, message):
    config = copy.deepcopy(llada_quantization_config)
    change(config)
    with pytest.raises(ValueError, match=message):
        StarQuantVllmConfig(config)


def test_mask_id_and_family_mismatches_are_refused(llada_quantization_config):
    config = StarQuantVllmConfig(llada_quantization_config)
    with pytest.raises(ValueError, match="mask_token_id"):
        config.check_model("llada", MASK_ID + 1)
    with pytest.raises(ValueError, match="quantized as a 'llada'"):
        config.check_model("dream", MASK_ID)
