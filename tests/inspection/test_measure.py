"""The measurements behind ``starquant inspect`` on small random models: shapes, zero error
for the FP model against itself, nonzero for a quantized one, and states kept apart."""

import copy

import pytest
import torch

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.inspection.measure import (
    ChannelProfile,
    SamplerSettings,
    activation_profiles,
    denoising_errors,
    linear_group_errors,
)
from starquant_plugin.pipeline import quantize_dllm
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada


def denoising_rows(n: int = 6, seq: int = 24) -> torch.LongTensor:
    rows = torch.randint(2, 60, (n, seq), generator=torch.Generator().manual_seed(0))
    return rows.masked_fill(torch.rand(rows.shape, generator=torch.Generator().manual_seed(1))
                            < 0.5, MASK_ID)


@pytest.fixture(scope="module", params=["llada", "dream"])
def models(request):
    fp = tiny_llada() if request.param == "llada" else tiny_dream()
    quantized = copy.deepcopy(fp)
    quantize_dllm(quantized, denoising_rows(), StarQuantArgs(scheme="W4A4", epochs=0,
                                                             transform="identity",
                                                             state_gating=False, tac=False),
                  progress=False)
    return fp, quantized


def test_activation_profiles_split_channels_by_token_state(models):
    fp, _ = models
    profiles = activation_profiles(fp, denoising_rows(), batch_size=4)
    assert len(profiles) == 2 * 4  # 2 blocks x 4 linear groups
    profile = next(iter(profiles.values()))
    assert profile.masked.shape == profile.unmasked.shape == (64,)
    assert not torch.equal(profile.masked, profile.unmasked)
    assert profile.norm_ratio > 0 and 0 <= profile.profile_distance <= 2
    with pytest.raises(ValueError, match="both states are needed"):
        activation_profiles(fp, torch.randint(2, 60, (2, 8)))


def test_errors_are_zero_against_itself_and_positive_when_quantized(models):
    fp, quantized = models
    rows = denoising_rows()
    groups = linear_group_errors(fp, {"FP": fp, "RTN": quantized}, rows, batch_size=4)
    assert set(groups["FP"]) == set(groups["RTN"]) and len(groups["FP"]) == 8
    assert all(value == 0 for value in groups["FP"].values())
    assert all(value > 0 for value in groups["RTN"].values())
    settings = SamplerSettings(steps=4, gen_length=8, block_length=8)
    errors = denoising_errors(fp, {"FP": fp, "RTN": quantized}, rows[:2, :6].clamp(max=59),
                              settings)
    assert errors["FP"].teacher_forced == [0.0] * 4 == errors["FP"].token_disagreement
    assert all(e > 0 for e in errors["RTN"].teacher_forced)
    assert len(errors["RTN"].free_running) == 4


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream])
def test_group_errors_compare_a_rotated_v_in_the_fp_basis(make):
    """With kv_rotation the quantized v_proj writes V rotated per head; its error is measured
    after rotating back, so it is the quantization error, as without the rotation."""
    fp, errors = make(), {}
    for rotate in (False, True):
        model = copy.deepcopy(fp)
        quantize_dllm(model, denoising_rows(), StarQuantArgs(
            scheme="W8A8", kv_bits=4, kv_rotation=rotate, epochs=0, transform="identity",
            state_gating=False, tac=False), progress=False)
        errors[rotate] = linear_group_errors(fp, {"q": model}, denoising_rows())["q"]
    qkv = "0:q_proj/k_proj/v_proj"
    assert errors[True][qkv] < 0.1 and errors[False][qkv] < 0.1


def test_channel_ratios_show_a_gap_that_the_pooled_ratio_hides():
    """Masked tokens load channel 0, unmasked tokens channel 1, equally hard: the pooled RMS
    ratio is 1, the per-channel ratios (what the grid's curves and titles show) are not."""
    profile = ChannelProfile(masked=torch.tensor([10.0, 0.1, 1.0, 1.0]),
                             unmasked=torch.tensor([0.1, 10.0, 0.5, 0.5]))
    assert abs(profile.norm_ratio - 1.0) < 0.1
    assert profile.channel_ratios().tolist() == pytest.approx([100.0, 0.01, 2.0, 2.0])
    assert profile.channel_ratios().median().item() == pytest.approx(2.0)
