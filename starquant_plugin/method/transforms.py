"""Fixed activation transforms used to initialise SGAT and as baselines (QuaRot, SmoothQuant).

>>> h = random_hadamard(8, torch.Generator().manual_seed(0))
>>> torch.allclose(h @ h.T, torch.eye(8), atol=1e-6)
True
"""

from __future__ import annotations

import torch


def _sylvester_hadamard(d: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix ``[d, d]`` for ``d`` a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def random_hadamard(d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random orthogonal ``[d, d]`` that spreads outlier channels over all coordinates.

    For ``d`` a power of two: ``diag(s) H / sqrt(d)``, a Sylvester Hadamard with random signs
    ``s`` (QuaRot). Otherwise (e.g. the shared block of SGAT, ``d - 2 d_ex``): a Haar-random
    orthogonal matrix from the QR of a Gaussian matrix, which also spreads outliers and exists
    for every ``d``. float32 result; ``generator`` makes it reproducible.
    """
    if d < 1:
        raise ValueError(f"Got d={d}; a rotation needs d >= 1. Pass the layer's input dim.")
    if d & (d - 1) == 0:
        signs = torch.randint(0, 2, (d,), generator=generator, dtype=torch.float64) * 2 - 1
        return (signs.unsqueeze(1) * _sylvester_hadamard(d) / d**0.5).float()
    gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()


def smoothquant_scales(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant per-channel scales ``s: [d]`` that move activation outliers into the weight.

    ``act_absmax: [d]`` (max |x| per input channel over calibration tokens), ``weight: [out, d]``.
    ``s = act_absmax^alpha / max|W[:, j]|^(1 - alpha)``; use as ``x / s`` and ``W * s``.
    """
    if weight.dim() != 2 or act_absmax.shape != (weight.shape[1],):
        raise ValueError(
            f"Got act_absmax {tuple(act_absmax.shape)} and weight {tuple(weight.shape)}; "
            "expected act_absmax [d] and weight [out, d] with the same d."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Got alpha={alpha}; expected a migration strength in [0, 1].")
    weight_absmax = weight.abs().amax(dim=0).clamp_min(1e-5)
    scales = act_absmax.clamp_min(1e-5).pow(alpha) / weight_absmax.pow(1.0 - alpha)
    return scales.clamp_min(1e-5)
