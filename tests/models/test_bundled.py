"""The bundled tiny DLLMs are trained models that use context, loadable as hub directories."""

import json

import pytest

from starquant_plugin.assets import TINY_MODELS, evaluation_text
from starquant_plugin.models.evaluation import (
    masked_token_metrics,
    text_rows,
    unigram_cross_entropy,
)
from starquant_plugin.models.loading import load_dllm


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_bundled_model_uses_context(family):
    """Held-out masked CE beats a unigram model fitted on the evaluation text itself (a
    baseline that ignores context but knows the test frequencies), and more context (fewer
    masks) helps."""
    model, tokenizer = load_dllm(TINY_MODELS[family])
    rows = text_rows(tokenizer, evaluation_text(), max_rows=32)
    metrics = masked_token_metrics(model, rows, progress=False)
    unigram = unigram_cross_entropy(rows, rows, len(tokenizer))
    assert metrics[0.15]["ce"] < unigram - 1.0
    assert metrics[0.15]["ce"] < metrics[0.5]["ce"] < metrics[0.85]["ce"]


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_bundled_model_is_a_hub_layout_directory(family):
    path = TINY_MODELS[family]
    config = json.loads((path / "config.json").read_text())
    assert "auto_map" in config and config["mask_token_id"] is not None
    provenance = json.loads((path / "provenance.json").read_text())
    assert provenance["script"] == "scripts/train_tiny_dllms.py"
    _, tokenizer = load_dllm(path)
    assert tokenizer.mask_token_id == config["mask_token_id"]
