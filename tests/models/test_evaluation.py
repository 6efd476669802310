"""Evaluation measures: fixed masks, ELBO stratification, agreement."""

import pytest
import torch

from starquant_plugin.models.evaluation import (
    _fixed_count_masks,
    agreement_per_prompt,
    elbo_log_likelihood,
    generation_agreement,
    masked_token_metrics,
    quality_summary,
    unigram_cross_entropy,
)
from starquant_plugin.models.sampling import llada_generate
from tests.devices import DevicelessTensors
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada


def test_masked_metrics_are_deterministic_and_model_sensitive():
    rows = torch.randint(0, 60, (6, 32))
    a = masked_token_metrics(tiny_llada(0), rows, progress=False)
    assert a == masked_token_metrics(tiny_llada(0), rows, progress=False)
    b = masked_token_metrics(tiny_llada(1), rows, progress=False)
    assert a[0.5]["ce"] != b[0.5]["ce"]
    assert set(a) == {0.15, 0.5, 0.85} and all(0 <= v["acc"] <= 1 for v in a.values())


def test_mask_draws_cover_every_position_before_repeating_one():
    masks = _fixed_count_masks((5, 128), 0.15, torch.Generator().manual_seed(3), draws=7)
    assert masks.shape == (7, 5, 128) and (masks.sum(-1) == 19).all()
    assert (masks[:6].sum(0) <= 1).all()  # 6 x 19 = 114 distinct positions per row
    assert (masks.sum(0) >= 1).all()  # 7 x 19 >= 128: every position scored
    single = _fixed_count_masks((5, 128), 0.15, torch.Generator().manual_seed(3))
    assert torch.equal(single[0], masks[0])


def test_more_mask_draws_pool_the_single_draws():
    model, rows = tiny_llada(0), torch.randint(0, 60, (4, 32))
    pooled = masked_token_metrics(model, rows, (0.25,), progress=False, draws=4)[0.25]["ce"]
    assert pooled != masked_token_metrics(model, rows, (0.25,), progress=False)[0.25]["ce"]
    # equal-size draws: the pooled CE is the mean of the per-draw CEs
    masks = _fixed_count_masks(tuple(rows.shape), 0.25, torch.Generator().manual_seed(0), 4)
    per_draw = []
    for mask in masks:
        with torch.no_grad():
            logits = model(rows.masked_fill(mask, MASK_ID)).logits[mask]
        per_draw.append(torch.nn.functional.cross_entropy(logits.float(), rows[mask]).item())
    assert abs(pooled - sum(per_draw) / 4) < 1e-5


def test_unigram_baseline_matches_entropy_of_uniform_tokens():
    rows = torch.arange(64).repeat(100, 1)
    assert abs(unigram_cross_entropy(rows, rows, 64) - torch.log(torch.tensor(64.0)).item()) < 1e-6


def test_elbo_is_negative_seeded_and_prefers_the_model_argmax():
    model = tiny_dream()
    prompt, target = torch.randint(0, 60, (8,)), torch.randint(0, 60, (6,))
    a = elbo_log_likelihood(model, prompt, target, mc_num=16, batch_size=8, seed=1)
    assert a < 0 and a == elbo_log_likelihood(model, prompt, target, mc_num=16, batch_size=8,
                                              seed=1)


def test_generation_agreement_is_one_for_identical_models_and_lower_otherwise():
    def generate(model, prompts):
        return llada_generate(model, prompts, steps=8, gen_length=8, block_length=8).sequences

    prompts = torch.randint(0, 60, (2, 4))
    assert generation_agreement(generate, tiny_llada(0), tiny_llada(0), prompts) == 1.0
    lower = generation_agreement(generate, tiny_llada(0), tiny_llada(5), prompts)
    assert lower < 1.0
    # The reference's generations computed once give the same number as the reference model.
    reference = generate(tiny_llada(0), prompts)
    assert generation_agreement(generate, reference, tiny_llada(5), prompts) == lower
    per_prompt = agreement_per_prompt(generate, reference, tiny_llada(5), prompts)
    assert per_prompt.shape == (2,) and abs(per_prompt.mean().item() - lower) < 1e-7


def test_elbo_with_guidance_needs_a_prompt_to_change_anything():
    model = tiny_llada()
    prompt, target = torch.arange(3, 11), torch.arange(20, 28)
    plain = elbo_log_likelihood(model, prompt, target, mc_num=8, batch_size=4)
    guided = elbo_log_likelihood(model, prompt, target, mc_num=8, batch_size=4, cfg_scale=1.0)
    assert guided != plain
    empty = torch.zeros(0, dtype=torch.long)  # unconditional == conditional without a prompt
    assert elbo_log_likelihood(model, empty, target, mc_num=8, batch_size=4, cfg_scale=1.0) \
        == elbo_log_likelihood(model, empty, target, mc_num=8, batch_size=4)


@pytest.mark.parametrize("make_model", [tiny_llada, tiny_dream])
def test_evaluation_creates_every_tensor_on_a_named_device(make_model):
    """Masked CE, ELBO and both families' samplers under ``quality_summary``: no tensor made
    on the default device (on a GPU it would meet the model's CUDA tensors)."""
    model = make_model(0)
    rows = torch.randint(0, 60, (4, 48), generator=torch.Generator().manual_seed(0))
    with DevicelessTensors() as deviceless:
        row = quality_summary(model, model, rows, rows[:, :8], elbo_rows=2, mc_num=4,
                              mask_draws=2)
    assert not deviceless.found, "tensors created off the model's device (fails on a GPU)"
    assert row["gen_agreement"] == 1.0  # the model against itself
