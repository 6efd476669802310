"""SGATModifier and TACModifier: STaRQuantModifier is exactly SGAT then TAC, the composed recipes
in recipes/composed/ run through oneshot, save and reload in a fresh process, and recipes that
do not stack are refused before anything changes."""

from pathlib import Path

import pytest
import torch
import yaml
from llmcompressor import oneshot

from starquant_plugin.integrations.format import args_of
from starquant_plugin.integrations.llmcompressor import (
    SGATModifier,
    TACModifier,
    load_starquant_recipe,
)
from starquant_plugin.method import StarQuantLinear
from tests.integrations.reload_in_fresh_process import record_expected, reload_in_fresh_process
from tests.integrations.tiny_oneshot import calibration_dataset, run_oneshot, tiny_model

COMPOSED = Path(__file__).resolve().parents[2] / "recipes" / "composed"
RECIPE_FAMILIES = {"sgat_tac_w4a4.yaml": "llada", "sgat_gptq_w4a4.yaml": "dream",
                   "quarot_tac_w4a4.yaml": "llada"}


def _recipe(modifiers: dict) -> str:
    return yaml.safe_dump({"stack_stage": {"quantization_modifiers": modifiers}},
                          sort_keys=False)


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> dict[str, dict]:
    """Each recipe of recipes/composed/ as written but for 1 epoch, run through oneshot on a
    tiny model, saved, and reloaded in one fresh process."""
    root = tmp_path_factory.mktemp("composed")
    runs, entries = {}, []
    for path, family in RECIPE_FAMILIES.items():
        recipe = load_starquant_recipe(COMPOSED / path)
        for modifier in recipe.modifiers:
            if isinstance(modifier, SGATModifier):
                modifier.epochs = 1
        model, tokenizer = tiny_model(family)
        run_oneshot(model, calibration_dataset(model, tokenizer), recipe)
        model.save_pretrained(root / path)
        entries.append({"checkpoint": str(root / path),
                        **record_expected(model, root / f"{path}.safetensors")})
        runs[path] = {"model": model, "recipe": recipe, "checkpoint": root / path}
    for path, outcome in zip(RECIPE_FAMILIES, reload_in_fresh_process(entries, root),
                             strict=True):
        runs[path]["reload"] = outcome
    return runs


def test_every_composed_recipe_is_tested():
    assert {path.name for path in COMPOSED.glob("*.yaml")} == set(RECIPE_FAMILIES)


def _max_abs_diff(one: torch.nn.Module, two: torch.nn.Module) -> float:
    expected, got = one.state_dict(), two.state_dict()
    assert got.keys() == expected.keys()
    assert any("tac" in name for name in got)
    return max((got[name].float() - expected[name].float()).abs().max().item()
               for name in got)


def test_starquant_modifier_is_exactly_the_composed_sgat_then_tac_recipe(composed):
    run = composed["sgat_tac_w4a4.yaml"]
    one, tokenizer = tiny_model("llada")
    run_oneshot(one, calibration_dataset(one, tokenizer),
                _recipe({"STaRQuantModifier": {"scheme": "W4A4", "epochs": 1}}))
    assert _max_abs_diff(one, run["model"]) == 0.0
    assert args_of(run["model"]) == args_of(one)


def test_starquant_modifier_is_exactly_sgat_then_tac_on_dream():
    one, tokenizer = tiny_model("dream")
    dataset = calibration_dataset(one, tokenizer, rows=4)
    fields = {"scheme": "W4A4", "epochs": 1, "seed": 3}
    run_oneshot(one, dataset, _recipe({"STaRQuantModifier": {**fields, "tac_shrinkage": 0.5}}))
    two, _ = tiny_model("dream")
    run_oneshot(two, dataset, _recipe({"SGATModifier": fields,
                                       "TACModifier": {"tac_shrinkage": 0.5}}))
    assert _max_abs_diff(one, two) == 0.0


@pytest.mark.parametrize("path", RECIPE_FAMILIES)
def test_composed_recipe_runs_saves_and_reloads_in_a_fresh_process(composed, path):
    run = composed[path]
    args, recipe = args_of(run["model"]), run["recipe"]
    assert args.tac is any(isinstance(modifier, TACModifier) for modifier in recipe.modifiers)
    assert (args.weight_quantizer == "gptq") is ("gptq" in path)
    assert (args.transform == "hadamard") is ("quarot" in path)
    assert run["reload"]["quantized_linears"] > 0
    assert run["reload"]["max_abs_logit_diff"] == 0.0
    assert run["reload"]["same_generation"]
    saved = load_starquant_recipe(run["checkpoint"] / "recipe.yaml")
    assert [type(m) for m in saved.modifiers] == [type(m) for m in recipe.modifiers]


def test_sgat_modifier_alone_fits_no_tac():
    model, tokenizer = tiny_model("llada")
    run_oneshot(model, calibration_dataset(model, tokenizer, rows=4),
                _recipe({"SGATModifier": {"scheme": "W8A8", "epochs": 0}}))
    assert args_of(model).tac is False
    assert not any("tac" in name for name in model.state_dict())


# recipes that do not stack: refused before the model changes

REFUSED = {
    "tac before a quantizer": ({"TACModifier": {}, "SGATModifier": {"scheme": "W4A4"}},
                               "Put SGATModifier .* before TACModifier"),
    "tac alone": ({"TACModifier": {}}, "Put SGATModifier"),
    "tac twice": ({"STaRQuantModifier": {"scheme": "W4A4"}, "TACModifier": {}},
                  "already fits TAC"),
    "two sgat stages": ({"SGATModifier": {"scheme": "W4A4"},
                         "STaRQuantModifier": {"scheme": "W8A8"}},
                        "Keep one STaRQuantModifier or SGATModifier"),
    "gptq modifier after sgat": ({"SGATModifier": {"scheme": "W4A4"},
                                  "GPTQModifier": {"scheme": "W4A16", "targets": ["Linear"]}},
                                 "set weight_quantizer: gptq on SGATModifier"),
    "tac after llm-compressor's w4a4": (
        {"QuantizationModifier": {"scheme": "W4A4", "targets": ["Linear"],
                                  "ignore": ["model.transformer.ff_out"]},
         "TACModifier": {}}, "TACModifier follows QuantizationModifier, which writes "
                             "compressed-tensors linears .* SGATModifier with transform: "
                             "identity"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_recipe_that_does_not_stack_is_refused_when_loaded(case):
    modifiers, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        load_starquant_recipe(_recipe(modifiers))


@pytest.mark.parametrize("case", [c for c in REFUSED if "llm-compressor" not in c])
def test_recipe_that_does_not_stack_is_refused_by_oneshot_before_anything_changes(case):
    modifiers, message = REFUSED[case]
    model, tokenizer = tiny_model("llada")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        run_oneshot(model, calibration_dataset(model, tokenizer, rows=4), _recipe(modifiers))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_tac_on_a_model_with_no_quantized_attention_output_is_refused():
    model, tokenizer = tiny_model("llada")
    recipe = _recipe({"SGATModifier": {"scheme": "W4A4", "epochs": 0,
                                       "ignore": ["model.transformer.ff_out", "re:.*attn_out$"]},
                      "TACModifier": {}})
    with pytest.raises(ValueError, match="keep every attn_out in 16 bit"):
        oneshot(model=model, dataset=calibration_dataset(model, tokenizer, rows=4),
                recipe=recipe, num_calibration_samples=4)
    assert not any(isinstance(module, StarQuantLinear) for module in model.modules())
    assert not any(module._forward_pre_hooks for module in model.modules())
