"""Activation transforms: Kronecker-factored maps, and the fixed ones that initialise SGAT and
serve as baselines (QuaRot, SmoothQuant).

>>> h = random_hadamard(8, torch.Generator().manual_seed(0))
>>> torch.allclose(h @ h.T, torch.eye(8), atol=1e-6)
True
"""

from __future__ import annotations

import torch


def _sylvester_hadamard(d: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix ``[d, d]`` for ``d`` a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64, device="cpu")
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def hadamard(d: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard ``H / sqrt(d): [d, d]`` (float32), symmetric and
    orthogonal, for ``d`` a power of two. No random signs, so a runtime that applies it (the
    per-head K rotation) needs no stored tensor: QuaRot's ``hadamard_transform`` of Q and K.
    Built on the CPU, like the random rotations below, so every device gets the same numbers;
    callers move it where they compute.

    >>> h = hadamard(4)
    >>> torch.equal(h, h.T), torch.allclose(h @ h, torch.eye(4))
    (True, True)
    """
    if d < 1 or d & (d - 1):
        raise ValueError(
            f"Got d={d}; a Sylvester Hadamard exists for powers of two only. K/V rotation "
            "needs a power-of-two head_dim (64 and 128 are); set kv_rotation=False otherwise."
        )
    return (_sylvester_hadamard(d) / d**0.5).float()


def rotate_value_heads(
    v_weight: torch.Tensor, v_bias: torch.Tensor | None, o_weight: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fold a per-head Hadamard ``H`` into the value projection and the output projection
    (QuaRot's V rotation): every value head becomes ``v H``, so 4-bit per-head quantization of
    V sees outlier channels spread over the head, and the output projection reads
    ``z H`` with ``W_o``'s columns rotated back. Exact in exact arithmetic.

    ``v_weight: [kv_heads * head_dim, d]``, ``v_bias: [kv_heads * head_dim]`` or None,
    ``o_weight: [d_out, heads * head_dim]`` with ``heads`` a multiple of ``kv_heads`` (query
    head ``h`` reads KV head ``h // (heads / kv_heads)``, so every column block is rotated by
    the same ``H``). Computed in float64, returned in the inputs' dtypes.
    """
    h = hadamard(head_dim).double().to(v_weight.device)
    rows, d = v_weight.shape
    if rows % head_dim or o_weight.shape[1] % rows:
        raise ValueError(
            f"Got v_proj {tuple(v_weight.shape)} and o_proj {tuple(o_weight.shape)} for "
            f"head_dim {head_dim}; expected v_proj rows = kv_heads x head_dim and o_proj "
            "columns = heads x head_dim with heads a multiple of kv_heads."
        )
    v = (h.T @ v_weight.double().reshape(-1, head_dim, d)).reshape(rows, d)
    bias = None if v_bias is None else (v_bias.double().reshape(-1, head_dim) @ h).reshape(-1)
    o = (o_weight.double().reshape(o_weight.shape[0], -1, head_dim) @ h).reshape(o_weight.shape)
    return (v.to(v_weight.dtype), None if bias is None else bias.to(v_bias.dtype),
            o.to(o_weight.dtype))


def key_smoothing_scales(key_absmax: torch.Tensor, head_dim: int, alpha: float) -> torch.Tensor:
    """Per K channel ``s: [kv_heads * head_dim]`` that flatten K's outlier channels before its
    4-bit per-token quantizer (SmoothAttention, QServe): ``s = (absmax / median absmax)^alpha``,
    equal on the two channels of each RoPE pair (``rotate_half``: ``j`` and ``j + head_dim / 2``)
    so that it commutes with RoPE. Use as ``K / s`` and ``Q * s`` (``smooth_keys``).

    >>> key_smoothing_scales(torch.tensor([1.0, 1.0, 16.0, 1.0]), head_dim=4, alpha=0.5)
    tensor([4., 1., 4., 1.])
    """
    if key_absmax.dim() != 1 or key_absmax.numel() % head_dim or head_dim % 2:
        raise ValueError(
            f"Got key_absmax {tuple(key_absmax.shape)} for head_dim {head_dim}; expected one "
            "value per K channel, kv_heads x head_dim with an even head_dim."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Got alpha={alpha}; expected a migration strength in [0, 1].")
    heads = key_absmax.reshape(-1, 2, head_dim // 2)
    pair = heads.amax(dim=1, keepdim=True).expand_as(heads).reshape(-1)
    return (pair / pair.median()).clamp_min(1e-6).pow(alpha)


def smooth_keys(
    q_weight: torch.Tensor, q_bias: torch.Tensor | None, k_weight: torch.Tensor,
    k_bias: torch.Tensor | None, scales: torch.Tensor, head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Fold ``key_smoothing_scales`` into the projections: K rows (and bias) divided by ``s``,
    the same rows of every query head that reads the KV head multiplied by it (query head
    ``h`` reads KV head ``h // groups``), so ``Q K^T`` is unchanged in exact arithmetic and
    only K, which is quantized, loses its outlier channels. ``q_weight: [heads * hd, d]``,
    ``k_weight: [kv_heads * hd, d]``, ``scales: [kv_heads * hd]``. Computed in float64,
    returned in the inputs' dtypes."""
    kv_rows, q_rows = k_weight.shape[0], q_weight.shape[0]
    if scales.shape != (kv_rows,) or q_rows % kv_rows or kv_rows % head_dim:
        raise ValueError(
            f"Got q_proj {tuple(q_weight.shape)}, k_proj {tuple(k_weight.shape)} and scales "
            f"{tuple(scales.shape)} for head_dim {head_dim}; expected one scale per K row and "
            "query heads a multiple of KV heads."
        )
    s = scales.double().to(k_weight.device)
    s_q = s.reshape(-1, 1, head_dim).expand(-1, q_rows // kv_rows, -1).reshape(-1)

    def scaled(t: torch.Tensor | None, by: torch.Tensor) -> torch.Tensor | None:
        if t is None:
            return None
        shape = (-1,) + (1,) * (t.dim() - 1)
        return (t.double() * by.reshape(shape)).to(t.dtype)

    return (scaled(q_weight, s_q), scaled(q_bias, s_q), scaled(k_weight, 1 / s),
            scaled(k_bias, 1 / s))


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
        signs = torch.randint(0, 2, (d,), generator=generator, dtype=torch.float64,
                              device="cpu") * 2 - 1
        return (signs.unsqueeze(1) * _sylvester_hadamard(d) / d**0.5).float()
    return random_orthogonal(d, generator)


def random_orthogonal(d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Haar-random orthogonal ``[d, d]`` (float32): the Q of a Gaussian matrix's QR with the
    signs fixed by R's diagonal, FlatQuant's and QuaRot's ``random_orthogonal_matrix``."""
    if d < 1:
        raise ValueError(f"Got d={d}; a rotation needs d >= 1. Pass the layer's input dim.")
    gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64, device="cpu")
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


def kronecker_factors(d: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1 * n2 = d`` and ``n1 <= n2`` as close to ``sqrt(d)`` as ``d`` allows.

    A ``[d, d]`` map stored as ``L (x) R`` then costs ``n1^2 + n2^2`` numbers instead of ``d^2``
    (4096 -> 64 x 64; 11008 -> 86 x 128; a prime ``d`` -> ``(1, d)``, i.e. dense).

    >>> kronecker_factors(4096), kronecker_factors(768), kronecker_factors(7)
    ((64, 64), (24, 32), (1, 7))
    """
    if d < 1:
        raise ValueError(f"Got d={d}; a transform needs an input dim d >= 1.")
    n1 = int(d**0.5)
    while d % n1:
        n1 -= 1
    return n1, d // n1


def kronecker_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ (left (x) right)`` for ``x: [..., n1 * n2]``, ``left: [n1, n1]``, ``right: [n2, n2]``.

    Row-major ``vec``: each row reshaped to ``X: [n1, n2]`` becomes ``left^T X right``, which costs
    ``n1 + n2`` multiply-adds per element instead of ``n1 * n2``.

    >>> g = torch.Generator().manual_seed(0)
    >>> x, a, b = (torch.randn(n, m, generator=g) for n, m in ((3, 6), (2, 2), (3, 3)))
    >>> torch.allclose(kronecker_apply(x, a, b), x @ torch.kron(a, b), atol=1e-5)
    True
    """
    n1, n2 = left.shape[0], right.shape[0]
    if x.shape[-1] != n1 * n2:
        raise ValueError(
            f"Got x with last dim {x.shape[-1]} for factors {tuple(left.shape)} and "
            f"{tuple(right.shape)}; expected last dim {n1 * n2} = n1 * n2."
        )
    blocks = x.reshape(*x.shape[:-1], n1, n2)
    # one [.. n1, n2] x [n2, n2] GEMM, then the left factor as one 2-D operand (fastest in bf16)
    return (left.T.contiguous() @ (blocks @ right)).reshape(x.shape)
