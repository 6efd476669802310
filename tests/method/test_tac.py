"""TAC: moment matching, exact recovery, stability on singular covariances, batched apply, and
the shrinkage chosen on held-out tokens."""

import pytest
import torch

from starquant_plugin.method.tac import (
    SHRINKAGE_CANDIDATES,
    TACParams,
    apply_tac,
    choose_tac_shrinkage,
    fit_tac,
    identity_tac,
)

N, D, G = 2000, 32, 16


def _paired_outputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``z_fp`` Gaussian with its own mean/covariance; ``z_quant`` a distorted, shifted, noisy copy
    (float64 so the moment checks test the math, not float32 rounding)."""
    gen = torch.Generator().manual_seed(seed)
    colour = torch.randn(D, D, generator=gen, dtype=torch.float64) / D**0.5
    z_fp = torch.randn(N, D, generator=gen, dtype=torch.float64) @ colour + 1.0
    distortion = (
        torch.eye(D, dtype=torch.float64)
        + 0.3 * torch.randn(D, D, generator=gen, dtype=torch.float64) / D**0.5
    )
    noise = 0.1 * torch.randn(N, D, generator=gen, dtype=torch.float64)
    return z_fp, z_fp @ distortion + noise - 0.5


def _block_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and within-block covariances ``[D / G, G, G]``."""
    blocks = (z - z.mean(0)).reshape(N, D // G, G).transpose(0, 1)
    return z.mean(0), blocks.transpose(1, 2) @ blocks / (N - 1)


@pytest.mark.parametrize("method", ["ot", "whiten"])
def test_moment_maps_match_fp_mean_and_block_covariance(method):
    z_fp, z_quant = _paired_outputs()
    params = fit_tac(
        z_fp, z_quant, G, damping=1e-10, shrinkage=0.0, sv_range=(0.0, 1e6), method=method
    )
    mean_tac, cov_tac = _block_moments(apply_tac(z_quant, params))
    mean_fp, cov_fp = _block_moments(z_fp)
    # Tolerance: 1e-6 relative to the FP covariance norm (the damping alone perturbs ~1e-10).
    torch.testing.assert_close(mean_tac, mean_fp, atol=1e-8, rtol=0)
    assert (cov_tac - cov_fp).norm() < 1e-6 * cov_fp.norm()
    mean_q, cov_q = _block_moments(z_quant)
    assert (cov_q - cov_fp).norm() > 0.1 * cov_fp.norm()  # there was something to correct


def test_ot_map_is_symmetric_positive_definite():
    z_fp, z_quant = _paired_outputs()
    params = fit_tac(z_fp, z_quant, G, damping=1e-4, shrinkage=0.0, sv_range=(0.0, 1e6))
    m = params.matrices
    torch.testing.assert_close(m, m.transpose(1, 2), atol=1e-8, rtol=0)
    assert (torch.linalg.eigvalsh(m) > 0).all()


def test_lstsq_recovers_an_exact_block_affine_relation():
    gen = torch.Generator().manual_seed(1)
    z_quant = torch.randn(N, D, generator=gen, dtype=torch.float64)
    true = TACParams(
        matrices=torch.eye(G, dtype=torch.float64)
        + 0.2 * torch.randn(D // G, G, G, generator=gen, dtype=torch.float64),
        bias=torch.randn(D, generator=gen, dtype=torch.float64),
    )
    z_fp = apply_tac(z_quant, true)
    params = fit_tac(
        z_fp, z_quant, G, damping=0.0, shrinkage=0.0, sv_range=(0.0, 1e6), method="lstsq"
    )
    torch.testing.assert_close(params.matrices, true.matrices, atol=1e-8, rtol=0)
    torch.testing.assert_close(params.bias, true.bias, atol=1e-8, rtol=0)


def test_defaults_shrink_and_bound_singular_values():
    z_fp, z_quant = _paired_outputs()
    params = fit_tac(z_fp.float(), z_quant.float(), G, shrinkage=0.2, sv_range=(0.5, 2.0))
    assert params.matrices.dtype == torch.float32
    singular_values = torch.linalg.svdvals(params.matrices.double())
    # (1 - rho) * [0.5, 2] + rho gives at most 1.8 and at least 0.2 after shrinkage.
    assert singular_values.max() <= 1.8 + 1e-5 and singular_values.min() >= 0.2 - 1e-5


@pytest.mark.parametrize("method", ["ot", "lstsq", "whiten"])
def test_singular_covariances_stay_finite(method):
    gen = torch.Generator().manual_seed(2)
    low_rank = torch.randn(200, 3, generator=gen) @ torch.randn(3, D, generator=gen)
    z_quant = low_rank.clone()
    z_quant[:, :G] = 0.0  # one block with zero variance
    z_fp = low_rank + 0.01 * torch.randn(200, D, generator=gen)
    for kwargs in ({}, {"damping": 0.0}):
        params = fit_tac(z_fp, z_quant, G, method=method, **kwargs)
        assert torch.isfinite(params.matrices).all() and torch.isfinite(params.bias).all()
        assert torch.isfinite(apply_tac(z_quant, params)).all()
    few_tokens = fit_tac(z_fp[:5], z_quant[:5], G, method=method)  # N < g
    assert torch.isfinite(few_tokens.matrices).all()


def test_apply_matches_a_per_block_loop_on_any_leading_shape():
    gen = torch.Generator().manual_seed(3)
    params = TACParams(
        matrices=torch.randn(D // G, G, G, generator=gen), bias=torch.randn(D, generator=gen)
    )
    z = torch.randn(2, 5, D, generator=gen)
    expected = (
        torch.cat(
            [z[..., b * G : (b + 1) * G] @ params.matrices[b].T for b in range(D // G)], dim=-1
        )
        + params.bias
    )
    torch.testing.assert_close(apply_tac(z, params), expected, atol=1e-5, rtol=1e-5)


def test_invalid_inputs_raise_value_errors():
    z = torch.randn(10, D)
    with pytest.raises(ValueError, match="group_size"):
        fit_tac(z, z, group_size=12)
    with pytest.raises(ValueError, match="method"):
        fit_tac(z, z, method="procrustes")
    with pytest.raises(ValueError, match="same shape"):
        fit_tac(z, z[:, :G])
    params = fit_tac(z, z)
    with pytest.raises(ValueError, match="last dim"):
        apply_tac(torch.randn(3, D + G), params)


def test_held_out_choice_keeps_tac_where_it_lowers_the_output_error():
    z_fp, z_quant = _paired_outputs()
    weight = torch.randn(8, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    held_out = torch.arange(N) % 4 == 3
    rho, scores = choose_tac_shrinkage(z_fp, z_quant, weight, held_out, group_size=G)
    assert set(scores) == {"off", *map(str, SHRINKAGE_CANDIDATES)} and scores["off"] == 1.0
    assert rho is not None and scores[str(rho)] == min(scores.values()) < 0.9


def test_held_out_choice_turns_tac_off_where_the_fit_does_not_carry_over():
    """Fit tokens are quantized at twice the scale, held-out ones exactly: any TAC fitted on
    the former moves the latter away from FP, so no TAC scores best."""
    z_fp, _ = _paired_outputs()
    held_out = torch.arange(N) % 4 == 3
    z_quant = torch.where(held_out[:, None], z_fp, 2 * z_fp + 0.1)
    rho, scores = choose_tac_shrinkage(z_fp, z_quant, torch.eye(D, dtype=torch.float64),
                                       held_out, group_size=G)
    assert rho is None and all(score > 1.0 for name, score in scores.items() if name != "off")
    with pytest.raises(ValueError, match="held-out split"):
        choose_tac_shrinkage(z_fp, z_quant, torch.eye(D), torch.zeros(N, dtype=torch.bool))


def test_identity_tac_changes_nothing():
    z = torch.randn(5, D)
    assert torch.equal(apply_tac(z, identity_tac(D, G)), z)
