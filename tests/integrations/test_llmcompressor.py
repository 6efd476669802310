"""STaRQuantModifier in llm-compressor's oneshot on the bundled tiny models: same model as the
core path, composable with other modifiers, recipes round-trip, bad input fails early."""

import subprocess
import sys

import datasets
import pytest
import torch
from llmcompressor.datasets.utils import LengthAwareSampler
from llmcompressor.modifiers.factory import ModifierFactory
from loguru import logger
from pydantic import ValidationError

import starquant_plugin
from starquant_plugin.assets import calibration_text
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.calibration_dataset import dllm_calibration_dataset
from starquant_plugin.integrations.llmcompressor import (
    STaRQuantModifier,
    load_starquant_recipe,
    resolve_block_groups,
)
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.models.calibration import StateMix
from starquant_plugin.models.families import decoder_blocks, family_of
from starquant_plugin.pipeline import quantize_dllm
from tests.integrations.tiny_oneshot import BATCH, calibration_dataset, run_oneshot, tiny_model

# Both paths run the same function on the same rows in the same order and batches, so the
# result is bit-identical in practice; the tolerance only allows for summation-order noise.
ATOL = 1e-5

RECIPE = """
starquant_stage:
  quantization_modifiers:
    STaRQuantModifier:
      scheme: W4A4
      epochs: 1
      seed: 3
"""


def assert_block_linears_replaced(model):
    family = family_of(model)
    for block in decoder_blocks(model, family):
        for group in family.linear_groups:
            for name in group:
                assert isinstance(block.get_submodule(name), StarQuantLinear), name


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_oneshot_matches_core_path(family):
    model, tokenizer = tiny_model(family)
    dataset = calibration_dataset(model, tokenizer)
    run_oneshot(model, dataset, RECIPE)
    assert_block_linears_replaced(model)

    reference, _ = tiny_model(family)
    order = LengthAwareSampler(dataset, len(dataset), BATCH).order  # oneshot's row order
    rows = torch.tensor(dataset["input_ids"])[order]
    quantize_dllm(reference, rows, StarQuantArgs(scheme="W4A4", epochs=1, seed=3),
                  batch_size=BATCH, progress=False)
    with torch.no_grad():
        got, expected = model(rows).logits, reference(rows).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_modifier_composes_with_smoothquant_in_one_stage():
    model, tokenizer = tiny_model("llada")
    norm_before = model.model.transformer.blocks[0].attn_norm.weight.clone()
    recipe = """
    starquant_stage:
      quantization_modifiers:
        SmoothQuantModifier:
          smoothing_strength: 0.5
          mappings:
            - [['re:.*q_proj$', 're:.*k_proj$', 're:.*v_proj$'], 're:.*attn_norm$']
            - [['re:.*ff_proj$', 're:.*up_proj$'], 're:.*ff_norm$']
        STaRQuantModifier:
          scheme: W8A8
          transform: identity
          state_gating: false
          tac: false
    """
    run_oneshot(model, calibration_dataset(model, tokenizer, rows=4), recipe)
    assert_block_linears_replaced(model)
    assert not torch.equal(model.model.transformer.blocks[0].attn_norm.weight, norm_before)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 2, 7, 2]])).logits).all()


def test_saved_recipe_loads_back(tmp_path):
    recipe = load_starquant_recipe(RECIPE)
    path = tmp_path / "recipe.yaml"
    recipe.yaml(file_path=str(path))
    loaded = load_starquant_recipe(path)
    (original,), (again,) = recipe.modifiers, loaded.modifiers
    assert isinstance(again, STaRQuantModifier)
    assert again.starquant_args() == original.starquant_args()
    assert again.starquant_args().epochs == 1 and again.starquant_args().seed == 3


def test_registration_is_idempotent_and_resolves_by_class_name():
    starquant_plugin.register()
    starquant_plugin.register()
    modifier = ModifierFactory.create("STaRQuantModifier", allow_registered=True,
                                      allow_experimental=False, scheme="W4A8")
    assert isinstance(modifier, STaRQuantModifier)
    assert modifier.starquant_args() == StarQuantArgs(scheme="W4A8")


def test_import_works_without_llmcompressor():
    code = ("import sys; sys.modules['llmcompressor'] = None; import starquant_plugin; "
            "starquant_plugin.register(); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# bad input: every case fails before calibration starts


def test_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="epoch"):
        load_starquant_recipe(RECIPE.replace("epochs: 1", "epoch: 1"))


def test_unknown_scheme_is_rejected():
    with pytest.raises(ValidationError, match="W4A4"):
        STaRQuantModifier(scheme="W3A3")


def test_recipe_without_stage_is_rejected():
    with pytest.raises(ValueError, match="_stage"):
        load_starquant_recipe("STaRQuantModifier:\n  scheme: W4A4\n")


def test_targets_matching_nothing_fail_before_calibration():
    model, tokenizer = tiny_model("llada")
    recipe = RECIPE + "      targets: ['re:.*does_not_exist']\n"
    with pytest.raises(ValueError, match="match no decoder-block linear"):
        run_oneshot(model, calibration_dataset(model, tokenizer, rows=4), recipe)
    assert not any(isinstance(m, StarQuantLinear) for m in model.modules())


def test_targets_matching_only_the_lm_head_are_rejected():
    model, _ = tiny_model("llada")
    family = family_of(model)
    with pytest.raises(ValueError, match="match no decoder-block linear"):
        resolve_block_groups(model, family, decoder_blocks(model, family),
                             ["model.transformer.ff_out"], [])


def test_partly_targeted_group_is_rejected():
    model, _ = tiny_model("llada")
    family = family_of(model)
    with pytest.raises(ValueError, match="share one STaR transform"):
        resolve_block_groups(model, family, decoder_blocks(model, family),
                             ["re:.*q_proj$"], None)


def test_ff_out_regex_ignores_block_mlp_outputs_too():
    model, _ = tiny_model("llada")
    family = family_of(model)
    groups = resolve_block_groups(model, family, decoder_blocks(model, family), None,
                                  ["re:.*ff_out$"])
    assert all(("ff_out",) not in block_groups for block_groups in groups.values())


def test_warns_when_lm_head_is_not_ignored():
    model, _ = tiny_model("llada")
    family = family_of(model)
    messages = []
    handler = logger.add(messages.append, level="WARNING")
    try:
        groups = resolve_block_groups(model, family, decoder_blocks(model, family),
                                      ["Linear"], [])
    finally:
        logger.remove(handler)
    assert any("LM head" in str(message) for message in messages)
    assert all(len(block_groups) == 4 for block_groups in groups.values())


def test_calibration_dataset_has_only_equal_length_input_ids():
    model, tokenizer = tiny_model("llada")
    texts = datasets.Dataset.from_dict({"text": [calibration_text()], "label": [0]})
    dataset = dllm_calibration_dataset(model, tokenizer, texts, num_samples=6, seq_len=24,
                                       mix=StateMix(trajectory=0.0))
    assert dataset.column_names == ["input_ids"]
    rows = torch.tensor(dataset["input_ids"])
    assert rows.shape == (6, 24)
    assert (rows == model.config.mask_token_id).any()
    with pytest.raises(ValueError, match="sentence"):
        dllm_calibration_dataset(model, tokenizer, texts.rename_column("text", "body"), 2)
