"""What runs in a quantized forward pass: the shared mask state and the SGAT(+TAC) linear.

The embedding sees ``input_ids`` once per forward; a pre-hook turns them into
``mask_state: [batch, seq]`` on one ``MaskState`` object that every ``StarQuantLinear`` holds by
reference, so no layer signature changes and a position that flips from ``[MASK]`` to a real
token between denoising steps is simply re-gated on the next forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs
from torch import nn
from torch.utils.hooks import RemovableHandle

from starquant_plugin.method.quantizers import fake_quantize_activation, fake_quantize_weight
from starquant_plugin.method.sgat import SGATResult
from starquant_plugin.method.tac import TACParams, apply_tac


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


class StarQuantLinear(nn.Module):
    """``y = Q_a(((TAC(x)) T) * gates[s]) W_q^T + b`` with the token state ``s`` from ``MaskState``.

    Buffers: ``transform: [d, d]``, ``gates: [2, d]``, ``act_clip: [2]`` (per state),
    ``weight: [out, d]`` = the fake-quantized transformed weight ``Q_w(W T^{-T})`` stored
    dequantized, ``bias: [out]`` or None, and optionally the TAC map (o_proj input only).
    """

    def __init__(
        self,
        weight_q: torch.Tensor,
        bias: torch.Tensor | None,
        transform: torch.Tensor,
        gates: torch.Tensor,
        act_clip: torch.Tensor | float,
        act_args: QuantizationArgs,
        mask_state: MaskState,
        tac: TACParams | None = None,
    ) -> None:
        super().__init__()
        d = transform.shape[0]
        if weight_q.dim() != 2 or weight_q.shape[1] != d or gates.shape != (2, d):
            raise ValueError(
                f"Got weight {tuple(weight_q.shape)}, transform {tuple(transform.shape)} and "
                f"gates {tuple(gates.shape)}; expected [out, d], [d, d] and [2, d]."
            )
        act_clip = torch.as_tensor(act_clip, dtype=transform.dtype).reshape(-1).expand(2)
        self.register_buffer("weight", weight_q.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("transform", transform.detach().clone())
        self.register_buffer("gates", gates.detach().clone())
        self.register_buffer("act_clip", act_clip.clone())
        has_tac = tac is not None
        self.register_buffer("tac_matrices", tac.matrices.detach().clone() if has_tac else None)
        self.register_buffer("tac_bias", tac.bias.detach().clone() if has_tac else None)
        self.act_args = act_args
        self.mask_state = mask_state

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sgat: SGATResult,
        weight_args: QuantizationArgs,
        act_args: QuantizationArgs,
        mask_state: MaskState,
        weight_clip_rows: slice | None = None,
        tac: TACParams | None = None,
    ) -> StarQuantLinear:
        """Quantize ``linear`` under a fitted SGAT (RTN with the fitted per-row weight clip).

        When one SGAT serves several linears (q/k/v), ``weight_clip_rows`` selects this
        linear's rows of ``sgat.weight_clip``, e.g. ``slice(q_out, q_out + k_out)`` for k.
        """
        weight_clip = sgat.weight_clip[weight_clip_rows or slice(None)]
        if weight_clip.shape[0] != linear.out_features:
            raise ValueError(
                f"Got {weight_clip.shape[0]} weight clip ratios for a linear with "
                f"{linear.out_features} outputs; pass weight_clip_rows selecting this linear's "
                "rows of the concatenated weight the SGAT was fitted on."
            )
        with torch.no_grad():
            weight_t = sgat.transformed_weight(linear.weight.float())
            weight_q = fake_quantize_weight(weight_t, weight_args, weight_clip)
        return cls(
            weight_q=weight_q,
            bias=linear.bias,
            transform=sgat.transform,
            gates=sgat.gates,
            act_clip=sgat.act_clip,
            act_args=act_args,
            mask_state=mask_state,
            tac=tac,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [batch, seq, d]`` -> ``[batch, seq, out]``; any mix of token states."""
        mask_state = self.mask_state.mask_state
        if mask_state is None:
            raise RuntimeError(
                "StarQuantLinear ran before any mask state was recorded; attach_mask_state() "
                "to the model's embedding and call the model with input_ids."
            )
        if x.shape[:-1] != mask_state.shape:
            raise ValueError(
                f"Input has leading shape {tuple(x.shape[:-1])} but the mask state is "
                f"{tuple(mask_state.shape)}; expected x [batch, seq, d] matching the input_ids "
                "of this forward (the embedding hook must see the same canvas)."
            )
        if self.tac_matrices is not None:
            x = apply_tac(x, TACParams(self.tac_matrices, self.tac_bias))
        state = mask_state.long()
        x_t = (x @ self.transform.to(x.dtype)) * self.gates.to(x.dtype)[state]
        clip = self.act_clip.to(x.dtype)[state].unsqueeze(-1)
        x_q = fake_quantize_activation(x_t, self.act_args, clip)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x_q, self.weight.to(x.dtype), bias)
