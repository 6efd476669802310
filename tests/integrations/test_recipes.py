"""Every recipe in recipes/ parses to a STaRQuantModifier and runs on its family's tiny model."""

from pathlib import Path
from typing import get_args

import pytest
import torch
from llmcompressor import oneshot

from starquant_plugin.assets import TINY_MODELS, calibration_text
from starquant_plugin.config import SchemeName
from starquant_plugin.integrations.calibration_dataset import dllm_calibration_dataset
from starquant_plugin.integrations.llmcompressor import STaRQuantModifier, load_starquant_recipe
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.models.calibration import StateMix
from starquant_plugin.models.families import decoder_blocks, family_of
from starquant_plugin.models.loading import load_dllm

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_every_family_and_scheme_has_a_recipe():
    assert {path.stem for path in RECIPES} == {
        f"{family}_{scheme}" for family in ("llada", "dream")
        for scheme in map(str.lower, get_args(SchemeName))}


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_runs_on_tiny_model(path):
    family_name, scheme = path.stem.split("_")
    recipe = load_starquant_recipe(path)
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, STaRQuantModifier)
    assert modifier.scheme == scheme.upper()
    modifier.epochs = 1
    if not TINY_MODELS[family_name].is_dir():
        pytest.skip(f"bundled tiny {family_name} model not found")
    model, tokenizer = load_dllm(TINY_MODELS[family_name])
    dataset = dllm_calibration_dataset(model, tokenizer, [calibration_text()], num_samples=4,
                                       seq_len=32, mix=StateMix(trajectory=0.0))
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=4)
    family = family_of(model)
    replaced = [m for block in decoder_blocks(model, family) for m in block.modules()
                if isinstance(m, StarQuantLinear)]
    assert len(replaced) == 7 * len(decoder_blocks(model, family))
    assert not isinstance(model.get_output_embeddings(), StarQuantLinear)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor(dataset["input_ids"])).logits).all()
