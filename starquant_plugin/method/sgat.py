"""SGAT, State-Guided Activation Transformation (method.md section 2).

Conventions: activations are row vectors ``x: [tokens, d]``, a linear is ``y = x W^T`` with
``W: [out, d]``. A transform ``T: [d, d]`` has column blocks ``[U_sh | U_m | U_u]`` of widths
``d_sh, d_ex, d_ex``. A token in state ``s`` is transformed as ``x T * gates[s]`` and quantized
per token; the weight gets one static transform ``W_t = W T^{-T}`` (shape ``[out, d]``), so that
``(x T) W_t^T = x W^T``, and one quantized copy ``Q_w(W_t)``. Row ``UNMASKED`` of ``gates`` keeps
the shared and ``U_u`` columns, row ``MASKED`` the shared and ``U_m`` columns, so
``gates[mask_state.long()]`` picks each token's row. The gated output is exact in full precision
when masked tokens have no energy along ``U_u`` and unmasked tokens none along ``U_m``.

One transform serves every linear that reads the same input (q/k/v; gate/up): pass their
weights concatenated along the output dim, ``[sum out, d]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from compressed_tensors.quantization import QuantizationArgs

from starquant_plugin.method.quantizers import (
    fake_quantize_activation,
    fake_quantize_weight,
    search_weight_clip,
)
from starquant_plugin.method.transforms import random_hadamard

UNMASKED = 0
"""Row of ``gates`` (and value of ``mask_state.long()``) for prompt and decoded tokens."""
MASKED = 1
"""Row of ``gates`` (and value of ``mask_state.long()``) for ``[MASK]`` tokens."""

_INIT_ACT_CLIP = 0.99
_EVAL_CHUNK_TOKENS = 8192


def state_gates(d: int, d_ex: int) -> torch.Tensor:
    """0/1 gates ``[2, d]`` for column blocks ``[sh | m | u]`` of widths ``d - 2 d_ex, d_ex, d_ex``.

    >>> state_gates(6, 1)
    tensor([[1., 1., 1., 1., 0., 1.],
            [1., 1., 1., 1., 1., 0.]])
    """
    _check_d_ex(d, d_ex)
    gates = torch.ones(2, d)
    d_sh = d - 2 * d_ex
    gates[UNMASKED, d_sh : d_sh + d_ex] = 0.0
    gates[MASKED, d_sh + d_ex :] = 0.0
    return gates


def _check_d_ex(d: int, d_ex: int) -> None:
    if not 0 <= 2 * d_ex <= d:
        raise ValueError(
            f"Got d_ex={d_ex} for input dim d={d}; expected 0 <= 2 * d_ex <= d "
            "(two exclusive blocks of width d_ex). The default is d // 32."
        )


def _rotate_block(block: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Rotate an orthonormal basis ``[d, k]`` within its span (same span, spread coordinates)."""
    if block.shape[1] == 0:
        return block
    return block @ random_hadamard(block.shape[1], generator).double()


def exclusive_basis(
    cov_masked: torch.Tensor,
    cov_unmasked: torch.Tensor,
    d_ex: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Orthogonal ``T0: [d, d]`` whose exclusive blocks lie in each state's low-energy directions.

    ``cov_*: [d, d]`` second moments ``X^T X / n`` of each state's tokens (uncentred, so a
    direction with a constant offset is not mistaken for unused). ``U_u`` = the ``d_ex``
    eigenvectors of ``cov_masked`` with the smallest eigenvalues (masked tokens do not use them);
    ``U_m`` = the ``d_ex`` directions orthogonal to ``U_u`` with the least unmasked energy;
    ``U_sh`` = the orthonormal complement. Each block is then rotated within its own span by a
    random orthogonal matrix (spreads outliers like QuaRot without changing what is gated).
    ``d_ex = 0`` gives a plain random rotation. Returns float32 columns ``[U_sh | U_m | U_u]``.
    """
    d = cov_masked.shape[0]
    if cov_masked.shape != (d, d) or cov_unmasked.shape != (d, d):
        raise ValueError(
            f"Got covariances {tuple(cov_masked.shape)} and {tuple(cov_unmasked.shape)}; "
            "expected two square [d, d] matrices of the same layer input."
        )
    _check_d_ex(d, d_ex)
    if d_ex == 0:
        return random_hadamard(d, generator)
    cov_m = 0.5 * (cov_masked + cov_masked.T).double()
    cov_u = 0.5 * (cov_unmasked + cov_unmasked.T).double()
    u_u = torch.linalg.eigh(cov_m).eigenvectors[:, :d_ex]
    # Least unmasked energy among directions orthogonal to U_u: lift U_u above the spectrum.
    eye = torch.eye(d, dtype=torch.float64)
    outside_u = eye - u_u @ u_u.T
    shift = torch.trace(cov_u).abs() + 1.0
    restricted = outside_u @ cov_u @ outside_u + shift * (u_u @ u_u.T)
    u_m = torch.linalg.eigh(restricted).eigenvectors[:, :d_ex]
    q, _ = torch.linalg.qr(torch.cat([u_u, u_m], dim=1), mode="complete")
    blocks = [q[:, 2 * d_ex :], q[:, d_ex : 2 * d_ex], q[:, :d_ex]]  # sh, m, u
    return torch.cat([_rotate_block(b, generator) for b in blocks], dim=1).float()


def exactness_residual(
    x: torch.Tensor, transform: torch.Tensor, transform_inv: torch.Tensor, gate_row: torch.Tensor
) -> float:
    """FP error the gating adds, ``||x T (I - G) T^{-1}||_F / ||x||_F`` for ``x: [tokens, d]``."""
    x64 = x.double()
    dropped = (x64 @ transform.double()) * (1.0 - gate_row.double())
    return (dropped @ transform_inv.double()).norm().item() / max(x64.norm().item(), 1e-30)


@dataclass
class SGATResult:
    """A fitted SGAT transform, frozen.

    ``transform, transform_inv: [d, d]``; ``gates: [2, d]``; ``act_clip: [2]`` (per state,
    both equal without gating); ``weight_clip: [out]``; residuals from ``exactness_residual``;
    ``loss_history[0]`` is the initial loss, then one entry per epoch (the returned parameters
    are those with the lowest loss).
    """

    transform: torch.Tensor
    transform_inv: torch.Tensor
    gates: torch.Tensor
    act_clip: torch.Tensor
    weight_clip: torch.Tensor
    residual_masked: float
    residual_unmasked: float
    loss_history: list[float] = field(default_factory=list)

    def transformed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_t = W T^{-T}: [out, d]`` for ``weight: [out, d]``, ready for ``Q_w``."""
        return weight @ self.transform_inv.to(weight.dtype).T


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def _state_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    transform: torch.Tensor,
    gate_row: torch.Tensor,
    act_clip: torch.Tensor,
    weight_q: torch.Tensor,
    act_args: QuantizationArgs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared error, squared FP norm) of one state's tokens ``x: [n, d]``."""
    y_fp = x @ weight.T
    x_q = fake_quantize_activation((x @ transform) * gate_row, act_args, act_clip)
    return (y_fp - x_q @ weight_q.T).pow(2).sum(), y_fp.pow(2).sum()


def _check_fit_inputs(
    weight: torch.Tensor, x_masked: torch.Tensor, x_unmasked: torch.Tensor, batch_tokens: int
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"Expected weight [out, d], got shape {tuple(weight.shape)}.")
    d = weight.shape[1]
    for name, x in (("x_masked", x_masked), ("x_unmasked", x_unmasked)):
        if x.dim() != 2 or x.shape[1] != d or x.shape[0] == 0:
            raise ValueError(
                f"Got {name} of shape {tuple(x.shape)}; expected a non-empty [tokens, {d}] "
                "matrix matching the weight's input dim. Flatten batch and seq, and calibrate "
                "on canvases that contain both masked and unmasked tokens."
            )
    if batch_tokens < 1:
        raise ValueError(f"Got batch_tokens={batch_tokens}; expected a positive token count.")


def fit_sgat(
    weight: torch.Tensor,
    x_masked: torch.Tensor,
    x_unmasked: torch.Tensor,
    weight_args: QuantizationArgs,
    act_args: QuantizationArgs,
    d_ex: int,
    epochs: int = 15,
    lr: float = 5e-3,
    lr_clip: float = 5e-2,
    batch_tokens: int = 1024,
    seed: int = 0,
    gate: bool = True,
) -> SGATResult:
    """Fit a dense SGAT transform and clip ratios for one linear input (method.md section 2).

    ``weight: [out, d]`` (concatenate linears sharing the input), ``x_masked: [n_m, d]``,
    ``x_unmasked: [n_u, d]``. Minimises, with AdamW, the sum over states of
    ``||X_s W^T - Q_a((X_s T) * g_s) Q_w(W T^{-T})^T||^2 / ||X_s W^T||^2`` over ``T``
    (initialised by ``exclusive_basis``), a sigmoid-parameterised activation clip per state
    (one shared clip when ``gate=False``) and a weight clip per output row (initialised by
    ``search_weight_clip``). Both quantizers round straight-through. ``gate=False`` keeps all
    gates at 1: a learned transform without state gating (FlatQuant/FreeAct-like baseline).
    Deterministic for a given ``seed``.
    """
    _check_fit_inputs(weight, x_masked, x_unmasked, batch_tokens)
    generator = torch.Generator().manual_seed(seed)
    w = weight.detach().float()
    xs = {MASKED: x_masked.detach().float(), UNMASKED: x_unmasked.detach().float()}
    d = w.shape[1]
    d_gated = d_ex if gate else 0
    covs = {s: x.T.double() @ x.double() / x.shape[0] for s, x in xs.items()}
    t0 = exclusive_basis(covs[MASKED], covs[UNMASKED], d_gated, generator)
    gates = state_gates(d, d_gated)

    transform = torch.nn.Parameter(t0.clone())
    act_logit = torch.nn.Parameter(
        _logit(torch.full((2 if gate else 1,), _INIT_ACT_CLIP, dtype=torch.float32))
    )
    w_clip0 = search_weight_clip(w @ t0, weight_args).clamp(0.05, 0.995)
    w_logit = torch.nn.Parameter(_logit(w_clip0))
    optimizer = torch.optim.AdamW(
        [{"params": [transform], "lr": lr}, {"params": [act_logit, w_logit], "lr": lr_clip}],
        weight_decay=0.0,
    )

    def state_losses(batches: dict[int, torch.Tensor]) -> torch.Tensor:
        weight_t = torch.linalg.solve(transform, w.T).T  # W T^{-T}
        weight_q = fake_quantize_weight(weight_t, weight_args, torch.sigmoid(w_logit))
        act_clip = torch.sigmoid(act_logit).expand(2)
        total = torch.zeros(())
        for s, x in batches.items():
            err, ref = _state_error(x, w, transform, gates[s], act_clip[s], weight_q, act_args)
            total = total + err / ref.clamp_min(1e-30)
        return total

    @torch.no_grad()
    def full_loss() -> float:
        weight_t = torch.linalg.solve(transform, w.T).T
        weight_q = fake_quantize_weight(weight_t, weight_args, torch.sigmoid(w_logit))
        act_clip = torch.sigmoid(act_logit).expand(2)
        total = 0.0
        for s, x in xs.items():
            err, ref = torch.zeros(()), torch.zeros(())
            for chunk in x.split(_EVAL_CHUNK_TOKENS):
                e, r = _state_error(chunk, w, transform, gates[s], act_clip[s], weight_q, act_args)
                err, ref = err + e, ref + r
            total += (err / ref.clamp_min(1e-30)).item()
        return total

    def snapshot() -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in (transform, act_logit, w_logit))

    history = [full_loss()]
    best = (history[0], snapshot())
    steps = math.ceil(max(x.shape[0] for x in xs.values()) / batch_tokens)
    for _ in range(epochs):
        perms = {s: torch.randperm(x.shape[0], generator=generator) for s, x in xs.items()}
        for step in range(steps):
            batches = {}
            for s, x in xs.items():
                per_step = math.ceil(x.shape[0] / steps)
                idx = perms[s][step * per_step : (step + 1) * per_step]
                if idx.numel():
                    batches[s] = x[idx]
            optimizer.zero_grad(set_to_none=True)
            state_losses(batches).backward()
            optimizer.step()
        history.append(full_loss())
        if history[-1] < best[0]:
            best = (history[-1], snapshot())

    t_best, act_logit_best, w_logit_best = best[1]
    t_inv = torch.linalg.inv(t_best.double()).float()
    return SGATResult(
        transform=t_best,
        transform_inv=t_inv,
        gates=gates,
        act_clip=torch.sigmoid(act_logit_best).expand(2).clone(),
        weight_clip=torch.sigmoid(w_logit_best),
        residual_masked=exactness_residual(xs[MASKED], t_best, t_inv, gates[MASKED]),
        residual_unmasked=exactness_residual(xs[UNMASKED], t_best, t_inv, gates[UNMASKED]),
        loss_history=history,
    )
