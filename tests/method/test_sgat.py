"""SGAT: drop layout, exactness on null-space data, fitting gains, factors and determinism."""

import pytest
import torch

from starquant_plugin.method.quantizers import (
    fake_quantize_activation,
    fake_quantize_weight,
    scheme_args,
    search_weight_clip,
)
from starquant_plugin.method.sgat import (
    MASKED,
    UNMASKED,
    dropped_directions,
    exactness_residual,
    exclusive_subspaces,
    fit_sgat,
    static_sgat,
    transform_input,
    transform_weight,
)
from starquant_plugin.method.transforms import kronecker_factors

D, K, OUT, TOKENS = 64, 6, 48, 256


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


def _states(x: torch.Tensor, state: int) -> torch.Tensor:
    return torch.full(x.shape[:1], state, dtype=torch.long)


def _rtn_loss(x: torch.Tensor, weight: torch.Tensor) -> float:
    weight_args, act_args = scheme_args("W4A4")
    y = x @ weight.T
    y_q = fake_quantize_activation(x, act_args) @ fake_quantize_weight(weight, weight_args).T
    return ((y - y_q).norm() ** 2 / y.norm() ** 2).item()


def test_dropped_directions_unmasked_drops_first_k_masked_last_k():
    drop = dropped_directions(3)
    assert drop.shape == (2, 6)
    assert drop[UNMASKED].tolist() == [1, 1, 1, 0, 0, 0]
    assert drop[MASKED].tolist() == [0, 0, 0, 1, 1, 1]
    assert dropped_directions(0).shape == (2, 0)
    eye = torch.eye(10)
    with pytest.raises(ValueError, match="exclusive_fraction"):
        exclusive_subspaces(eye, eye, 6)


def test_exclusive_subspaces_are_orthonormal_and_exact_on_null_space_data():
    x_masked, x_unmasked, weight = _state_data()
    v = exclusive_subspaces(x_masked, x_unmasked, K)
    assert v.shape == (D, 2 * K) and v.dtype == torch.float32
    torch.testing.assert_close(v.T @ v, torch.eye(2 * K), atol=1e-5, rtol=0)
    assert exactness_residual(x_masked, v, MASKED) < 1e-5
    assert exactness_residual(x_unmasked, v, UNMASKED) < 1e-5
    # Dropping the other state's directions is not exact: the check above can fail.
    assert exactness_residual(x_masked, v, UNMASKED) > 0.1
    assert exactness_residual(x_unmasked, v, MASKED) > 0.1


def test_transform_input_and_weight_reproduce_the_fp_linear_per_state():
    x_masked, x_unmasked, weight = _state_data()
    v = exclusive_subspaces(x_masked, x_unmasked, K)
    gen = torch.Generator().manual_seed(1)
    n1, n2 = kronecker_factors(D)
    left = torch.eye(n1) + 0.3 * torch.randn(n1, n1, generator=gen)  # not orthogonal
    right = torch.eye(n2) + 0.3 * torch.randn(n2, n2, generator=gen)
    scale = 0.5 + torch.rand(D, generator=gen)
    weight_t = transform_weight(weight, scale, left, right)
    assert not torch.allclose(weight_t, weight, atol=1e-2)
    for state, x in ((MASKED, x_masked), (UNMASKED, x_unmasked)):
        x_s = transform_input(x, _states(x, state), v, scale, left, right)
        torch.testing.assert_close(x_s @ weight_t.T, x @ weight.T, atol=1e-4, rtol=1e-5)
        wrong = transform_input(x, _states(x, 1 - state), v, scale, left, right)
        assert (wrong @ weight_t.T - x @ weight.T).abs().max() > 1.0


def test_fit_reports_near_zero_residual_on_null_space_data():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    result = fit_sgat(weight, x_masked, x_unmasked, weight_args, act_args, K, epochs=0)
    assert result.residual_masked < 1e-5 and result.residual_unmasked < 1e-5
    assert result.exclusive.shape == (D, 2 * K)
    assert len(result.loss_history) == 1


def test_fit_reduces_loss_and_beats_rtn_on_state_dependent_outliers():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    result = fit_sgat(
        weight, x_masked, x_unmasked, weight_args, act_args, K, epochs=10, batch_tokens=128
    )
    assert len(result.loss_history) == 11
    assert result.loss_history[-1] < result.loss_history[0]
    weight_q = fake_quantize_weight(
        result.transformed_weight(weight), weight_args, result.weight_clip
    )
    fitted = 0.0
    for state, x in ((MASKED, x_masked), (UNMASKED, x_unmasked)):
        x_s = result.transform_input(x, _states(x, state))
        y_q = fake_quantize_activation(x_s, act_args, result.act_clip[state]) @ weight_q.T
        y = x @ weight.T
        fitted += ((y - y_q).norm() ** 2 / y.norm() ** 2).item()
    # The returned parameters are the best ones, and their loss is the reported one.
    assert fitted == pytest.approx(min(result.loss_history), rel=1e-3)
    rtn = _rtn_loss(x_masked, weight) + _rtn_loss(x_unmasked, weight)
    assert fitted < 0.75 * rtn


def test_no_gating_gives_empty_exclusive_and_one_shared_clip():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A8")
    result = fit_sgat(weight, x_masked, x_unmasked, weight_args, act_args, 0, epochs=2)
    assert result.exclusive.shape == (D, 0)
    assert result.act_clip.shape == (2,)
    assert result.act_clip[0] == result.act_clip[1]
    assert result.residual_masked == 0.0 and result.residual_unmasked == 0.0


def test_dense_factors_work_and_wrong_factors_raise():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    args = (weight, x_masked, x_unmasked, weight_args, act_args, K)
    dense = fit_sgat(*args, factors=(1, D), epochs=2, batch_tokens=128)
    assert dense.left.shape == (1, 1) and dense.right.shape == (D, D)
    assert all(torch.isfinite(torch.tensor(dense.loss_history)))
    assert dense.transformed_weight(weight).shape == (OUT, D)
    with pytest.raises(ValueError, match=r"factors \(4, 8\) for input dim 64"):
        fit_sgat(*args, factors=(4, 8), epochs=0)


def test_same_seed_gives_identical_fit_and_other_seed_differs():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    args = (weight, x_masked, x_unmasked, weight_args, act_args, K)
    first = fit_sgat(*args, epochs=2, batch_tokens=128, seed=3)
    second = fit_sgat(*args, epochs=2, batch_tokens=128, seed=3)
    other = fit_sgat(*args, epochs=2, batch_tokens=128, seed=4)
    for name in ("exclusive", "left", "right", "channel_scale", "act_clip", "weight_clip"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.loss_history == second.loss_history
    assert not torch.equal(first.left, other.left)
    assert not torch.equal(first.right, other.right)


def test_fit_rejects_mismatched_token_dims():
    _, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    with pytest.raises(ValueError, match="x_masked"):
        fit_sgat(weight, torch.randn(8, D + 1), x_unmasked, weight_args, act_args, K)


def test_static_identity_keeps_the_weight_and_rotation_is_orthogonal():
    x_masked, _, weight = _state_data()
    weight_args, _ = scheme_args("W4A4")
    identity = static_sgat(weight, weight_args)
    assert identity.exclusive.shape == (D, 0)
    torch.testing.assert_close(identity.transformed_weight(weight), weight, atol=0, rtol=0)
    torch.testing.assert_close(identity.weight_clip, search_weight_clip(weight, weight_args))
    rotated = static_sgat(
        weight, weight_args, rotate=True, generator=torch.Generator().manual_seed(0)
    )
    n1, n2 = kronecker_factors(D)
    assert rotated.left.shape == (n1, n1) and rotated.right.shape == (n2, n2)
    torch.testing.assert_close(rotated.left @ rotated.left.T, torch.eye(n1), atol=1e-6, rtol=0)
    torch.testing.assert_close(rotated.right @ rotated.right.T, torch.eye(n2), atol=1e-6, rtol=0)
    assert not torch.allclose(rotated.transformed_weight(weight), weight, atol=1e-2)
    x_s = rotated.transform_input(x_masked, _states(x_masked, MASKED))
    torch.testing.assert_close(
        x_s @ rotated.transformed_weight(weight).T, x_masked @ weight.T, atol=1e-4, rtol=1e-5
    )


def test_smoothquant_initial_scale_starts_the_fit_lower_on_channel_outliers():
    """A channel written 64x larger and read 64x smaller (the stress variants' outliers): the
    SmoothQuant-balanced initial scale undoes it before the first step; 1 does not."""
    from starquant_plugin.method.transforms import smoothquant_scales

    x_masked, x_unmasked, weight = _state_data()
    x_masked, x_unmasked, weight = x_masked.clone(), x_unmasked.clone(), weight.clone()
    for x in (x_masked, x_unmasked):
        x[:, 5] *= 64.0
    weight[:, 5] /= 64.0
    weight_args, act_args = scheme_args("W4A4")
    absmax = torch.cat([x_masked, x_unmasked]).abs().amax(0)
    init = 1.0 / smoothquant_scales(absmax, weight, 0.5)
    ones = fit_sgat(weight, x_masked, x_unmasked, weight_args, act_args, k=K, epochs=0)
    balanced = fit_sgat(weight, x_masked, x_unmasked, weight_args, act_args, k=K, epochs=0,
                        init_scale=init)
    assert torch.allclose(balanced.channel_scale, init, rtol=1e-6)
    assert balanced.loss_history[0] < 0.5 * ones.loss_history[0]
    with pytest.raises(ValueError, match="positive"):
        fit_sgat(weight, x_masked, x_unmasked, weight_args, act_args, k=K, epochs=0,
                 init_scale=-init)


def test_random_orthogonal_init_and_cosine_schedule_are_deterministic():
    x_masked, x_unmasked, weight = _state_data()
    weight_args, act_args = scheme_args("W4A4")
    runs = [fit_sgat(weight, x_masked, x_unmasked, weight_args, act_args, k=0, epochs=2,
                     init_rotation="random", lr_schedule="cosine", seed=3) for _ in range(2)]
    assert torch.equal(runs[0].left, runs[1].left)
    assert runs[0].loss_history == runs[1].loss_history
    left = runs[0].left
    assert not torch.allclose(left.abs(), torch.full_like(left, left.shape[0] ** -0.5))
    with pytest.raises(ValueError, match="init_rotation"):
        fit_sgat(weight, x_masked, x_unmasked, weight_args, act_args, k=0, epochs=0,
                 init_rotation="identity")
