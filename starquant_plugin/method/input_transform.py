"""A linear group's input side: the canvas' token states and the transform + activation
quantizer that every linear of the group (q/k/v; gate/up) reads the same input through.

The embedding sees ``input_ids`` once per forward; a pre-hook turns them into
``mask_state: [batch, seq]`` on one ``MaskState`` object that every ``StarQuantLinear`` holds by
reference, so no layer signature changes and a position that flips from ``[MASK]`` to a real
token between denoising steps is simply re-gated on the next forward.

A group's linears are called one after the other on the same input tensor, so the transform
keeps what it made of the last input (the fake-quantized activations for the reference path,
the int8 codes and per-token scales for the integer path) and hands it to the next linear of
the group instead of recomputing TAC, the SGAT map and the quantizer. It is dropped as soon as
that input tensor is freed, and recomputed whenever the input, the mask state or a buffer has
been changed in place since (version counters; inference tensors have none, so for them the
tensor's identity is the key).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs
from torch import nn
from torch.utils.hooks import RemovableHandle

from starquant_plugin.method.quantizers import (
    fake_quantize_activation,
    is_nvfp4,
    quantize_activation,
)
from starquant_plugin.method.sgat import SGATResult, transform_input
from starquant_plugin.method.tac import TACParams, apply_tac

_CHUNK_TOKENS = 128
"""Tokens transformed and quantized per step (``_in_token_chunks``)."""

GEMM_CHUNK_TOKENS = 256
"""Tokens per integer GEMM call on a weight laid out once (oneDNN prepacked; vLLM's route):
the float32 output stays small enough to be reused from call to call and kept in cache.
8B-width block, oneDNN int8 prepacked, AMX CPU: W4A4, 2 threads, 4096 tokens 1042 ms in
256-token chunks against 1274 at once (bf16 972), 1024 tokens 266 against 299 (bf16 234);
vLLM's gate_up + down pair, one thread, 4096 tokens 1089-1110 ms against 1582-1641
(``docs/results.md``). Both runtimes use it."""


class MaskState:
    """The canvas' current token states: ``mask_state: BoolTensor [batch, seq]``, True = [MASK]."""

    def __init__(self) -> None:
        self.mask_state: torch.Tensor | None = None
        self._handle: RemovableHandle | None = None

    def detach(self) -> None:
        """Remove the embedding hook (the last state stays readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def attach_mask_state(embedding: nn.Module, mask_token_id: int) -> MaskState:
    """Hook ``embedding`` so each forward records ``input_ids == mask_token_id``.

    The model must be called with ``input_ids`` (not ``inputs_embeds``) for the state to update.
    """
    state = MaskState()

    def record_mask_state(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = args[0] if args else kwargs.get("input")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(
                f"The embedding was called with {type(input_ids).__name__}, expected an "
                "input_ids tensor; call the model with input_ids so STaR-Quant sees [MASK]s."
            )
        state.mask_state = input_ids == mask_token_id

    state._handle = embedding.register_forward_pre_hook(record_mask_state, with_kwargs=True)
    return state


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


class _LastInput:
    """What the group's transform made of its last input, keyed by that input and mask-state
    tensor (held weakly: the results go when the input is freed) and the version counters of
    everything the transform read."""

    def __init__(self) -> None:
        self.clear()

    def clear(self, *_: Any) -> None:
        self.refs: tuple[weakref.ref, ...] = ()
        self.versions: tuple[int | None, ...] = ()
        self.results: dict[str, Any] = {}

    def get(self, kind: str, x: torch.Tensor, mask_state: torch.Tensor,
            versions: tuple[int | None, ...], compute: Callable[[], Any]) -> Any:
        """The cached ``kind`` result for this ``x`` and ``mask_state``, else ``compute()``."""
        same = (len(self.refs) == 2 and self.refs[0]() is x and self.refs[1]() is mask_state
                and self.versions == versions)
        if not same:
            self.clear()
            self.refs = (weakref.ref(x, self.clear), weakref.ref(mask_state))
            self.versions = versions
        if kind not in self.results:
            self.results[kind] = compute()
        return self.results[kind]

    # a model copy starts with an empty cache (weak references cannot be copied or pickled)
    def __deepcopy__(self, memo: dict) -> _LastInput:
        return _LastInput()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


class StarQuantInputTransform(nn.Module):
    """What a linear group's input goes through before the integer GEMM: TAC (o_proj input
    only), the state-gated SGAT transform and the per-token activation quantizer.

    ``forward(x: [batch, seq, d]) -> Q_a(x_s): [batch, seq, d]`` float32 (the reference path)
    and ``activation_codes(x)`` -> int8 codes and per-token scales (the integer path), with
    each token's state read from the shared ``MaskState``. One instance serves every linear of
    a group (q/k/v; gate/up); only the group's first linear registers it, so it is stored once,
    and it computes once per input for the whole group (module docstring).
    Buffers, in the checkpoint under these names (see ``SGATResult`` for the math):

    * ``sgat_exclusive: [d, 2k]`` (``V``; None when ``k = 0``), ``sgat_channel_scale: [d]``,
      ``sgat_left: [n1, n1]``, ``sgat_right: [n2, n2]``, ``sgat_act_clip: [2]`` (per state);
    * ``tac_matrices: [d / g, g, g]``, ``tac_bias: [d]``, or None;
    * ``sgat_act_global_scale: [1]``: NVFP4's static activation global scale (else None).
    """

    def __init__(self, sgat: SGATResult, act_args: QuantizationArgs, mask_state: MaskState,
                 tac: TACParams | None = None, dtype: torch.dtype = torch.float32) -> None:
        """``dtype``: how the tensors are stored (the model's dtype, as compressed-tensors
        stores scales), which is also the dtype the transform computes in
        (``star_transform``)."""
        super().__init__()
        if is_nvfp4(act_args) != (sgat.act_global_scale is not None):
            raise ValueError(
                "NVFP4 activations need a static global scale and other schemes have none; "
                "set SGATResult.act_global_scale for NVFP4 (pipeline._activation_global_scale)"
                " and only for it.")
        self._init_state(act_args, mask_state)
        exclusive = sgat.exclusive if sgat.exclusive.shape[1] else None
        tensors = {"sgat_exclusive": exclusive, "sgat_channel_scale": sgat.channel_scale,
                   "sgat_left": sgat.left, "sgat_right": sgat.right,
                   "sgat_act_clip": sgat.act_clip.reshape(-1).expand(2),
                   "tac_matrices": None if tac is None else tac.matrices,
                   "tac_bias": None if tac is None else tac.bias,
                   "sgat_act_global_scale": sgat.act_global_scale}
        for name, tensor in tensors.items():
            self.register_buffer(name, None if tensor is None
                                 else tensor.detach().to(dtype).contiguous().clone())

    @classmethod
    def empty(
        cls, d: int, k: int, factors: tuple[int, int], act_args: QuantizationArgs,
        mask_state: MaskState, tac_group_size: int | None = None,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "meta",
    ) -> StarQuantInputTransform:
        """A module with every buffer allocated (on ``device``, uninitialised) in the
        checkpoint's layout, for a loader to fill by name."""
        n1, n2 = factors
        if n1 * n2 != d or not 0 <= 2 * k <= d:
            raise ValueError(
                f"Got factors {factors} and exclusive width {k} for input dim {d}; this "
                "entry of the checkpoint's starquant.input_groups is inconsistent."
            )
        if tac_group_size is not None and d % tac_group_size:
            raise ValueError(
                f"TAC group size {tac_group_size} does not divide the input dim {d}; this "
                "entry of the checkpoint's starquant.input_groups is inconsistent."
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_state(act_args, mask_state)
        shapes = {"sgat_exclusive": (d, 2 * k) if k else None, "sgat_channel_scale": (d,),
                  "sgat_left": (n1, n1), "sgat_right": (n2, n2), "sgat_act_clip": (2,),
                  "tac_matrices": None, "tac_bias": None,
                  "sgat_act_global_scale": (1,) if is_nvfp4(act_args) else None}
        if tac_group_size is not None:
            shapes |= {"tac_matrices": (d // tac_group_size, tac_group_size, tac_group_size),
                       "tac_bias": (d,)}
        for name, shape in shapes.items():
            layer.register_buffer(name, None if shape is None
                                  else torch.empty(shape, dtype=dtype, device=device))
        return layer

    def _init_state(self, act_args: QuantizationArgs, mask_state: MaskState) -> None:
        self.act_args, self.mask_state = act_args, mask_state
        self._last_input = _LastInput()

    def _apply(self, *args: Any, **kwargs: Any) -> StarQuantInputTransform:
        self._last_input.clear()  # .to() / .float() replace the buffers
        return super()._apply(*args, **kwargs)

    @property
    def exclusive(self) -> torch.Tensor:
        """``V: [d, 2k]`` (``[d, 0]`` without gating)."""
        if self.sgat_exclusive is None:
            return self.sgat_channel_scale.new_zeros(self.sgat_channel_scale.shape[0], 0)
        return self.sgat_exclusive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [batch, seq, d]`` -> quantized ``x_s`` float32; any mix of token states.
        Shared by the group's linears: do not modify the result in place."""
        return self._shared("fake_quantized", x, fake_quantize_activation)

    def activation_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [batch, seq, d]`` -> ``(codes: int8 [batch, seq, d], scale: float32 [batch,
        seq, 1])`` with ``codes * scale == forward(x)`` bit for bit (``quantize_activation``).
        Shared by the group's linears: do not modify the results in place."""
        return self._shared("codes", x, quantize_activation)

    def _shared(self, kind: str, x: torch.Tensor, quantize: Callable) -> Any:
        mask_state = self._mask_state_for(x)
        versions = tuple(_version(t) for t in (x, mask_state, *self.buffers()))
        return self._last_input.get(kind, x, mask_state, versions,
                                    lambda: self._in_token_chunks(x, mask_state, quantize))

    def _in_token_chunks(self, x: torch.Tensor, mask_state: torch.Tensor, quantize: Callable
                         ) -> Any:
        """``quantize(*self._transformed(x, mask_state))``, ``_CHUNK_TOKENS`` tokens at a time
        (``in_token_chunks``)."""
        return in_token_chunks(lambda tokens, states: quantize(*self._transformed(tokens, states)),
                               x, mask_state)

    def _mask_state_for(self, x: torch.Tensor) -> torch.Tensor:
        mask_state = self.mask_state.mask_state
        if mask_state is None:
            raise RuntimeError(
                "A STaR-Quant layer ran before any mask state was recorded; "
                "attach_mask_state() to the model's embedding and call the model with input_ids."
            )
        if x.shape[:-1] != mask_state.shape:
            raise ValueError(
                f"Input has leading shape {tuple(x.shape[:-1])} but the mask state is "
                f"{tuple(mask_state.shape)}; expected x [batch, seq, d] matching the input_ids "
                "of this forward (the embedding hook must see the same canvas)."
            )
        return mask_state

    def _transformed(self, x: torch.Tensor, mask_state: torch.Tensor
                     ) -> tuple[torch.Tensor, QuantizationArgs, torch.Tensor, torch.Tensor | None]:
        """``(x_s: float32 [batch, seq, d], act_args, clip: [batch, seq, 1], global scale)``:
        ``star_transform``'s output and clip, and NVFP4's static global scale (None
        otherwise)."""
        x_s, clip = star_transform(self, x, mask_state.long())
        global_scale = self.sgat_act_global_scale
        return x_s, self.act_args, clip, None if global_scale is None else global_scale.float()


def in_token_chunks(compute: Callable[[torch.Tensor, torch.Tensor], Any], x: torch.Tensor,
                    state: torch.Tensor, chunk_tokens: int = _CHUNK_TOKENS) -> Any:
    """``compute(tokens, states)`` (a tensor or a tuple of tensors, one row per token) on
    ``x: [..., d]`` and one value per token ``state: [...]`` (its mask state, its activation
    scale), ``chunk_tokens`` tokens at a time, the results concatenated back to
    ``[..., width]``: the same math for every token, with the temporaries kept in the CPU's
    cache (the transform: 8B-width block, 512 tokens, one thread, 156 ms per forward instead
    of 179 with the float32 transform; the GEMM: ``GEMM_CHUNK_TOKENS``)."""
    if x.shape[:-1].numel() <= chunk_tokens:
        return compute(x, state)
    tokens, states = x.reshape(-1, x.shape[-1]), state.reshape(-1)
    chunks = [compute(tokens[start:start + chunk_tokens], states[start:start + chunk_tokens])
              for start in range(0, tokens.shape[0], chunk_tokens)]
    if isinstance(chunks[0], torch.Tensor):
        return torch.cat(chunks).reshape(*x.shape[:-1], -1)
    return tuple(torch.cat(parts).reshape(*x.shape[:-1], -1)
                 for parts in zip(*chunks, strict=True))


def star_transform(tensors: Any, x: torch.Tensor, state: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_s: float32 [..., d], clip: float32 [..., 1])`` for ``x: [..., d]`` with per-token
    ``state: [...]`` (``mask_state.long()``): TAC, the state-gated SGAT map
    (``transform_input``) and each token's activation clip, read from ``tensors``, anything
    that holds the STaR tensors under their checkpoint names (a ``StarQuantInputTransform``,
    a vLLM layer), so both runtimes compute the same numbers.

    The map computes in the STaR tensors' dtype, the model's: in a bf16 model every GEMM of
    the transform runs at bf16's rate (AMX on x86) and each intermediate is rounded to bf16,
    an error measured in ``docs/results.md`` (issue 23); a float32 model computes as the fit
    did. ``x_s`` goes to the activation quantizer in float32."""
    dtype = tensors.sgat_channel_scale.dtype
    x = x.to(dtype)
    if tensors.tac_matrices is not None:
        x = apply_tac(x, TACParams(tensors.tac_matrices, tensors.tac_bias))
    exclusive = tensors.sgat_exclusive
    if exclusive is None:
        exclusive = x.new_zeros(x.shape[-1], 0)
    x_s = transform_input(x, state, exclusive, tensors.sgat_channel_scale, tensors.sgat_left,
                          tensors.sgat_right)
    return x_s.float(), tensors.sgat_act_clip.float()[state].unsqueeze(-1)
