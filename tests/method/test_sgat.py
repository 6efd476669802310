"""SGAT: gate layout, exactness on null-space data, fitting gains and determinism."""

import pytest
import torch

from starquant_plugin.method.quantizers import (
    fake_quantize_activation,
    fake_quantize_weight,
    scheme_args,
)
from starquant_plugin.method.sgat import (
    MASKED,
    UNMASKED,
    exactness_residual,
    exclusive_basis,
    fit_sgat,
    state_gates,
)

D, D_EX, OUT, TOKENS = 64, 6, 48, 256


def _state_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked tokens never use basis columns [0, 8), unmasked never [8, 16); each state has its
    own outlier directions (basis columns 8, 9 for masked; 0, 1 for unmasked).

    Returns ``x_masked [TOKENS, D]``, ``x_unmasked [TOKENS, D]``, ``weight [OUT, D]``.
    """
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]

    def tokens(unused: slice, outliers: list[int]) -> torch.Tensor:
        z = torch.randn(TOKENS, D, generator=gen)
        z[:, outliers] *= 20.0
        z[:, unused] = 0.0
        return z @ basis.T

    x_masked = tokens(slice(0, 8), [8, 9])
    x_unmasked = tokens(slice(8, 16), [0, 1])
    weight = torch.randn(OUT, D, generator=gen) / D**0.5
    return x_masked, x_unmasked, weight


def _rtn_loss(x: torch.Tensor, weight: torch.Tensor) -> float:
    weight_args, act_args = scheme_args("W4A4")
    y = x @ weight.T
    y_q = fake_quantize_activation(x, act_args) @ fake_quantize_weight(weight, weight_args).T
    return ((y - y_q).norm() ** 2 / y.norm() ** 2).item()


def test_gate_rows_keep_shared_plus_own_exclusive_block():
    gates = state_gates(10, 2)
    assert gates[UNMASKED].tolist() == [1] * 6 + [0, 0] + [1, 1]
    assert gates[MASKED].tolist() == [1] * 6 + [1, 1] + [0, 0]
    assert torch.equal(state_gates(10, 0), torch.ones(2, 10))
    with pytest.raises(ValueError, match="d_ex"):
        state_gates(10, 6)


def test_exclusive_basis_is_exact_on_null_space_data():
    x_masked, x_unmasked, weight = _state_data()
    cov_m = x_masked.T.double() @ x_masked.double() / TOKENS
    cov_u = x_unmasked.T.double() @ x_unmasked.double() / TOKENS
    t = exclusive_basis(cov_m, cov_u, D_EX, torch.Generator().manual_seed(0))
    torch.testing.assert_close(t.T @ t, torch.eye(D), atol=1e-5, rtol=0)
    t_inv = torch.linalg.inv(t.double())
    gates = state_gates(D, D_EX).double()
    for state, x in ((MASKED, x_masked.double()), (UNMASKED, x_unmasked.double())):
        gated = ((x @ t.double()) * gates[state]) @ t_inv  # float64: test exactness, not fp32
        torch.testing.assert_close(
            gated @ weight.T.double(), x @ weight.T.double(), atol=1e-5, rtol=0
        )
        assert exactness_residual(x, t, t_inv, gates[state]) < 1e-5


def test_fit_reports_near_zero_residual_at_exact_initialisation():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    result = fit_sgat(weight, x_masked, x_unmasked, weight_args, act_args, D_EX, epochs=0)
    assert result.residual_masked < 1e-5 and result.residual_unmasked < 1e-5
    assert len(result.loss_history) == 1


def test_fit_reduces_loss_and_beats_rtn_on_state_dependent_outliers():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    result = fit_sgat(
        weight, x_masked, x_unmasked, weight_args, act_args, D_EX, epochs=10, batch_tokens=128
    )
    initial, fitted = result.loss_history[0], min(result.loss_history)
    assert fitted < 0.6 * initial
    rtn = _rtn_loss(x_masked, weight) + _rtn_loss(x_unmasked, weight)
    assert fitted < 0.5 * rtn
    # The reported loss is the loss of the returned parameters.
    weight_q = fake_quantize_weight(
        result.transformed_weight(weight), weight_args, result.weight_clip
    )
    recomputed = 0.0
    for state, x in ((MASKED, x_masked), (UNMASKED, x_unmasked)):
        x_t = (x @ result.transform) * result.gates[state]
        y_q = fake_quantize_activation(x_t, act_args, result.act_clip[state]) @ weight_q.T
        y = x @ weight.T
        recomputed += ((y - y_q).norm() ** 2 / y.norm() ** 2).item()
    assert recomputed == pytest.approx(fitted, rel=1e-3)


def test_no_gating_keeps_all_gates_and_one_shared_clip():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A8")
    result = fit_sgat(
        weight, x_masked, x_unmasked, weight_args, act_args, D_EX, epochs=1, gate=False
    )
    assert torch.equal(result.gates, torch.ones(2, D))
    assert result.act_clip[0] == result.act_clip[1]
    assert result.residual_masked == pytest.approx(0.0, abs=1e-6)


def test_same_seed_gives_identical_fit_and_other_seed_differs():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    args = (weight, x_masked, x_unmasked, weight_args, act_args, D_EX)
    first = fit_sgat(*args, epochs=2, batch_tokens=128, seed=3)
    second = fit_sgat(*args, epochs=2, batch_tokens=128, seed=3)
    other = fit_sgat(*args, epochs=2, batch_tokens=128, seed=4)
    assert torch.equal(first.transform, second.transform)
    assert torch.equal(first.act_clip, second.act_clip)
    assert torch.equal(first.weight_clip, second.weight_clip)
    assert first.loss_history == second.loss_history
    assert not torch.equal(first.transform, other.transform)


def test_fit_rejects_mismatched_token_dims():
    _, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    with pytest.raises(ValueError, match="x_masked"):
        fit_sgat(weight, torch.randn(8, D + 1), x_unmasked, weight_args, act_args, D_EX)
