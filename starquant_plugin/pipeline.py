"""The core STaR-Quant path: calibration rows in, a model with STaR-Quant linears out.

Layer by layer (the inputs of block i come from the already-quantized blocks before it), and
within a block group by group in forward order: SGAT for q/k/v, then TAC on the attention
output (fitted against the FP model's own attention output, so it also absorbs error carried
in from earlier blocks), then SGAT for the output projection on TAC-corrected inputs, then the
MLP. Baselines (RTN, SmoothQuant, Hadamard rotation, learned transform without gates) are
presets of ``StarQuantArgs`` and run through the same code. The llm-compressor modifier calls
the same per-block function (``quantize_block``).
"""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from compressed_tensors.offload import update_offload_parameter
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.format import attach_quantization_config
from starquant_plugin.integrations.saving import bind_save_pretrained
from starquant_plugin.kv_folding import kv_folded_params, rotate_value_heads_, smooth_keys_
from starquant_plugin.method import (
    MASKED,
    UNMASKED,
    MaskState,
    SGATResult,
    StarQuantInputTransform,
    StarQuantLinear,
    TACParams,
    apply_tac,
    attach_mask_state,
    choose_tac_shrinkage,
    fit_sgat,
    fit_tac,
    gptq_quantize_weight,
    identity_tac,
    scheme_args,
    smoothquant_scales,
    static_sgat,
)
from starquant_plugin.method.quantizers import is_nvfp4, nvfp4_global_scale
from starquant_plugin.method.runtime import stored_global_scale, weight_qparams
from starquant_plugin.models.attention import use_kv_quantized_attention
from starquant_plugin.models.families import (
    DLLMFamily,
    decoder_blocks,
    family_of,
    mask_token_id,
)
from starquant_plugin.safeguards import (
    CalibrationError,
    check_calibration_rows,
    check_finite_activations,
    check_finite_fit,
    group_location,
    undo_or_mark_unusable,
    validate_for_model,
    warn_on_one_state,
)


@dataclass
class QuantizationReport:
    """What the run did: per linear group its FP exactness residuals and final fit loss, and
    for the attention output the TAC shrinkage used (``None``: no TAC for that layer)."""

    args: StarQuantArgs
    groups: dict[str, dict[str, float | None]] = field(default_factory=dict)
    seconds: float = 0.0


class _StopForward(Exception):
    """Raised by a hook once the inputs it wanted are captured."""


def _static_transform(
    args: StarQuantArgs, weight: torch.Tensor, input_absmax: torch.Tensor,
    generator: torch.Generator,
) -> SGATResult:
    """A fixed (not fitted), ungated transform for the baselines; ``input_absmax: [d]``."""
    weight_args, _ = scheme_args(args.scheme)
    factors = args.factors(weight.shape[1])
    if args.transform == "smoothquant":  # x -> x / s, W -> W * s
        scales = smoothquant_scales(input_absmax, weight, args.smoothquant_alpha)
        return static_sgat(weight, weight_args, channel_scale=1.0 / scales, factors=factors)
    return static_sgat(weight, weight_args, factors=factors,
                       rotate=args.transform == "hadamard", generator=generator)


_GLOBAL_SCALE_CHUNK = 4096


@torch.no_grad()
def _activation_global_scale(sgat: SGATResult, by_state: dict[int, torch.Tensor]
                             ) -> torch.Tensor:
    """NVFP4's static activation global scale of a group: ``nvfp4_global_scale`` of its
    transformed calibration inputs over both token states (one GEMM takes both), the
    statistic of compressed-tensors' static min-max observer. In token chunks, so the
    transform's temporaries stay small."""
    amax = max(sgat.transform_input(chunk.float(), torch.full(chunk.shape[:1], state,
                                                              device=chunk.device)).abs().amax()
               for state, x in by_state.items() if len(x)
               for chunk in x.split(_GLOBAL_SCALE_CHUNK))
    return nvfp4_global_scale(amax)


def quantize_linear_group(
    linears: list[nn.Linear],
    by_state: dict[int, torch.Tensor],
    args: StarQuantArgs,
    shared_state: MaskState,
    tac: TACParams | None = None,
) -> tuple[list[StarQuantLinear], SGATResult]:
    """Fit one transform for linears that read the same input and build their replacements,
    which share one ``StarQuantInputTransform`` (owned by the first).

    by_state: their common input (TAC already applied) by token state (``_capture_by_state``).
    """
    weight_args, act_args = scheme_args(args.scheme)
    weight = torch.cat([linear.weight.detach().float() for linear in linears])
    d = weight.shape[1]
    present = [x for x in by_state.values() if len(x)]
    input_absmax = torch.stack([x.abs().amax(0) for x in present]).amax(0)
    generator = torch.Generator().manual_seed(args.seed)
    if args.transform == "learned":
        init_scale = None
        if args.init_scale == "smoothquant":  # x -> x / s
            init_scale = 1.0 / smoothquant_scales(input_absmax, weight, args.init_scale_alpha)
        # a state without tokens borrows the other's (the fit needs both)
        masked = by_state[MASKED] if len(by_state[MASKED]) else by_state[UNMASKED]
        unmasked = by_state[UNMASKED] if len(by_state[UNMASKED]) else by_state[MASKED]
        sgat = fit_sgat(weight, masked, unmasked, weight_args, act_args,
                        k=args.exclusive_width(d), factors=args.factors(d), epochs=args.epochs,
                        lr=args.lr, lr_clip=args.lr_clip, seed=args.seed,
                        init_scale=init_scale, init_rotation=args.init_rotation,
                        lr_schedule=args.lr_schedule)
    else:
        sgat = _static_transform(args, weight, input_absmax, generator)
    if is_nvfp4(act_args):
        sgat.act_global_scale = _activation_global_scale(sgat, by_state)
    dtype = linears[0].weight.dtype  # STaR tensors and scales are stored in the model's dtype
    sgat = sgat.rounded_to(dtype)
    input_transform = StarQuantInputTransform(sgat, act_args, shared_state, tac, dtype)
    weight_global_scale = None  # NVFP4: one for the group, as vLLM loads fused q/k/v, gate/up
    if is_nvfp4(weight_args):  # from each linear's range: no [out_total, d] copy of the group
        weight_global_scale = stored_global_scale(torch.stack([
            sgat.transformed_weight(linear.weight.detach().float()).abs().amax()
            for linear in linears]), dtype)
    hessian = None
    if args.weight_quantizer == "gptq":
        hessian = torch.zeros(d, d, device=weight.device)
        for state, x in by_state.items():
            x_s = sgat.transform_input(x, torch.full(x.shape[:1], state, device=x.device))
            hessian += x_s.T @ x_s
        hessian /= sum(len(x) for x in by_state.values())
    replacements, start = [], 0
    for index, linear in enumerate(linears):
        rows = slice(start, start + linear.out_features)
        start += linear.out_features
        owns = index == 0
        if hessian is None:
            replacements.append(StarQuantLinear.from_linear(
                linear, sgat, weight_args, input_transform, owns, weight_clip_rows=rows,
                weight_global_scale=weight_global_scale))
            continue
        # GPTQ's scales come from the unclipped transformed weight.
        weight_t = sgat.transformed_weight(linear.weight.detach().float())
        scale, zero_point = weight_qparams(weight_t, weight_args)
        replacements.append(StarQuantLinear(
            gptq_quantize_weight(weight_t, hessian, weight_args), linear.bias, input_transform,
            owns_transform=owns, weight_args=weight_args, weight_scale=scale.to(dtype),
            weight_zero_point=zero_point))
    return replacements, sgat


TAC_HOLD_OUT_EVERY = 4
"""``tac_shrinkage: auto`` scores its candidates on every fourth calibration row."""
FALLBACK_TAC_SHRINKAGE = 0.2
"""``tac_shrinkage: auto`` with fewer than ``TAC_HOLD_OUT_EVERY`` rows (the paper's range)."""


def fit_attention_tac(z_fp: torch.Tensor, z_quant: torch.Tensor, out_weight: torch.Tensor,
                      args: StarQuantArgs) -> tuple[TACParams, float | None]:
    """TAC from paired attention outputs ``[rows, seq, d]`` pooled over tokens and states, and
    the shrinkage it used (``None``: no TAC, the identity). ``out_weight: [out, d]`` is the
    output projection that reads them, by which ``tac_shrinkage: auto`` scores candidates."""
    d = z_fp.shape[-1]
    zf, zq = z_fp.reshape(-1, d).float(), z_quant.reshape(-1, d).float()
    fit = {"group_size": args.tac_group_size, "damping": args.tac_damping,
           "method": args.tac_method}
    shrinkage = args.tac_shrinkage
    if shrinkage == "auto":
        rows = torch.arange(z_fp.shape[0], device=z_fp.device)
        held_rows = rows % TAC_HOLD_OUT_EVERY == TAC_HOLD_OUT_EVERY - 1
        if held_rows.any():
            held_out = held_rows[:, None].expand(z_fp.shape[:-1]).reshape(-1)
            shrinkage, _ = choose_tac_shrinkage(zf, zq, out_weight.float(), held_out, **fit)
        else:  # fewer rows than one held-out share: nothing to choose on
            shrinkage = FALLBACK_TAC_SHRINKAGE
    if shrinkage is None:
        return identity_tac(d, args.tac_group_size, z_quant.device), None
    return fit_tac(zf, zq, shrinkage=shrinkage, **fit), shrinkage


def _capture(
    block: nn.Module, name: str, inputs: list[tuple[tuple, dict]],
    states: list[torch.Tensor], shared_state: MaskState,
    take: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """Run ``block`` on each captured (args, kwargs), with that batch's token state, up to
    ``name``, and hand ``name``'s input and the state to ``take(x, state)``, batch by batch."""
    module = block.get_submodule(name)
    batch_state = []

    def hook(_module, args):
        take(args[0].detach(), batch_state[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        for (args, kwargs), state in zip(inputs, states, strict=True):
            shared_state.mask_state = state
            batch_state[:] = [state]
            try:
                block(*args, **kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()


def _capture_input(
    block: nn.Module, name: str, inputs: list[tuple[tuple, dict]],
    states: list[torch.Tensor], shared_state: MaskState,
) -> torch.Tensor:
    """``name``'s input over every batch (``_capture``): [batch, seq, d]."""
    captured = []
    _capture(block, name, inputs, states, shared_state, lambda x, _state: captured.append(x))
    return torch.cat(captured)


def _capture_by_state(
    block: nn.Module, name: str, inputs: list[tuple[tuple, dict]],
    states: list[torch.Tensor], shared_state: MaskState, tac: TACParams | None,
) -> dict[int, torch.Tensor]:
    """``name``'s input over every batch, TAC applied, by token state: {state: [tokens, d]}
    float32 (a state may have no tokens). Written batch by batch into one buffer per state,
    so the fit's input is held once (at 8B width the down projection's is 1.5 GiB in
    float32; capturing, concatenating and splitting held it two or three times)."""
    counts = {MASKED: sum(int(s.sum()) for s in states)}
    counts[UNMASKED] = sum(s.numel() for s in states) - counts[MASKED]
    buffers: dict[int, torch.Tensor] = {}
    filled = dict.fromkeys(counts, 0)

    def take(x: torch.Tensor, state: torch.Tensor) -> None:
        if tac is not None:
            x = apply_tac(x, tac)
        flat, state = x.reshape(-1, x.shape[-1]), state.reshape(-1)
        for which, tokens in ((MASKED, flat[state]), (UNMASKED, flat[~state])):
            if which not in buffers:
                buffers[which] = torch.empty(counts[which], flat.shape[1], dtype=torch.float32,
                                             device=flat.device)
            buffers[which][filled[which]:filled[which] + len(tokens)] = tokens
            filled[which] += len(tokens)

    _capture(block, name, inputs, states, shared_state, take)
    return buffers


def _block_inputs(model: PreTrainedModel, block: nn.Module, rows: torch.LongTensor,
                  batch_size: int) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives for each calibration batch."""
    inputs = []

    def hook(_module, args, kwargs):
        inputs.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(rows), batch_size):
            try:
                model(rows[start : start + batch_size])
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs


def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]], states: list[torch.Tensor],
              shared_state: MaskState) -> list[torch.Tensor]:
    """``block``'s output hidden states for each captured (args, kwargs), each batch under its
    own token state (a quantized block reads it through ``shared_state``)."""
    outputs = []
    for (args, kwargs), state in zip(inputs, states, strict=True):
        shared_state.mask_state = state
        outputs.append(block(*args, **kwargs))
    return outputs


def with_hidden(inputs: list[tuple[tuple, dict]], hidden: list[torch.Tensor]
                ) -> list[tuple[tuple, dict]]:
    """The captured (args, kwargs) of each batch with the hidden states (``args[0]``) replaced."""
    return [((h, *args[1:]), kwargs) for (args, kwargs), h in zip(inputs, hidden, strict=True)]


def quantize_block(
    block: nn.Module,
    fp_block: nn.Module,
    q_inputs: list[tuple[tuple, dict]],
    fp_inputs: list[tuple[tuple, dict]],
    states: list[torch.Tensor],
    shared_state: MaskState,
    args: StarQuantArgs,
    family: DLLMFamily,
    report: QuantizationReport,
    index: int,
    groups: tuple[tuple[str, ...], ...] | None = None,
) -> None:
    """Replace ``block``'s linears with STaR-Quant linears, group by group in forward order.

    q_inputs: per batch the (args, kwargs) ``block`` receives in the quantized model (outputs
    of the already-quantized blocks before it); fp_inputs: the same for ``fp_block``, an
    unmodified copy of ``block`` fed by the FP model, whose attention output is TAC's target.
    states: per batch ``[batch, seq]`` token states. groups: which of ``family.linear_groups``
    to quantize (default all). Shared by ``quantize_dllm`` and the llm-compressor modifier.
    """
    groups = family.linear_groups if groups is None else groups
    originals = {name: block.get_submodule(name) for group in groups for name in group}
    attention = block.get_submodule(family.attention_module)
    saved = {key: attention.__dict__.get(key) for key in ("kv_bits", "k_rotation")}
    unfolded = [(module, name, getattr(module, name).detach().clone())
                for module, name in kv_folded_params(block, family)]
    try:
        value_rotation = None
        if args.resolved_kv_rotation:
            value_rotation = rotate_value_heads_(block, family)
            attention.k_rotation = True
        if args.resolved_k_smoothing and family.linear_groups[0] in groups:
            x = _capture_input(block, family.linear_groups[0][0], q_inputs, states,
                               shared_state)
            smooth_keys_(block, family, x, args.resolved_k_smoothing)
        _quantize_groups(block, fp_block, q_inputs, fp_inputs, states, shared_state, args,
                         family, report, index, groups, value_rotation)
    except BaseException:
        for name, linear in originals.items():  # leave the block as it was
            block.set_submodule(name, linear)
        # Undo the K/V transforms folded into the weights (written as the folds were, so an
        # offloaded weight is restored where it lives, not only in its onloaded copy).
        with torch.no_grad():
            for module, name, before in unfolded:
                update_offload_parameter(module, name, before)
        for key, value in saved.items():
            if value is None:
                attention.__dict__.pop(key, None)
            else:
                setattr(attention, key, value)
        raise


def _quantize_groups(block, fp_block, q_inputs, fp_inputs, states, shared_state, args, family,
                     report, index, groups, value_rotation) -> None:
    block.get_submodule(family.attention_module).kv_bits = args.resolved_kv_bits
    for group in groups:
        where = group_location(index, group)
        tac, tac_report = None, {}
        if args.tac and group == (family.attention_output,):
            z_fp = _capture_input(fp_block, family.attention_output, fp_inputs, states,
                                  shared_state)
            if value_rotation is not None:  # TAC's target in the rotated basis
                head_dim = value_rotation.shape[0]
                z_fp = (z_fp.float().unflatten(-1, (-1, head_dim)) @ value_rotation).flatten(-2)
            z_quant = _capture_input(block, family.attention_output, q_inputs, states,
                                     shared_state)
            check_finite_activations(z_fp, "The FP attention output", where)
            check_finite_activations(z_quant, "The quantized attention output", where)
            dtype = block.get_submodule(group[0]).weight.dtype
            out_weight = block.get_submodule(group[0]).weight.detach()
            try:
                tac, shrinkage = fit_attention_tac(z_fp, z_quant, out_weight, args)
                tac, tac_report = tac.rounded_to(dtype), {"tac_shrinkage": shrinkage}
            except torch.linalg.LinAlgError as error:
                raise CalibrationError(f"TAC's closed form failed for {where}: {error}. "
                                       "Raise tac_damping.") from error
            check_finite_fit({"tac_matrices": tac.matrices, "tac_bias": tac.bias}, where)
        linears = [block.get_submodule(name) for name in group]
        with torch.enable_grad():
            by_state = _capture_by_state(block, group[0], q_inputs, states, shared_state, tac)
            for x in by_state.values():
                check_finite_activations(x, "The input", where)
            try:
                replacements, sgat = quantize_linear_group(linears, by_state, args,
                                                           shared_state, tac)
            except torch.linalg.LinAlgError as error:
                raise CalibrationError(f"A linear-algebra step failed for {where}: {error}."
                                       ) from error
        check_finite_fit(
            {"channel_scale": sgat.channel_scale, "left": sgat.left, "right": sgat.right,
             "act_clip": sgat.act_clip, "weight_clip": sgat.weight_clip,
             "exclusive": sgat.exclusive, "weight_scale": torch.cat(
                 [r.weight_scale.float().flatten() for r in replacements])},
            where, f" (fit loss per epoch {[round(v, 4) for v in sgat.loss_history]})")
        for name, replacement in zip(group, replacements, strict=True):
            block.set_submodule(name, replacement)
        report.groups[f"{index}.{'+'.join(group)}"] = {
            "residual_masked": sgat.residual_masked,
            "residual_unmasked": sgat.residual_unmasked,
            "final_loss": sgat.loss_history[-1] if sgat.loss_history else float("nan"),
            **{f"fit_{stage}_seconds": seconds for stage, seconds in sgat.seconds.items()},
            **tac_report,
        }


@torch.no_grad()
def quantize_dllm(
    model: PreTrainedModel,
    calibration_rows: torch.LongTensor,
    args: StarQuantArgs,
    batch_size: int = 8,
    progress: bool = True,
    progress_label: str = "STaR-Quant",
) -> QuantizationReport:
    """Quantize ``model`` in place with STaR-Quant (or a baseline preset of ``args``).

    calibration_rows: [n, seq] denoising states (rows containing [MASK] tokens). Returns the
    report; the model's forward afterwards is the quantized one, with the token state set from
    ``input_ids == mask_token_id`` by a hook on the embedding, and ``model.save_pretrained``
    writes the STaR-Quant checkpoint. Arguments are checked against the model before anything
    changes; if a block fails, the model goes back to FP (first block) or is marked unusable.
    ``progress_label`` names the run on its progress bar (e.g. the baseline it is).
    """
    start_time = time.time()
    family = family_of(model)
    mask_id = mask_token_id(model)
    validate_for_model(model, args, family)
    check_calibration_rows(calibration_rows, model)
    calibration_rows = calibration_rows.to(model.get_input_embeddings().weight.device)
    model.eval()
    blocks = decoder_blocks(model, family)
    report = QuantizationReport(args=args)
    states = [calibration_rows[i : i + batch_size] == mask_id
              for i in range(0, len(calibration_rows), batch_size)]
    warn_on_one_state(states)
    done: set[int] = set()
    shared_state = attach_mask_state(model.get_input_embeddings(), mask_id)
    with undo_or_mark_unusable(model, done, model.config._attn_implementation, shared_state):
        inputs = _block_inputs(model, blocks[0], calibration_rows, batch_size)
        if args.resolved_kv_bits < 16:
            use_kv_quantized_attention(model)
        fp_hidden = [args_[0] for args_, _ in inputs]
        q_hidden = list(fp_hidden)
        for index, block in enumerate(tqdm(blocks, desc=f"{progress_label} blocks",
                                           disable=not progress)):
            fp_block = copy.deepcopy(block)
            fp_inputs, q_inputs = with_hidden(inputs, fp_hidden), with_hidden(inputs, q_hidden)
            quantize_block(block, fp_block, q_inputs, fp_inputs, states, shared_state, args,
                           family, report, index)
            done.add(index)
            q_hidden = run_block(block, q_inputs, states, shared_state)
            fp_hidden = run_block(fp_block, fp_inputs, states, shared_state)
    attach_quantization_config(model, args)
    bind_save_pretrained(model)
    report.seconds = time.time() - start_time
    return report
