"""Runtime: the mask-state hook and StarQuantLinear against the per-token reference formula."""

import pytest
import torch
from torch import nn

from starquant_plugin.method.quantizers import (
    fake_quantize_activation,
    fake_quantize_weight,
    scheme_args,
)
from starquant_plugin.method.runtime import MaskState, StarQuantLinear, attach_mask_state
from starquant_plugin.method.sgat import SGATResult, state_gates
from starquant_plugin.method.tac import TACParams, apply_tac
from starquant_plugin.method.transforms import random_hadamard

D, OUT, D_EX, MASK_ID = 32, 24, 4, 7


def _sgat(seed: int = 0) -> SGATResult:
    gen = torch.Generator().manual_seed(seed)
    transform = random_hadamard(D, gen) + 0.05 * torch.randn(D, D, generator=gen)
    return SGATResult(
        transform=transform,
        transform_inv=torch.linalg.inv(transform),
        gates=state_gates(D, D_EX),
        act_clip=torch.tensor([0.9, 0.8]),
        weight_clip=torch.rand(OUT, generator=gen) * 0.2 + 0.8,
        residual_masked=0.0,
        residual_unmasked=0.0,
    )


def _state(mask: torch.Tensor) -> MaskState:
    state = MaskState()
    state.mask_state = mask
    return state


def _reference(
    x: torch.Tensor, mask: torch.Tensor, layer: StarQuantLinear, tac: TACParams | None
) -> torch.Tensor:
    """Token by token: pick the state's gate row and clip, quantize, multiply."""
    _, act_args = scheme_args("W4A4")
    out = torch.empty(*x.shape[:-1], OUT)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t] if tac is None else apply_tac(x[b, t], tac)
            s = int(mask[b, t])
            x_t = (token @ layer.transform) * layer.gates[s]
            x_q = fake_quantize_activation(x_t, act_args, layer.act_clip[s])
            out[b, t] = x_q @ layer.weight.T + layer.bias
    return out


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D, OUT)


def test_mixed_states_match_reference_with_all_masked_and_all_unmasked_rows(linear):
    weight_args, act_args = scheme_args("W4A4")
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [1] * 6, [0] * 6], dtype=torch.bool)
    tac = TACParams(
        matrices=torch.eye(16) + 0.1 * torch.randn(2, 16, 16, generator=gen),
        bias=0.1 * torch.randn(D, generator=gen),
    )
    layer = StarQuantLinear.from_linear(
        linear, _sgat(), weight_args, act_args, _state(mask), tac=tac
    )
    x = torch.randn(3, 6, D, generator=gen)
    torch.testing.assert_close(layer(x), _reference(x, mask, layer, tac), atol=1e-5, rtol=1e-5)


def test_from_linear_stores_the_quantized_transformed_weight(linear):
    weight_args, act_args = scheme_args("W4A4")
    sgat = _sgat()
    layer = StarQuantLinear.from_linear(linear, sgat, weight_args, act_args, MaskState())
    expected = fake_quantize_weight(
        linear.weight.detach() @ sgat.transform_inv.T, weight_args, sgat.weight_clip
    )
    torch.testing.assert_close(layer.weight, expected)


def test_flipped_position_is_regated_on_the_next_forward(linear):
    weight_args, act_args = scheme_args("W4A4")
    mask = torch.ones(1, 4, dtype=torch.bool)
    state = _state(mask)
    layer = StarQuantLinear.from_linear(linear, _sgat(), weight_args, act_args, state)
    x = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(2))
    before = layer(x)
    state.mask_state = torch.tensor([[True, False, True, True]])  # position 1 got decoded
    after = layer(x)
    torch.testing.assert_close(after, _reference(x, state.mask_state, layer, None))
    assert not torch.allclose(before[0, 1], after[0, 1])
    torch.testing.assert_close(before[0, [0, 2, 3]], after[0, [0, 2, 3]])


def test_identical_gate_rows_reduce_to_a_plain_transformed_linear(linear):
    weight_args, act_args = scheme_args("W4A8")
    sgat = _sgat()
    gates = torch.ones(2, D)
    weight_q = fake_quantize_weight(linear.weight.detach() @ sgat.transform_inv.T, weight_args)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    layer = StarQuantLinear(
        weight_q, linear.bias, sgat.transform, gates, 0.9, act_args, _state(mask)
    )
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(3))
    plain = fake_quantize_activation(x @ sgat.transform, act_args, 0.9) @ weight_q.T
    torch.testing.assert_close(layer(x), plain + linear.bias, atol=1e-5, rtol=1e-5)


def test_mask_state_hook_follows_input_ids_until_detached(linear):
    weight_args, act_args = scheme_args("W4A4")
    embedding = nn.Embedding(16, D)
    state = attach_mask_state(embedding, MASK_ID)
    layer = StarQuantLinear.from_linear(linear, _sgat(), weight_args, act_args, state)
    input_ids = torch.tensor([[1, MASK_ID, 3], [MASK_ID, MASK_ID, MASK_ID]])
    out = layer(embedding(input_ids))
    assert torch.equal(state.mask_state, input_ids == MASK_ID)
    assert out.shape == (2, 3, OUT)
    embedding(input=torch.tensor([[MASK_ID, 2]]))  # keyword call is seen too
    assert state.mask_state.tolist() == [[True, False]]
    state.detach()
    embedding(torch.tensor([[2, 2]]))
    assert state.mask_state.tolist() == [[True, False]]


def test_mismatched_or_missing_mask_state_raises(linear):
    weight_args, act_args = scheme_args("W4A4")
    state = MaskState()
    layer = StarQuantLinear.from_linear(linear, _sgat(), weight_args, act_args, state)
    with pytest.raises(RuntimeError, match="attach_mask_state"):
        layer(torch.randn(1, 3, D))
    state.mask_state = torch.zeros(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask state"):
        layer(torch.randn(1, 3, D))


def test_from_linear_checks_weight_clip_rows(linear):
    weight_args, act_args = scheme_args("W4A4")
    sgat = _sgat()
    sgat.weight_clip = torch.ones(OUT + 8)  # fitted on a concatenated [q; k] weight
    with pytest.raises(ValueError, match="weight_clip_rows"):
        StarQuantLinear.from_linear(linear, sgat, weight_args, act_args, MaskState())
    layer = StarQuantLinear.from_linear(
        linear, sgat, weight_args, act_args, MaskState(), weight_clip_rows=slice(8, 8 + OUT)
    )
    assert layer.weight.shape == (OUT, D)
