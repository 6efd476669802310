"""SGAT, State-Guided Activation Transformation (method.md section 2), in structured form.

Conventions: activations are row vectors ``x: [tokens, d]``, a linear is ``y = x W^T`` with
``W: [out, d]``. A token in state ``s`` enters the integer GEMM as

    x_s = (x - ((x V) * drop[s]) V^T) M,    M = diag(c) (L (x) R),

quantized per token, and the weight gets one static transform ``W_t = W M^{-T}`` with one
quantized copy ``Q_w(W_t)``, so ``x_s W_t^T = x (I - V drop[s] V^T) W^T``. ``V = [U_m | U_u]:
[d, 2k]`` is orthonormal: ``U_u`` holds directions masked tokens do not use, ``U_m`` directions
unmasked tokens do not use; ``drop[MASKED]`` removes a masked token's ``U_u`` part and
``drop[UNMASKED]`` an unmasked token's ``U_m`` part. This is the paper's ``x T G_s`` with
``T = [U_sh | U_m | U_u]`` orthogonal, followed by the static map ``T^T M``: for such a ``T``,
``x T G_s T^T = x (I - V drop[s] V^T)``. It is exact in full precision when each state has no
energy along the directions it drops.

Storage is why it is factorised this way: ``M`` costs ``n1^2 + n2^2 + d`` numbers (Kronecker
factors ``L: [n1, n1]``, ``R: [n2, n2]``, channel scale ``c: [d]``) and ``V`` costs ``2 k d``,
against ``d^2`` for a dense ``T`` (at d = 4096 a dense fp32 ``T`` is 64 MiB, 2x the int4 weight
it serves). ``L``, ``R``, ``c`` and the clips are learned; ``V`` is fixed in closed form from
each state's second moments.

One transform serves every linear that reads the same input (q/k/v; gate/up): pass their
weights concatenated along the output dim, ``[sum out, d]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from compressed_tensors.quantization import QuantizationArgs

from starquant_plugin.method.quantizers import (
    fake_quantize_activation,
    fake_quantize_weight,
    search_weight_clip,
)
from starquant_plugin.method.transforms import (
    kronecker_apply,
    kronecker_factors,
    random_hadamard,
    random_orthogonal,
)

UNMASKED = 0
"""Row of ``drop`` (and value of ``mask_state.long()``) for prompt and decoded tokens."""
MASKED = 1
"""Row of ``drop`` (and value of ``mask_state.long()``) for ``[MASK]`` tokens."""

_INIT_ACT_CLIP = 0.99
_CHUNK_ELEMENTS = 1 << 24
"""Work on [n, d] tokens or [out, d] weights goes ``_CHUNK_ELEMENTS // d`` rows at a time:
each temporary is then at most 64 MiB of float32, whatever the width (the fit's graph and
the quantizers make several; at d = 12288 whole chunks of 8192 tokens took gigabytes)."""


def _row_chunks(x: torch.Tensor, out_width: int = 0) -> tuple[torch.Tensor, ...]:
    """``x: [n, d]`` split into chunks of ``_CHUNK_ELEMENTS // max(d, out_width)`` rows, for
    work whose temporaries are ``[rows, d]`` or ``[rows, out_width]``."""
    return x.split(max(1, _CHUNK_ELEMENTS // max(x.shape[-1], out_width)))


def dropped_directions(k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """0/1 ``drop: [2, 2k]`` over the columns ``[U_m | U_u]`` of ``V``: which part each state
    removes (unmasked tokens drop ``U_m``, masked tokens drop ``U_u``).

    >>> dropped_directions(2)
    tensor([[1., 1., 0., 0.],
            [0., 0., 1., 1.]])
    """
    drop = torch.zeros(2, 2 * k, device=device)
    drop[UNMASKED, :k] = 1.0
    drop[MASKED, k:] = 1.0
    return drop


def _check_width(d: int, k: int) -> None:
    if not 0 <= 2 * k <= d:
        raise ValueError(
            f"Got exclusive width k={k} for input dim d={d}; expected 0 <= 2 * k <= d "
            "(two exclusive subspaces of width k). Lower exclusive_fraction."
        )


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """``X^T X / n: [d, d]`` in float64 of tokens ``x: [n, d]`` (uncentred), accumulated over
    chunks of tokens so that no whole float64 copy of ``x`` is made (at 8B width ``x`` holds
    gigabytes)."""
    moment = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in _row_chunks(x):
        chunk = chunk.double()
        moment.addmm_(chunk.T, chunk)
    return moment.div_(x.shape[0])


def smallest_eigenvectors(symmetric: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` eigenvectors of the float64 ``symmetric: [d, d]`` with the smallest
    eigenvalues: ``[d, k]`` on its device. A CPU input may be overwritten.

    LAPACK's ``syevr`` computes only those ``k``, in place with ``O(d)`` workspace, through
    scipy (torch has no binding for it): 2.4x faster than ``torch.linalg.eigh`` at d = 2048 on
    one core. It runs on the host CPU for a GPU input too: torch's only solver there,
    ``eigh``, computes all ``d`` eigenvectors with ``2 d^2`` of workspace beside them, 4 d^2
    doubles of device memory (4.5 GiB at LLaDA-8B's 12288, 10.7 GiB at Dream-7B's 18944), over
    the 4 GiB a block's fit may use; the host holds one ``d^2`` copy instead, once per linear
    group (not per epoch), and CPU and GPU runs get the same eigenvectors.
    """
    try:  # lazy: only calibration needs it (the `compress` extra)
        from scipy.linalg import eigh
    except ImportError as error:
        raise ImportError("SGAT's calibration needs scipy (LAPACK's subset eigensolver); "
                          "install the compress extra: pip install '.[compress]'"
                          ) from error
    device = symmetric.device
    # The transpose of a symmetric C-ordered matrix is itself in Fortran order: LAPACK works
    # on it in place instead of on a copy.
    _, vectors = eigh(symmetric.cpu().numpy().T, subset_by_index=[0, k - 1], driver="evr",
                      overwrite_a=True, check_finite=False)
    return torch.from_numpy(vectors).to(device)


def exclusive_subspaces(x_masked: torch.Tensor, x_unmasked: torch.Tensor, k: int) -> torch.Tensor:
    """``V = [U_m | U_u]: [d, 2k]`` orthonormal, each block in one state's unused directions,
    from each state's tokens ``x_*: [n, d]``; float32.

    ``U_u`` = the ``k`` eigenvectors of the masked tokens' second moment ``X^T X / n``
    (uncentred, so a direction with a constant offset is not mistaken for unused) with the
    smallest eigenvalues; ``U_m`` = the ``k`` directions orthogonal to ``U_u`` with the least
    unmasked energy: the smallest eigenvectors of ``P C_u P + s U_u U_u^T`` with ``P = I - U_u
    U_u^T`` and ``s`` above ``C_u``'s spectrum. Both in float64, one ``[d, d]`` matrix at a time,
    the projection applied in place by rank-``k`` updates: ``d^2`` doubles at the peak on the
    tokens' device (1.1 GiB at d = 12288) where explicit projectors and full eigensolvers took
    ~10x that (``docs/results.md``, calibration cost).
    ``k = 0`` gives ``[d, 0]``.
    """
    d = x_masked.shape[-1]
    if x_masked.dim() != 2 or x_unmasked.dim() != 2 or x_unmasked.shape[1] != d:
        raise ValueError(
            f"Got tokens {tuple(x_masked.shape)} and {tuple(x_unmasked.shape)}; expected two "
            "[tokens, d] matrices of the same layer input."
        )
    _check_width(d, k)
    if k == 0:
        return torch.zeros(d, 0, device=x_masked.device)
    u_u = smallest_eigenvectors(second_moment(x_masked), k)
    restricted = second_moment(x_unmasked)
    shift = torch.trace(restricted).abs() + 1.0
    cu_uu = restricted @ u_u  # C_u U_u: [d, k]
    eye = torch.eye(k, dtype=torch.float64, device=u_u.device)
    lifted = u_u @ (u_u.T @ cu_uu + shift * eye)
    restricted.addmm_(u_u, cu_uu.T, alpha=-1).addmm_(cu_uu, u_u.T, alpha=-1)
    restricted.addmm_(lifted, u_u.T)
    u_m = smallest_eigenvectors(restricted, k)
    basis, _ = torch.linalg.qr(torch.cat([u_m, u_u], dim=1))
    return basis.float()


def transform_input(
    x: torch.Tensor, state: torch.Tensor, exclusive: torch.Tensor, channel_scale: torch.Tensor,
    left: torch.Tensor, right: torch.Tensor,
) -> torch.Tensor:
    """``x_s = (x - ((x V) * drop[s]) V^T) diag(c) (L (x) R)`` for ``x: [..., d]`` and
    ``state: [...]`` (``mask_state.long()``); ``exclusive`` is ``V: [d, 2k]``.

    Computes in the tensors' dtype (the fit: float32; inference: the model's, so bf16 runs on
    AMX where float32 would run at a tenth of the rate, ``star_transform``)."""
    k = exclusive.shape[1] // 2
    if k:
        drop = dropped_directions(k, x.device).to(exclusive.dtype)[state]
        rows = x.reshape(-1, x.shape[-1])  # addmm: the subtraction inside the GEMM
        x = torch.addmm(rows, (rows @ exclusive) * drop.reshape(-1, 2 * k), exclusive.T,
                        alpha=-1).reshape(x.shape)
    return kronecker_apply(x * channel_scale, left, right)


def transform_weight(
    weight: torch.Tensor, channel_scale: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """``W_t = W M^{-T} = (W / c) (L^{-T} (x) R^{-T})`` for ``weight: [out, d]``, so that
    ``transform_input(x, ...) @ W_t^T`` is ``x W^T`` up to the dropped directions."""
    return kronecker_apply(weight / channel_scale, torch.linalg.inv(left).T,
                           torch.linalg.inv(right).T)


def exactness_residual(x: torch.Tensor, exclusive: torch.Tensor, state: int) -> float:
    """FP error the gating adds for tokens ``x: [tokens, d]`` all in ``state``:
    ``||x V drop[s] V^T||_F / ||x||_F`` (``||x T (I - G_s) T^{-1}||`` of method.md)."""
    k = exclusive.shape[1] // 2
    if k == 0:
        return 0.0
    v, drop = exclusive.double(), dropped_directions(k, x.device).double()[state]
    dropped = total = 0.0
    for chunk in _row_chunks(x):  # no whole float64 copy of x
        chunk = chunk.double()
        dropped += ((chunk @ v) * drop).pow(2).sum().item()
        total += chunk.pow(2).sum().item()
    return dropped**0.5 / max(total**0.5, 1e-30)


@dataclass
class SGATResult:
    """A fitted SGAT transform, frozen.

    ``exclusive: [d, 2k]`` (``V``), ``channel_scale: [d]``, ``left: [n1, n1]``, ``right:
    [n2, n2]``; ``act_clip: [2]`` (per state, both equal without gating); ``weight_clip:
    [out]``; residuals from ``exactness_residual``; ``loss_history[0]`` is the initial loss,
    then one entry per epoch (the returned parameters are those with the lowest loss);
    ``seconds``: wall time of the fit's setup (second moments, subspaces, clip search, first
    loss) and of its epochs in total (empty for a static transform); ``act_global_scale:
    [1]``: NVFP4's static activation global scale, set after the fit from the transformed
    calibration inputs (``nvfp4_global_scale``), None for the other schemes.
    """

    exclusive: torch.Tensor
    channel_scale: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    act_clip: torch.Tensor
    weight_clip: torch.Tensor
    residual_masked: float = 0.0
    residual_unmasked: float = 0.0
    loss_history: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    act_global_scale: torch.Tensor | None = None

    def rounded_to(self, dtype: torch.dtype) -> SGATResult:
        """The transform a checkpoint in ``dtype`` holds (float32 tensors): quantize the weight
        with this one, so ``W M^{-T}`` inverts exactly the ``M`` inference applies."""
        names = ("exclusive", "channel_scale", "left", "right", "act_clip", "act_global_scale")
        return replace(self, **{name: getattr(self, name).to(dtype).float() for name in names
                                if getattr(self, name) is not None})

    def transform_input(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``x_s`` for ``x: [..., d]`` with per-token ``state: [...]`` (before ``Q_a``)."""
        return transform_input(x, state, self.exclusive.to(x), self.channel_scale.to(x),
                               self.left.to(x), self.right.to(x))

    def transformed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_t = W M^{-T}: [out, d]`` for ``weight: [out, d]``, ready for ``Q_w``."""
        return transform_weight(weight, self.channel_scale.to(weight), self.left.to(weight),
                                self.right.to(weight))


def static_sgat(
    weight: torch.Tensor,
    weight_args: QuantizationArgs,
    *,
    channel_scale: torch.Tensor | None = None,
    factors: tuple[int, int] | None = None,
    rotate: bool = False,
    generator: torch.Generator | None = None,
) -> SGATResult:
    """A fixed (not fitted), ungated transform for the baselines: ``M = diag(c) (L (x) R)``
    with identity factors, or random Hadamard ones (``rotate``, QuaRot-style), and the weight
    clip from ``search_weight_clip``. No gating, so residuals are 0."""
    d, device = weight.shape[1], weight.device
    n1, n2 = factors or kronecker_factors(d)
    if rotate:
        left = random_hadamard(n1, generator).to(device)
        right = random_hadamard(n2, generator).to(device)
    else:
        left, right = torch.eye(n1, device=device), torch.eye(n2, device=device)
    ones = torch.ones(d, device=device)
    result = SGATResult(exclusive=torch.zeros(d, 0, device=device),
                        channel_scale=ones if channel_scale is None else channel_scale,
                        left=left, right=right, act_clip=torch.ones(2, device=device),
                        weight_clip=torch.ones(weight.shape[0], device=device))
    result.weight_clip = search_weight_clip(result.transformed_weight(weight.float()),
                                            weight_args)
    return result


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


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
    k: int,
    factors: tuple[int, int] | None = None,
    epochs: int = 15,
    lr: float = 5e-3,
    lr_clip: float = 5e-2,
    batch_tokens: int = 1024,
    seed: int = 0,
    init_scale: torch.Tensor | None = None,
    init_rotation: str = "hadamard",
    lr_schedule: str = "constant",
) -> SGATResult:
    """Fit an SGAT transform and clip ratios for one linear input (method.md section 2).

    ``weight: [out, d]`` (concatenate linears sharing the input), ``x_masked: [n_m, d]``,
    ``x_unmasked: [n_u, d]``, ``k`` the width of each exclusive subspace (0: no gating, one
    shared activation clip: the FlatQuant-like baseline), ``factors`` ``(n1, n2)`` of ``M``
    (default ``kronecker_factors(d)``; ``(1, d)`` is a dense ``M``). ``V`` comes from
    ``exclusive_subspaces``; AdamW then minimises the sum over states of
    ``||X_s W^T - Q_a(x_s) Q_w(W M^{-T})^T||^2 / ||X_s W^T||^2`` over the Kronecker factors
    (initialised as random Hadamard rotations), the channel scale (initialised to 1), a
    sigmoid-parameterised activation clip per state and a weight clip per output row
    (initialised by ``search_weight_clip``). Both quantizers round straight-through.
    Deterministic for a given ``seed``.

    ``init_scale: [d]`` starts ``c`` elsewhere than 1 (e.g. SmoothQuant's ``1 / s``);
    ``init_rotation`` "random" starts ``L``, ``R`` as random orthogonal matrices (FlatQuant)
    instead of random Hadamards; ``lr_schedule`` "cosine" anneals both learning rates to
    1e-3 of their value over the fit (FlatQuant's schedule).
    """
    _check_fit_inputs(weight, x_masked, x_unmasked, batch_tokens)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    w, device = weight.detach().float(), weight.device
    xs = {MASKED: x_masked.detach().float(), UNMASKED: x_unmasked.detach().float()}
    d = w.shape[1]
    _check_width(d, k)
    n1, n2 = factors or kronecker_factors(d)
    if n1 * n2 != d:
        raise ValueError(f"Got factors ({n1}, {n2}) for input dim {d}; expected n1 * n2 = d.")
    exclusive = exclusive_subspaces(xs[MASKED], xs[UNMASKED], k)

    if init_rotation not in ("hadamard", "random"):
        raise ValueError(f"Got init_rotation={init_rotation!r}; expected 'hadamard' or 'random'.")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"Got lr_schedule={lr_schedule!r}; expected 'constant' or 'cosine'.")
    if init_scale is not None and (init_scale.shape != (d,) or not (init_scale > 0).all()):
        raise ValueError(
            f"Got init_scale of shape {tuple(init_scale.shape)}; expected a positive [{d}] "
            "channel scale (e.g. 1 / smoothquant_scales(...))."
        )
    rotation = random_hadamard if init_rotation == "hadamard" else random_orthogonal
    # random draws on the CPU generator, then moved: the same start on every device
    left = torch.nn.Parameter(rotation(n1, generator).to(device))
    right = torch.nn.Parameter(rotation(n2, generator).to(device))
    scale0 = torch.ones(d, device=device) if init_scale is None else init_scale.detach().float()
    log_scale = torch.nn.Parameter(scale0.log())
    act_logit = torch.nn.Parameter(_logit(
        torch.full((2 if k else 1,), _INIT_ACT_CLIP, dtype=torch.float32, device=device)))
    w_clip0 = search_weight_clip(transform_weight(w, scale0, left.detach(),
                                                  right.detach()), weight_args)
    w_logit = torch.nn.Parameter(_logit(w_clip0.clamp(0.05, 0.995)))
    optimizer = torch.optim.AdamW(
        [{"params": [left, right, log_scale], "lr": lr},
         {"params": [act_logit, w_logit], "lr": lr_clip}],
        weight_decay=0.0,
    )

    # The weight side's graph (transform, quantizer) holds several [out, d] temporaries: it is
    # built for one chunk of output rows at a time (4 GiB for the 8B gate/up pair in one piece).
    chunk_rows = max(1, _CHUNK_ELEMENTS // d)
    row_chunks = [slice(r, r + chunk_rows) for r in range(0, w.shape[0], chunk_rows)]

    def quantized_rows(rows: slice) -> torch.Tensor:
        """``Q_w(W M^{-T})`` of output rows ``rows``: [rows, d]."""
        weight_t = transform_weight(w[rows], log_scale.exp(), left, right)
        return fake_quantize_weight(weight_t, weight_args, torch.sigmoid(w_logit[rows]))

    def quantized_input(x: torch.Tensor, state: int) -> torch.Tensor:
        """``Q_a(x_s)`` of tokens ``x: [n, d]`` all in ``state``."""
        states = torch.full(x.shape[:1], state, dtype=torch.long, device=device)
        x_s = transform_input(x, states, exclusive, log_scale.exp(), left, right)
        return fake_quantize_activation(x_s, act_args, torch.sigmoid(act_logit).expand(2)[state])

    def backward(batches: dict[int, torch.Tensor]) -> None:
        """Gradients of ``sum_s ||X_s W^T - Q_a(x_s) Q_w(W_t)^T||^2 / ||X_s W^T||^2``: chunk
        by chunk of output rows against detached ``Q_a(x_s)``, whose accumulated gradient then
        flows through the activation side once."""
        x_q, x_q_leaf, y_fp, ref = {}, {}, {}, {}
        for s, x in batches.items():
            x_q[s] = quantized_input(x, s)
            x_q_leaf[s] = x_q[s].detach().requires_grad_()
            y_fp[s] = x @ w.T
            ref[s] = y_fp[s].pow(2).sum().clamp_min(1e-30)
        for rows in row_chunks:
            weight_q = quantized_rows(rows)
            sum((y_fp[s][:, rows] - x_q_leaf[s] @ weight_q.T).pow(2).sum() / ref[s]
                for s in batches).backward()
        torch.autograd.backward([x_q[s] for s in batches], [x_q_leaf[s].grad for s in batches])

    @torch.no_grad()
    def full_loss() -> float:
        err = {s: torch.zeros((), device=device) for s in xs}
        ref = {s: torch.zeros((), device=device) for s in xs}
        for rows in row_chunks:
            weight_q = quantized_rows(rows)
            for s, x in xs.items():
                for chunk in _row_chunks(x, out_width=len(weight_q)):
                    y_fp = chunk @ w[rows].T
                    err[s] += (y_fp - quantized_input(chunk, s) @ weight_q.T).pow(2).sum()
                    ref[s] += y_fp.pow(2).sum()
        return sum((err[s] / ref[s].clamp_min(1e-30)).item() for s in xs)

    params = (left, right, log_scale, act_logit, w_logit)

    def snapshot() -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in params)

    history = [full_loss()]
    best = (history[0], snapshot())
    setup_end = time.perf_counter()
    steps = math.ceil(max(x.shape[0] for x in xs.values()) / batch_tokens)
    scheduler = None
    if lr_schedule == "cosine" and epochs:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=epochs * steps, eta_min=lr * 1e-3)
    for _ in range(epochs):
        perms = {s: torch.randperm(x.shape[0], generator=generator, device="cpu").to(device)
                 for s, x in xs.items()}
        for step in range(steps):
            batches = {}
            for s, x in xs.items():
                per_step = math.ceil(x.shape[0] / steps)
                idx = perms[s][step * per_step : (step + 1) * per_step]
                if idx.numel():
                    batches[s] = x[idx]
            optimizer.zero_grad(set_to_none=True)
            backward(batches)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        history.append(full_loss())
        if history[-1] < best[0]:
            best = (history[-1], snapshot())

    left_best, right_best, log_scale_best, act_logit_best, w_logit_best = best[1]
    return SGATResult(
        exclusive=exclusive,
        channel_scale=log_scale_best.exp(),
        left=left_best,
        right=right_best,
        act_clip=torch.sigmoid(act_logit_best).expand(2).clone(),
        weight_clip=torch.sigmoid(w_logit_best),
        residual_masked=exactness_residual(xs[MASKED], exclusive, MASKED),
        residual_unmasked=exactness_residual(xs[UNMASKED], exclusive, UNMASKED),
        loss_history=history,
        seconds={"setup": setup_end - start, "epochs": time.perf_counter() - setup_end},
    )
