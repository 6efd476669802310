"""TAC, Temporal Attention Compensation (method.md section 3).

A static block-diagonal affine map on the quantized attention output ``Z_hat: [N, d]`` (the
o_proj input), channel blocks of width ``g``: ``Z_tac[:, b] = Z_hat[:, b] M_b^T + d_b``. Its
parameters come in closed form from the first and second moments of ``Z_hat`` and of the
full-precision ``Z_fp`` per block, so quantization error stops drifting the attention output's
statistics from one denoising step to the next.

>>> z = torch.randn(64, 32)
>>> params = fit_tac(z, z, group_size=16, damping=0.0)  # identical stats -> identity map
>>> torch.allclose(apply_tac(z, params), z, atol=1e-3)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TAC_METHODS = ("ot", "lstsq", "whiten")


@dataclass
class TACParams:
    """``matrices: [d / g, g, g]`` (``M_b``), ``bias: [d]`` (the ``d_b`` concatenated)."""

    matrices: torch.Tensor
    bias: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.matrices.shape[-1]

    def rounded_to(self, dtype: torch.dtype) -> TACParams:
        """The values a checkpoint in ``dtype`` holds (float32 tensors), so calibration
        continues with exactly what inference will apply."""
        return TACParams(self.matrices.to(dtype).float(), self.bias.to(dtype).float())


def _blocks(z: torch.Tensor, group_size: int) -> torch.Tensor:
    """``z: [N, d]`` -> ``[d / g, N, g]`` in float64."""
    n, d = z.shape
    return z.double().reshape(n, d // group_size, group_size).transpose(0, 1)


def _sym_power(a: torch.Tensor, power: float) -> torch.Tensor:
    """``a^power`` for batched symmetric PSD ``a: [..., g, g]`` via eigh (power 0.5 or -0.5).

    Eigenvalues are clipped at 0 for the square root and at a relative floor for the inverse
    square root, so singular blocks stay finite.
    """
    evals, evecs = torch.linalg.eigh(0.5 * (a + a.transpose(-1, -2)))
    if power > 0:
        evals = evals.clamp_min(0.0)
    else:
        floor = 1e-10 * evals.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        evals = evals.clamp_min(floor)
    return (evecs * evals.pow(power).unsqueeze(-2)) @ evecs.transpose(-1, -2)


def _clamp_singular_values(m: torch.Tensor, sv_range: tuple[float, float]) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m)
    return (u * s.clamp(*sv_range).unsqueeze(-2)) @ vh


def _check_tac_inputs(
    z_fp: torch.Tensor,
    z_quant: torch.Tensor,
    group_size: int,
    shrinkage: float,
    sv_range: tuple[float, float],
    method: str,
) -> None:
    if z_fp.shape != z_quant.shape or z_fp.dim() != 2 or z_fp.shape[0] < 2:
        raise ValueError(
            f"Got z_fp {tuple(z_fp.shape)} and z_quant {tuple(z_quant.shape)}; expected two "
            "[tokens, d] matrices of the same shape with at least 2 tokens (flatten batch, seq)."
        )
    if group_size < 1 or z_fp.shape[1] % group_size != 0:
        raise ValueError(
            f"Got group_size={group_size} for d={z_fp.shape[1]}; expected a positive divisor "
            "of d. The paper's default is 16."
        )
    if method not in TAC_METHODS:
        raise ValueError(f"Got method={method!r}; expected one of {TAC_METHODS}.")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"Got shrinkage={shrinkage}; expected rho in [0, 1] (0 = no shrink).")
    if not 0.0 <= sv_range[0] <= sv_range[1]:
        raise ValueError(f"Got sv_range={sv_range}; expected (low, high) with 0 <= low <= high.")


@torch.no_grad()
def fit_tac(
    z_fp: torch.Tensor,
    z_quant: torch.Tensor,
    group_size: int = 16,
    damping: float = 1e-2,
    shrinkage: float = 0.2,
    sv_range: tuple[float, float] = (0.5, 2.0),
    method: str = "ot",
) -> TACParams:
    """Closed-form TAC map from paired attention outputs ``z_fp, z_quant: [N, d]``.

    Per block, with ``S_q = cov(Z_hat) + lambda I`` (``lambda = damping * tr(cov(Z_hat)) / g``)
    and ``S_f = cov(Z_fp)``:

    * ``"ot"``: Gaussian optimal transport ``S_q^-1/2 (S_q^1/2 S_f S_q^1/2)^1/2 S_q^-1/2``
      (the symmetric PSD map that pushes N(mu_q, S_q) onto N(mu_f, S_f));
    * ``"whiten"``: whitening-colouring ``S_f^1/2 S_q^-1/2``;
    * ``"lstsq"``: ridge regression of ``Z_fp`` on ``Z_hat`` with a free intercept.

    Then for every method: clamp the singular values of ``M`` into ``sv_range``, shrink
    ``M <- (1 - rho) M + rho I`` and set ``d = mu_f - M mu_q``. Computed in float64, batched
    over blocks; returned in ``z_quant``'s dtype.
    """
    _check_tac_inputs(z_fp, z_quant, group_size, shrinkage, sv_range, method)
    zf, zq = _blocks(z_fp, group_size), _blocks(z_quant, group_size)
    n = zq.shape[1]
    mu_f, mu_q = zf.mean(dim=1), zq.mean(dim=1)  # [B, g]
    cf, cq = zf - mu_f.unsqueeze(1), zq - mu_q.unsqueeze(1)
    cov_f = cf.transpose(1, 2) @ cf / (n - 1)
    cov_q = cq.transpose(1, 2) @ cq / (n - 1)
    eye = torch.eye(group_size, dtype=torch.float64, device=zq.device)
    lam = damping * torch.diagonal(cov_q, dim1=-2, dim2=-1).sum(-1) / group_size
    s_q = cov_q + lam.reshape(-1, 1, 1) * eye

    if method == "ot":
        s_q_half, s_q_inv_half = _sym_power(s_q, 0.5), _sym_power(s_q, -0.5)
        middle = _sym_power(s_q_half @ cov_f @ s_q_half, 0.5)
        m = s_q_inv_half @ middle @ s_q_inv_half
    elif method == "whiten":
        m = _sym_power(cov_f, 0.5) @ _sym_power(s_q, -0.5)
    else:  # lstsq: M^T = S_q^{-1} cov(Z_hat, Z_fp)
        cross = cq.transpose(1, 2) @ cf / (n - 1)
        m = torch.linalg.lstsq(s_q, cross).solution.transpose(1, 2)

    m = _clamp_singular_values(m, sv_range)
    m = (1.0 - shrinkage) * m + shrinkage * eye
    bias = mu_f - (m @ mu_q.unsqueeze(-1)).squeeze(-1)
    dtype = z_quant.dtype
    return TACParams(matrices=m.to(dtype), bias=bias.reshape(-1).to(dtype))


SHRINKAGE_CANDIDATES = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
"""The shrinkages ``choose_tac_shrinkage`` tries (1.0: only the mean is corrected), besides
no TAC at all."""


def identity_tac(d: int, group_size: int, device: torch.device | str | None = None
                 ) -> TACParams:
    """The map that changes nothing (identity blocks, zero bias): TAC off for one layer."""
    eye = torch.eye(group_size, device=device)
    return TACParams(eye.expand(d // group_size, -1, -1).clone(), torch.zeros(d, device=device))


@torch.no_grad()
def choose_tac_shrinkage(
    z_fp: torch.Tensor,
    z_quant: torch.Tensor,
    out_weight: torch.Tensor,
    held_out: torch.Tensor,
    candidates: tuple[float, ...] = SHRINKAGE_CANDIDATES,
    **fit_kwargs,
) -> tuple[float | None, dict[str, float]]:
    """TAC's shrinkage for one layer, chosen on tokens held out from the fit.

    ``z_fp, z_quant: [N, d]`` paired attention outputs, ``out_weight: [out, d]`` the output
    projection that reads them, ``held_out: [N]`` True for the tokens scored (the rest fit
    each candidate with ``fit_tac(..., shrinkage=rho, **fit_kwargs)``). The score is the
    error TAC leaves where it matters, at the output projection's output:
    ``||(Z_tac - Z_fp) W^T||^2`` over held-out tokens, relative to that of no TAC. Returns the
    best candidate (``None`` if no TAC scores best) and every score, keyed ``str(rho)`` and
    ``"off"``.
    """
    if held_out.all() or not held_out.any():
        raise ValueError("Got a held-out split with no fit or no held-out tokens; hold out "
                         "a proper subset of the calibration rows.")
    w = out_weight.double()
    target = z_fp[held_out].double() @ w.T

    def error(z: torch.Tensor) -> float:
        return (z.double() @ w.T - target).pow(2).sum().item()

    baseline = max(error(z_quant[held_out]), 1e-30)
    scores = {"off": 1.0}
    for rho in candidates:
        params = fit_tac(z_fp[~held_out], z_quant[~held_out], shrinkage=rho, **fit_kwargs)
        scores[str(rho)] = error(apply_tac(z_quant[held_out], params)) / baseline
    best = min(scores, key=scores.get)
    return (None if best == "off" else float(best)), scores


def apply_tac(z: torch.Tensor, params: TACParams) -> torch.Tensor:
    """``z: [..., d]`` -> ``[..., d]``, one batched ``g x g`` matmul per channel block."""
    n_blocks, g, _ = params.matrices.shape
    if z.shape[-1] != n_blocks * g:
        raise ValueError(
            f"Got input with last dim {z.shape[-1]}; the TAC map expects {n_blocks * g} "
            f"({n_blocks} blocks of {g}). Use the TAC fitted for this layer."
        )
    blocks = z.reshape(*z.shape[:-1], n_blocks, g)
    out = torch.einsum("...bj,bij->...bi", blocks, params.matrices.to(z.dtype))
    return out.reshape(z.shape) + params.bias.to(z.dtype)
