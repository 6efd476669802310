"""Calibration states: the right layouts, the requested mix, deterministic."""

import pytest
import torch

from starquant_plugin.models.calibration import (
    StateMix,
    build_calibration_states,
    semi_autoregressive_states,
)
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada


def test_semi_autoregressive_layout():
    rows = torch.randint(0, 60, (50, 48))
    states = semi_autoregressive_states(rows, MASK_ID, block_length=8, prompt_length=8,
                                        generator=torch.Generator().manual_seed(0))
    masked = states == MASK_ID
    assert not masked[:, :8].any()
    for row in masked:
        first = int(row.float().argmax()) if row.any() else len(row)
        block_end = 8 + ((first - 8) // 8 + 1) * 8
        assert row[block_end:].all()  # later blocks fully masked
        assert not row[:first].any()  # clean prefix


@pytest.mark.parametrize("make_model", [tiny_llada, tiny_dream])
def test_mix_counts_prompt_and_determinism(make_model):
    model = make_model()
    rows = torch.randint(0, 60, (10, 48))
    mix = StateMix(block_length=8, prompt_length=8, trajectory_steps=8)
    a = build_calibration_states(model, rows, 20, mix=mix, seed=3)
    b = build_calibration_states(model, rows, 20, mix=mix, seed=3)
    assert a.shape == (20, 48) and torch.equal(a, b)
    assert not (a[:, :8] == MASK_ID).any()
    ratios = (a == MASK_ID).float().mean(1)
    assert (ratios > 0).sum() >= 15 and ratios.max() < 1
    assert mix.counts(20) == {"forward": 8, "semi_autoregressive": 6, "trajectory": 6}


def test_bad_mix_is_refused():
    with pytest.raises(ValueError, match="State mix weights"):
        StateMix(forward=0, semi_autoregressive=0, trajectory=0).counts(10)
