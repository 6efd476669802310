"""What runs in a quantized forward pass: the shared mask state and the SGAT(+TAC) linear.

The embedding sees ``input_ids`` once per forward; a pre-hook turns them into
``mask_state: [batch, seq]`` on one ``MaskState`` object that every ``StarQuantLinear`` holds by
reference, so no layer signature changes and a position that flips from ``[MASK]`` to a real
token between denoising steps is simply re-gated on the next forward.

A ``StarQuantLinear`` holds its weight the way the checkpoint and an INT kernel hold it: the
integer codes under compressed-tensors' names and layouts (``pack-quantized`` for 4 bit,
``int-quantized`` for 8 bit), produced and read by compressed-tensors' own compressors, and
dequantized on every forward. The STaR tensors (``sgat_*``, ``tac_*``) sit on the
``StarQuantInputTransform`` that a group of linears reading the same input share.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from torch import nn
from torch.utils.hooks import RemovableHandle

from starquant_plugin.method.quantizers import fake_quantize_activation, fake_quantize_weight
from starquant_plugin.method.sgat import SGATResult, transform_input
from starquant_plugin.method.tac import TACParams, apply_tac

WEIGHT_FORMATS: dict[int, str] = {4: "pack-quantized", 8: "int-quantized"}
"""compressed-tensors format per weight bit width (4 bit packed 8 per int32, 8 bit as int8)."""

_MIN_SCALE = 1e-8  # the fake quantizers' scale floor (quantizers._MIN_SCALE)


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


def weight_format(args: QuantizationArgs) -> str:
    """The compressed-tensors format that stores weights quantized with ``args``."""
    if args.type != "int" or args.num_bits not in WEIGHT_FORMATS:
        raise ValueError(
            f"Got weight QuantizationArgs(type={args.type!r}, num_bits={args.num_bits}); "
            f"starquant stores int weights of {sorted(WEIGHT_FORMATS)} bits "
            f"({WEIGHT_FORMATS}). Use one of the presets W4A4, W4A8 or W8A8."
        )
    return WEIGHT_FORMATS[args.num_bits]


def weight_scheme(weight_args: QuantizationArgs, act_args: QuantizationArgs | None = None
                  ) -> QuantizationScheme:
    """The compressed-tensors scheme (with its explicit ``format``) of a STaR-Quant linear."""
    return QuantizationScheme(targets=["Linear"], weights=weight_args,
                              input_activations=act_args, format=weight_format(weight_args))


def _num_weight_groups(in_features: int, args: QuantizationArgs) -> int:
    if args.strategy == "channel":
        return 1
    if args.strategy == "group" and in_features % args.group_size == 0:
        return in_features // args.group_size
    raise ValueError(
        f"Weight strategy {args.strategy!r} (group_size={args.group_size}) cannot store "
        f"{in_features} input columns; use strategy='channel' or a group_size dividing it."
    )


def weight_qparams(
    weight: torch.Tensor, args: QuantizationArgs, clip_ratio: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fake_quantize_weight``'s scale (and zero point) in compressed-tensors' convention.

    ``weight: [out, in]``, ``clip_ratio: [out]`` -> ``scale: [out, groups]`` (groups = 1 per
    channel) and, if asymmetric, ``zero_point: [out, groups]`` int8 on compressed-tensors'
    signed grid (our unsigned zero point minus ``2^(b-1)``), else None. Same arithmetic as the
    fake quantizer, so ``codes * scale`` reproduces its output bit for bit.
    """
    out_features, in_features = weight.shape
    groups = _num_weight_groups(in_features, args)
    x = weight.detach().reshape(out_features, groups, in_features // groups)
    ratio = 1.0 if clip_ratio is None else clip_ratio.reshape(-1, 1, 1).to(weight.dtype)
    if args.symmetric:
        qmax = 2 ** (args.num_bits - 1) - 1
        scale = (x.abs().amax(dim=-1, keepdim=True) * ratio / qmax).clamp_min(_MIN_SCALE)
        return scale.reshape(out_features, groups), None
    qmax = 2**args.num_bits - 1
    x_min = x.amin(dim=-1, keepdim=True).clamp_max(0.0) * ratio
    x_max = x.amax(dim=-1, keepdim=True).clamp_min(0.0) * ratio
    scale = ((x_max - x_min) / qmax).clamp_min(_MIN_SCALE)
    zero = torch.clamp(torch.round(-x_min / scale), 0, qmax) - 2 ** (args.num_bits - 1)
    return scale.reshape(out_features, groups), zero.reshape(out_features, groups).to(torch.int8)


def compressed_weight_layout(
    out_features: int, in_features: int, args: QuantizationArgs, scale_dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors compressed-tensors' compressor writes for a
    ``[out, in]`` weight, e.g. to build empty modules the checkpoint loads into.

    >>> from starquant_plugin.method.quantizers import scheme_args
    >>> layout = compressed_weight_layout(24, 64, scheme_args("W4A4")[0], torch.float32)
    >>> layout["weight_packed"], layout["weight_scale"]
    (((24, 8), torch.int32), ((24, 1), torch.float32))
    """
    groups = _num_weight_groups(in_features, args)
    bits = args.num_bits
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if weight_format(args) == "pack-quantized":
        layout["weight_packed"] = ((out_features, math.ceil(in_features * bits / 32)),
                                   torch.int32)
        layout["weight_shape"] = ((2,), torch.int64)
        if not args.symmetric:
            layout["weight_zero_point"] = ((math.ceil(out_features * bits / 32), groups),
                                           torch.int32)
    else:
        layout["weight"] = ((out_features, in_features), torch.int8)
        if not args.symmetric:
            layout["weight_zero_point"] = ((out_features, groups), torch.int8)
    layout["weight_scale"] = ((out_features, groups), scale_dtype)
    return layout


class StarQuantInputTransform(nn.Module):
    """What a linear group's input goes through before the integer GEMM: TAC (o_proj input
    only), the state-gated SGAT transform and the per-token activation quantizer.

    ``forward(x: [batch, seq, d]) -> Q_a(x_s): [batch, seq, d]`` float32, with each token's
    state read from the shared ``MaskState``. One instance serves every linear of a group
    (q/k/v; gate/up); only the group's first linear registers it, so it is stored once.
    Buffers, in the checkpoint under these names (see ``SGATResult`` for the math):

    * ``sgat_exclusive: [d, 2k]`` (``V``; None when ``k = 0``), ``sgat_channel_scale: [d]``,
      ``sgat_left: [n1, n1]``, ``sgat_right: [n2, n2]``, ``sgat_act_clip: [2]`` (per state);
    * ``tac_matrices: [d / g, g, g]``, ``tac_bias: [d]``, or None.
    """

    def __init__(self, sgat: SGATResult, act_args: QuantizationArgs, mask_state: MaskState,
                 tac: TACParams | None = None, dtype: torch.dtype = torch.float32) -> None:
        """``dtype``: how the tensors are stored (the model's dtype, as compressed-tensors
        stores scales); the forward computes in float32 either way."""
        super().__init__()
        self.act_args = act_args
        self.mask_state = mask_state
        exclusive = sgat.exclusive if sgat.exclusive.shape[1] else None
        tensors = {"sgat_exclusive": exclusive, "sgat_channel_scale": sgat.channel_scale,
                   "sgat_left": sgat.left, "sgat_right": sgat.right,
                   "sgat_act_clip": sgat.act_clip.reshape(-1).expand(2),
                   "tac_matrices": None if tac is None else tac.matrices,
                   "tac_bias": None if tac is None else tac.bias}
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
        layer.act_args, layer.mask_state = act_args, mask_state
        shapes = {"sgat_exclusive": (d, 2 * k) if k else None, "sgat_channel_scale": (d,),
                  "sgat_left": (n1, n1), "sgat_right": (n2, n2), "sgat_act_clip": (2,),
                  "tac_matrices": None, "tac_bias": None}
        if tac_group_size is not None:
            shapes |= {"tac_matrices": (d // tac_group_size, tac_group_size, tac_group_size),
                       "tac_bias": (d,)}
        for name, shape in shapes.items():
            layer.register_buffer(name, None if shape is None
                                  else torch.empty(shape, dtype=dtype, device=device))
        return layer

    @property
    def exclusive(self) -> torch.Tensor:
        """``V: [d, 2k]`` (``[d, 0]`` without gating)."""
        if self.sgat_exclusive is None:
            return self.sgat_channel_scale.new_zeros(self.sgat_channel_scale.shape[0], 0)
        return self.sgat_exclusive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [batch, seq, d]`` -> quantized ``x_s`` float32; any mix of token states."""
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
        x = x.float()
        if self.tac_matrices is not None:
            x = apply_tac(x, TACParams(self.tac_matrices.float(), self.tac_bias.float()))
        state = mask_state.long()
        x_s = transform_input(x, state, self.exclusive.float(), self.sgat_channel_scale.float(),
                              self.sgat_left.float(), self.sgat_right.float())
        clip = self.sgat_act_clip.float()[state].unsqueeze(-1)
        return fake_quantize_activation(x_s, self.act_args, clip)


class StarQuantLinear(nn.Module):
    """``y = Q_a(x_s) W_q^T + b``: the integer GEMM of one linear after its group's
    ``StarQuantInputTransform``.

    Buffers, in the checkpoint under these names: the weight ``W_q = Q_w(W M^{-T})`` as
    compressed-tensors stores it: 4 bit ``weight_packed: int32 [out, in / 8]`` +
    ``weight_shape: [2]``, 8 bit ``weight: int8 [out, in]``; both with ``weight_scale: [out,
    groups]`` (and ``weight_zero_point`` if asymmetric); ``bias: [out]`` or None.
    ``dequantized_weight()`` returns ``[out, in]`` float. With ``weight_args`` unset the
    constructor keeps a dense float ``weight`` instead (experiments; not saveable).

    The group's first linear owns the input transform (submodule ``input_transform``, saved
    with it); the others borrow it (``owns_transform=False``: same object, not saved twice).
    ``layer.weight`` is the int8 codes for 8 bit (compressed-tensors' name) and the dequantized
    weight for 4 bit (whose codes are ``weight_packed``).
    """

    def __init__(
        self,
        weight_q: torch.Tensor,
        bias: torch.Tensor | None,
        input_transform: StarQuantInputTransform,
        *,
        owns_transform: bool = True,
        weight_args: QuantizationArgs | None = None,
        weight_scale: torch.Tensor | None = None,
        weight_zero_point: torch.Tensor | None = None,
    ) -> None:
        """``weight_q: [out, d]`` the transformed weight; with ``weight_args`` and its
        ``weight_scale: [out, groups]`` (``weight_qparams``, in the storage dtype)
        compressed-tensors' compressor rounds it onto the scale's integer grid and stores the
        codes (a weight already fake-quantized with that scale keeps its values)."""
        super().__init__()
        d = input_transform.sgat_channel_scale.shape[0]
        if weight_q.dim() != 2 or weight_q.shape[1] != d:
            raise ValueError(
                f"Got weight {tuple(weight_q.shape)} for an input transform of dim {d}; "
                "expected [out, d]."
            )
        self.weight_args = weight_args
        self._attach_transform(input_transform, owns_transform)
        if weight_args is None:
            self.register_buffer("weight", weight_q.detach().clone())
        else:
            self._store_weight(weight_q.detach(), weight_args, weight_scale, weight_zero_point)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _attach_transform(self, input_transform: StarQuantInputTransform, owns: bool) -> None:
        if owns:
            self.input_transform = input_transform
        else:  # a plain reference: not a submodule, so not in state_dict twice
            object.__setattr__(self, "_borrowed_transform", input_transform)

    @property
    def transform(self) -> StarQuantInputTransform:
        """The group's input transform, owned or borrowed."""
        owned = self._modules.get("input_transform")
        return owned if owned is not None else self.__dict__["_borrowed_transform"]

    @property
    def owns_transform(self) -> bool:
        return "input_transform" in self._modules

    @property
    def act_args(self) -> QuantizationArgs:
        return self.transform.act_args

    def _store_weight(self, weight: torch.Tensor, weight_args: QuantizationArgs,
                      scale: torch.Tensor | None, zero_point: torch.Tensor | None) -> None:
        if scale is None or (zero_point is None) != weight_args.symmetric:
            raise ValueError(
                f"Got weight_args (symmetric={weight_args.symmetric}) with weight_scale "
                f"{'missing' if scale is None else 'set'} and weight_zero_point "
                f"{'missing' if zero_point is None else 'set'}; pass both from "
                "weight_qparams(weight, weight_args, clip) (a zero point only if asymmetric)."
            )
        scheme = weight_scheme(weight_args, self.act_args)
        uncompressed = {"weight": weight.float(), "weight_scale": scale.detach().clone()}
        if zero_point is not None:
            uncompressed["weight_zero_point"] = zero_point.detach()
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name, tensor in compressor.compress(uncompressed, scheme).items():
            self.register_buffer(name, tensor.contiguous())

    @classmethod
    def empty(
        cls,
        out_features: int,
        bias: bool,
        weight_args: QuantizationArgs,
        input_transform: StarQuantInputTransform,
        owns_transform: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> StarQuantLinear:
        """A module with every buffer allocated (on ``device``, uninitialised) in the
        checkpoint's layout, for a loader to fill by name."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight_args = weight_args
        layer._attach_transform(input_transform, owns_transform)
        in_features = input_transform.sgat_channel_scale.shape[0]
        layout = compressed_weight_layout(out_features, in_features, weight_args, dtype)
        if bias:
            layout["bias"] = ((out_features,), dtype)
        for name, (shape, tensor_dtype) in layout.items():
            layer.register_buffer(name, torch.empty(shape, dtype=tensor_dtype, device=device))
        if not bias:
            layer.register_buffer("bias", None)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sgat: SGATResult,
        weight_args: QuantizationArgs,
        input_transform: StarQuantInputTransform,
        owns_transform: bool = True,
        weight_clip_rows: slice | None = None,
    ) -> StarQuantLinear:
        """Quantize ``linear`` under a fitted SGAT by RTN with the fitted per-row weight clip
        (the scale stored in the linear's dtype; equal to ``fake_quantize_weight`` in float32).

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
            scale, zero_point = weight_qparams(weight_t, weight_args, weight_clip)
        return cls(weight_q, linear.bias, input_transform, owns_transform=owns_transform,
                   weight_args=weight_args, weight_scale=scale.to(linear.weight.dtype),
                   weight_zero_point=zero_point)

    @property
    def weight_format(self) -> str:
        """The compressed-tensors format of the stored weight ("dense" = float weight)."""
        return "dense" if self.weight_args is None else weight_format(self.weight_args)

    def compressed_weight(self) -> dict[str, torch.Tensor]:
        """The weight tensors under compressed-tensors' local names (``weight_packed``, ...)."""
        names = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point")
        return {name: self._buffers[name] for name in names if name in self._buffers}

    def dequantized_weight(self) -> torch.Tensor:
        """``[out, d]`` float32, decompressed by compressed-tensors' own compressor."""
        if self.weight_args is None:
            return self._buffers["weight"]
        scheme = weight_scheme(self.weight_args)
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        # float32 scale: codes * scale is then exact whatever dtype the scale is stored in
        stored = self.compressed_weight() | {"weight_scale": self.weight_scale.float()}
        return compressor.decompress(stored, scheme)["weight"]

    def __getattr__(self, name: str) -> Any:
        if name == "weight" and "weight_packed" in self.__dict__.get("_buffers", {}):
            return self.dequantized_weight()
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [batch, seq, d]`` -> ``[batch, seq, out]`` in ``x``'s dtype (computed in
        float32); any mix of token states."""
        bias = None if self.bias is None else self.bias.float()
        y = F.linear(self.transform(x), self.dequantized_weight().float(), bias)
        return y.to(x.dtype)
