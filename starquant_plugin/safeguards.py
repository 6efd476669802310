"""What keeps a quantization run from producing something silently wrong.

Checks that can run before calibration (arguments against the model, calibration rows), the
non-finite checks that stop a block before it is modified, and the rule for a run that fails
midway: the model goes back to FP if no block was quantized yet, else it is marked unusable
(it refuses to run or be saved). Shared by ``quantize_dllm`` and ``STaRQuantModifier``.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.saving import mark_unusable
from starquant_plugin.method import MaskState, StarQuantLinear
from starquant_plugin.models.families import DLLMFamily, decoder_blocks, vocabulary_size

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Calibration cannot quantize a linear group (non-finite activations, a fit that
    diverged); the message names the block and group."""


def group_location(index: int, group: tuple[str, ...]) -> str:
    return f"decoder block {index}, linear group {'/'.join(group)}"


def check_finite_activations(x: torch.Tensor, what: str, where: str) -> None:
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise CalibrationError(
            f"{what} of {where} has {bad} NaN/inf value(s) of {x.numel()}; stopped before "
            "quantizing it (the block is left as it was). Check the calibration rows and the "
            "model's weights, and load the model in bf16 or fp32 (fp16 overflows)."
        )


def check_finite_fit(tensors: dict[str, torch.Tensor], where: str, detail: str = "") -> None:
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise CalibrationError(
            f"The fit for {where} diverged: {bad} hold NaN/inf{detail}. Lower lr / lr_clip or "
            "raise tac_damping, and check the calibration rows."
        )


def validate_for_model(model: PreTrainedModel, args: StarQuantArgs, family: DLLMFamily,
                       groups: dict[int, tuple[tuple[str, ...], ...]] | None = None) -> None:
    """Every check of ``args`` against the model that can run before calibration, so a bad
    argument fails before anything is modified. ``groups``: per block index the targeted
    groups (default all)."""
    if any(isinstance(m, StarQuantLinear) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already holds STaR-Quant linears; quantize the FP model "
            "(load it again) rather than a quantized one."
        )
    blocks = decoder_blocks(model, family)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no {family.block_class} blocks to "
                         "quantize; is it a LLaDA or Dream model?")
    for index, block in enumerate(blocks):
        head_dim = getattr(block.get_submodule(family.attention_module), "head_dim", None)
        if args.resolved_kv_rotation and head_dim and head_dim & (head_dim - 1):
            raise ValueError(
                f"kv_rotation rotates every head by a Sylvester Hadamard, which needs a "
                f"power-of-two head_dim; block {index} has {head_dim}. Set kv_rotation=False."
            )
        for group in family.linear_groups if groups is None else groups.get(index, ()):
            d = block.get_submodule(group[0]).in_features
            if args.tac and group == (family.attention_output,) and d % args.tac_group_size:
                raise ValueError(
                    f"tac_group_size={args.tac_group_size} does not divide the attention "
                    f"width {d} ({group_location(index, group)}); TAC maps channel blocks of "
                    "that size. Pick a divisor of it (the paper's 16 divides every LLaDA/Dream "
                    "width)."
                )
            n1, n2 = args.factors(d)
            if n1 * n2 != d:
                raise ValueError(f"Kronecker factors {(n1, n2)} do not multiply to {d} "
                                 f"({group_location(index, group)}).")


def check_calibration_rows(rows: torch.Tensor, model: PreTrainedModel) -> None:
    """Refuse calibration rows the model cannot run: not ``[n, seq]`` integer ids, too few
    tokens for the statistics, ids outside the vocabulary."""
    if rows.dim() != 2 or rows.dtype not in (torch.int32, torch.int64) or rows.numel() < 2:
        raise ValueError(
            f"Got calibration rows of shape {tuple(rows.shape)} and dtype {rows.dtype}; expected "
            "integer token ids [rows, seq] with at least 2 tokens (dllm_calibration_dataset or "
            "build_calibration_states make them)."
        )
    vocab = vocabulary_size(model)
    if rows.min().item() < 0 or rows.max().item() >= vocab:
        raise ValueError(
            f"Calibration rows hold ids in [{rows.min().item()}, {rows.max().item()}] but the "
            f"model's vocabulary has {vocab}; tokenize with the model's own tokenizer."
        )


def warn_on_one_state(states: list[torch.Tensor]) -> None:
    """SGAT fits one transform per token state; calibration rows with only one of the two
    leave the other state's fit borrowing the wrong tokens."""
    masked = sum(int(state.sum()) for state in states)
    total = sum(state.numel() for state in states)
    if masked == 0:
        message = ("No calibration row contains the [MASK] token, so the masked-state gates "
                   "are fitted on unmasked tokens")
    elif masked == total:
        message = ("Every calibration token is [MASK], so the unmasked-state gates are fitted "
                   "on masked tokens")
    else:
        return
    logger.warning("%s; calibrate on denoising states (dllm_calibration_dataset) instead.",
                   message)


@contextmanager
def undo_or_mark_unusable(model: PreTrainedModel, blocks_done: set[int],
                          attn_implementation: str, mask_state: MaskState | None = None
                          ) -> Iterator[None]:
    """If quantization fails inside: with no block quantized yet, restore what the setup
    changed (the ``mask_state`` hook, the attention implementation, given as it was before)
    so the model is the FP one again; otherwise mark the model unusable (``mark_unusable``: it
    refuses to run or be saved), since undoing earlier blocks would need a full FP copy."""
    try:
        yield
    except BaseException as error:
        if blocks_done:
            mark_unusable(model, f"STaR-Quant stopped after quantizing decoder blocks "
                                 f"{sorted(blocks_done)} ({type(error).__name__}: {error})")
        else:
            if mask_state is not None:
                mask_state.detach()
            model.config._attn_implementation = attn_implementation
        raise
