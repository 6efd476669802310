"""``STaRQuantModifier``: STaR-Quant as an llm-compressor modifier for ``oneshot``.

The modifier is glue only: it records what the sequential pipeline feeds each decoder block
and hands it to ``starquant_plugin.pipeline.quantize_block``, the same per-block function the
core path (``quantize_dllm``) runs, so both produce the same model for the same rows and seed.

It does not mix in llm-compressor's ``QuantizationMixin``: that attaches compressed-tensors
schemes, observers and fake-quant forwards to every targeted ``Linear``, while STaR-Quant
replaces those linears by ``StarQuantLinear``s whose activation quantization depends on the
token state, so the wrappers would double-quantize and then be thrown away.
"""

import copy
import os
import sys
import time
from contextlib import ExitStack

import torch
from compressed_tensors.offload import (
    disable_onloading,
    get_cache_init_kwargs,
    offload_module,
    remove_dispatch,
)
from compressed_tensors.offload.cache import OffloadCache
from compressed_tensors.utils import match_named_modules, patch_attr
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from pydantic import ConfigDict, PrivateAttr
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.format import attach_quantization_config
from starquant_plugin.integrations.saving import bind_save_pretrained
from starquant_plugin.method import MaskState, attach_mask_state
from starquant_plugin.models.attention import (
    register_kv_quantized_attention,
    use_kv_quantized_attention,
)
from starquant_plugin.models.families import (
    DLLMFamily,
    decoder_blocks,
    family_of,
    mask_token_id,
)
from starquant_plugin.pipeline import (
    QuantizationReport,
    quantize_block,
    run_block,
    with_hidden,
)
from starquant_plugin.safeguards import (
    undo_or_mark_unusable,
    validate_for_model,
    warn_on_one_state,
)

BlockInputs = dict[int, tuple[tuple, dict]]  # batch index -> the block's (args, kwargs)


def _oneshot_recipe_source() -> str | os.PathLike | None:
    """The ``recipe`` argument (file path or YAML text) of the ``oneshot`` call this modifier
    runs in, so the saved recipe keeps the user's file as written; llm-compressor hands the
    modifier only the parsed Recipe, so it is read off the calling ``Oneshot`` (None when the
    modifier runs outside one or was given Recipe objects)."""
    from llmcompressor.entrypoints.oneshot import Oneshot

    frame = sys._getframe(1)
    while frame is not None:
        caller = frame.f_locals.get("self")
        if isinstance(caller, Oneshot):
            source = caller.recipe
            return source if isinstance(source, str | os.PathLike) else None
        frame = frame.f_back
    return None


class STaRQuantModifier(Modifier, StarQuantArgs):
    """STaR-Quant (state-gated affine transforms + TAC) on a LLaDA or Dream model.

    The fields are ``StarQuantArgs``'s (inherited, so the schema exists once) plus
    ``targets``/``ignore``. Calibrate on rows of masked denoising states of equal length
    (``integrations.calibration_dataset.dllm_calibration_dataset``). Example recipe::

        starquant_stage:
          quantization_modifiers:
            STaRQuantModifier:
              scheme: W4A4
              epochs: 15
              ignore: ['model.transformer.ff_out']

    :param targets: linears to quantize (names, ``re:`` patterns or class names); default
        every linear of the decoder blocks (LLaDA ``'re:model\\.transformer\\.blocks\\.\\d+\\.'``,
        Dream ``'re:model\\.layers\\.\\d+\\.'``). Linears that share one transform (q/k/v,
        gate/up) must be targeted together.
    :param ignore: linears to keep in 16 bit; default the LM head (LLaDA
        ``model.transformer.ff_out`` — beware ``'re:.*ff_out$'``, which also matches every
        block's MLP output — Dream ``lm_head``).

    In the sequential pipeline each decoder block is fitted in ``on_sequential_epoch_end``
    from the inputs the quantized blocks before it produced; the FP chain (TAC's target) is
    carried alongside, so memory is about two layers' activations. The pipeline's propagation
    pass then runs the new ``StarQuantLinear``s. With ``propagate_error=False`` blocks are fed
    FP outputs instead (a documented difference from the core path). Under compressed-tensors
    offloading (a model bigger than the device, docs/recipes.md) the block is the one onloaded
    block, and its quantized linears are offloaded where its linears were.
    """

    model_config = ConfigDict(extra="forbid", frozen=False)

    requires_calibration_data: bool = True
    targets: str | list[str] | None = None
    ignore: list[str] | None = None

    _args: StarQuantArgs | None = PrivateAttr(None)
    _family: DLLMFamily | None = PrivateAttr(None)
    _blocks: list[nn.Module] = PrivateAttr(default_factory=list)
    _groups: dict[int, tuple[tuple[str, ...], ...]] = PrivateAttr(default_factory=dict)
    _mask_state: MaskState | None = PrivateAttr(None)
    _states: dict[int, torch.Tensor] = PrivateAttr(default_factory=dict)
    _inputs: dict[int, BlockInputs] = PrivateAttr(default_factory=dict)
    _fp_hidden: list[torch.Tensor] | None = PrivateAttr(None)
    _done: set[int] = PrivateAttr(default_factory=set)
    _quantized: set[int] = PrivateAttr(default_factory=set)
    _propagation_handles: list[RemovableHandle] = PrivateAttr(default_factory=list)
    _attn_implementation: str = PrivateAttr("sdpa")
    _original_attn_implementation: str = PrivateAttr("sdpa")
    _report: QuantizationReport | None = PrivateAttr(None)
    _progress: tqdm | None = PrivateAttr(None)
    _start_time: float = PrivateAttr(0.0)

    def starquant_args(self) -> StarQuantArgs:
        """This modifier's knobs as the one schema the core path, checkpoint and loaders read."""
        return StarQuantArgs(**{name: getattr(self, name) for name in StarQuantArgs.model_fields})

    @property
    def report(self) -> QuantizationReport | None:
        """Per linear group residuals and fit losses, filled as blocks are quantized."""
        return self._report

    # lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        """Check everything that can be checked, then hook the model (nothing before)."""
        model = state.model
        if state.data is None or state.data.calib is None:
            raise ValueError(
                "STaRQuantModifier got no calibration data; it fits every block on denoising "
                "states. Pass dataset= to oneshot (see dllm_calibration_dataset)."
            )
        family = family_of(model)
        mask_id = mask_token_id(model)
        self._args, self._family = self.starquant_args(), family
        self._blocks = decoder_blocks(model, family)
        self._groups = resolve_block_groups(model, family, self._blocks, self.targets,
                                            self.ignore)
        validate_for_model(model, self._args, family, self._groups)
        self._report = QuantizationReport(args=self._args)
        self._original_attn_implementation = model.config._attn_implementation
        # Blocks run with it while they are fitted; the model switches to it at finalize (the
        # sequential pipeline restores the implementation it found when it ends).
        self._attn_implementation = (register_kv_quantized_attention()
                                     if self._args.resolved_kv_bits < 16
                                     else self._original_attn_implementation)
        embedding = model.get_input_embeddings()
        # Stays after finalize: the StarQuantLinears read the token state it records.
        self._mask_state = attach_mask_state(embedding, mask_id)
        self.register_hook(embedding, self._record_state_hook(mask_id), "forward_pre",
                           with_kwargs=True)
        for index, block in enumerate(self._blocks):
            self.register_hook(block, self._record_inputs_hook(index), "forward_pre",
                               with_kwargs=True)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._start_time = time.time()
        self._progress = tqdm(total=len(self._blocks), desc="STaR-Quant blocks")

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        self._remove_propagation_hooks()
        members = {id(module) for module in modules or ()}
        indices = [i for i, block in enumerate(self._blocks) if id(block) in members]
        if not indices:
            return
        q_hidden = None  # set when one subgraph holds several blocks
        with (undo_or_mark_unusable(state.model, self._quantized,
                                    self._original_attn_implementation, self._mask_state),
              HooksMixin.disable_hooks(), self._block_attention(state.model)):
            try:
                for position, index in enumerate(indices):
                    q_hidden = self._process_block(index, q_hidden,
                                                   need_outputs=position < len(indices) - 1)
            except BaseException:
                self.remove_hooks()
                raise
        self._add_propagation_hooks(state.model, [self._blocks[i] for i in indices])

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._remove_propagation_hooks()
        self.remove_hooks()
        if self._progress is not None:
            self._progress.close()
        if self._report is not None:
            self._report.seconds = time.time() - self._start_time
        missing = [i for i in range(len(self._blocks)) if i not in self._done]
        if missing:
            with undo_or_mark_unusable(state.model, self._quantized,
                                       self._original_attn_implementation, self._mask_state):
                raise RuntimeError(
                    f"STaRQuantModifier quantized decoder blocks {sorted(self._done)} but not "
                    f"{missing}: it needs the sequential pipeline with the decoder blocks "
                    f"({self._family.block_class}) as sequential targets. Drop pipeline= and "
                    "sequential_targets= overrides from the oneshot call."
                )

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_calibration_end(state, None)
        if self._args.resolved_kv_bits < 16:
            use_kv_quantized_attention(state.model)
        attach_quantization_config(state.model, self._args)
        # model.save_pretrained (and oneshot's output_dir) now write a STaR-Quant checkpoint
        # with this recipe; llm-compressor's own wrapper would drop quantization_config.
        recipe = active_session().lifecycle.recipe
        if recipe is not None:
            from starquant_plugin.integrations.llmcompressor.recipe import recipe_that_ran

            recipe = recipe_that_ran(recipe, _oneshot_recipe_source())
        bind_save_pretrained(state.model, recipe=recipe)
        self._states.clear()
        self._inputs.clear()
        self._fp_hidden = None
        return True

    # per block

    def _process_block(self, index: int, q_hidden: list[torch.Tensor] | None,
                       need_outputs: bool) -> list[torch.Tensor] | None:
        """Quantize block ``index`` (if targeted) and advance the FP chain.

        q_hidden: the quantized previous block's outputs when it ran in the same subgraph (its
        recorded inputs came from the FP block); returns this block's, if ``need_outputs``.
        """
        block, inputs = self._blocks[index], self._inputs.pop(index, None)
        if not inputs or sorted(inputs) != sorted(self._states):
            raise RuntimeError(
                f"Decoder block {index} saw batches {sorted(inputs or {})}, but the embedding "
                f"saw {sorted(self._states)}; the model must be called with input_ids (no "
                "inputs_embeds) and every batch must reach every block."
            )
        batches = sorted(inputs)
        states = [self._states[b] for b in batches]
        if index == 0:
            warn_on_one_state(states)
        q_inputs = [inputs[b] for b in batches]
        if q_hidden is not None:
            q_inputs = with_hidden(q_inputs, q_hidden)
        fp_inputs = q_inputs if self._fp_hidden is None else with_hidden(q_inputs,
                                                                         self._fp_hidden)
        fp_block = fp_copy(block)
        if self._groups.get(index):
            offloading = offloading_of(block, self._groups[index])
            quantize_block(block, fp_block, q_inputs, fp_inputs, states, self._mask_state,
                           self._args, self._family, self._report, index, self._groups[index])
            offload_like(block, offloading)
            self._quantized.add(index)
        self._fp_hidden = run_block(fp_block, fp_inputs, states, self._mask_state)
        self._done.add(index)
        self._progress.update(1)
        return run_block(block, q_inputs, states, self._mask_state) if need_outputs else None

    # hooks

    def _record_state_hook(self, mask_id: int):
        def record_state(_module, args, kwargs):
            input_ids = args[0] if args else kwargs.get("input")
            if isinstance(input_ids, torch.Tensor) and not isinstance(input_ids, torch.fx.Proxy):
                batch = active_session().state.current_batch_idx
                self._states[batch] = (input_ids == mask_id).detach()

        return record_state

    def _record_inputs_hook(self, index: int):
        def record_inputs(_module, args, kwargs):
            batch = active_session().state.current_batch_idx
            self._inputs.setdefault(index, {})[batch] = (args, kwargs)

        return record_inputs

    def _block_attention(self, model: nn.Module):
        """Run blocks with the attention the core path uses (K/V-quantized at W4A4); the
        pipeline forces eager attention during calibration."""
        return patch_attr(model.config, "_attn_implementation", self._attn_implementation)

    def _add_propagation_hooks(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        """During the pipeline's propagation pass (where modifier hooks are disabled and
        ``current_batch_idx`` is not updated) feed the quantized blocks batch ``k``'s token
        state on their ``k``-th call, under the core path's attention implementation."""
        states = [self._states[b] for b in sorted(self._states)]
        calls, patches = [0], ExitStack()

        def enter(_module, _args):
            self._mask_state.mask_state = states[calls[0] % len(states)]
            calls[0] += 1
            patches.enter_context(self._block_attention(model))

        def leave(_module, _args, _output):
            patches.close()

        self._propagation_handles = [blocks[0].register_forward_pre_hook(enter),
                                     blocks[-1].register_forward_hook(leave)]

    def _remove_propagation_hooks(self) -> None:
        for handle in self._propagation_handles:
            handle.remove()
        self._propagation_handles = []


def fp_copy(block: nn.Module) -> nn.Module:
    """An unmodified, not offloaded copy of ``block`` for the FP chain, its tensors on the
    block's execution device.

    ``copy.deepcopy`` of a block under compressed-tensors offloading copies the caches'
    handles, which the copy cannot onload (a disk cache finds a tensor's file by the original
    handle, so the copy fails with a KeyError). So copy the structure without onloading, drop
    the copy's offloading, and give it copies of the block's onloaded tensors (copies: the
    K/V folds change the block's weights in place)."""
    with disable_onloading():
        twin = copy.deepcopy(block)
    remove_dispatch(twin)
    for original, copied in zip(block.modules(), twin.modules(), strict=True):
        if isinstance(original._parameters, OffloadCache):
            for name, tensor in original._parameters.items():
                copied._parameters[name] = copy.deepcopy(tensor)
            for name, tensor in original._buffers.items():
                copied._buffers[name] = copy.deepcopy(tensor)
    return twin


def offloading_of(block: nn.Module, groups: tuple[tuple[str, ...], ...]
                  ) -> dict[str, dict]:
    """The compressed-tensors offload settings (``offload_module`` kwargs) of the offloaded
    linears in ``groups``, read before ``quantize_block`` replaces them."""
    linears = {name: block.get_submodule(name) for group in groups for name in group}
    return {name: get_cache_init_kwargs(linear) for name, linear in linears.items()
            if isinstance(linear._parameters, OffloadCache)}


def offload_like(block: nn.Module, offloading: dict[str, dict]) -> None:
    """Offload each ``StarQuantLinear`` (with its input transform) the way the linear it
    replaced was (``offloading_of``).

    The replacements are built from onloaded weights, so they sit on the onload device; left
    there, a model bigger than the device would collect every quantized block on it."""
    for name, kwargs in offloading.items():
        for module in block.get_submodule(name).modules():
            if not isinstance(module._parameters, OffloadCache):
                offload_module(module, **kwargs)


def resolve_block_groups(
    model: nn.Module, family: DLLMFamily, blocks: list[nn.Module],
    targets: str | list[str] | None, ignore: list[str] | None,
) -> dict[int, tuple[tuple[str, ...], ...]]:
    """Which linear groups of each block ``targets`` minus ``ignore`` select.

    Defaults: every linear of the decoder blocks, ignoring the LM head. Raises when nothing
    matches, when a group is only partly targeted, or when a non-block linear other than
    the LM head is targeted; warns when the LM head is targeted (it stays 16 bit).
    """
    targets = [f"re:{family.block_pattern}"] if targets is None else targets
    targets = [targets] if isinstance(targets, str) else list(targets)
    ignore = [family.lm_head] if ignore is None else list(ignore)
    matched = {name for name, module in match_named_modules(model, targets, ignore)
               if isinstance(module, nn.Linear)}
    block_names = {id(module): name for name, module in model.named_modules()}
    groups: dict[int, tuple[tuple[str, ...], ...]] = {}
    for index, block in enumerate(blocks):
        prefix = block_names[id(block)]
        chosen = []
        for group in family.linear_groups:
            names = [f"{prefix}.{linear}" for linear in group]
            hits = [name for name in names if name in matched]
            if hits and len(hits) < len(names):
                raise ValueError(
                    f"targets/ignore select {hits} but not "
                    f"{sorted(set(names) - set(hits))}: these linears share one STaR "
                    "transform, so target all of them or none."
                )
            if hits:
                chosen.append(group)
            matched -= set(names)
        groups[index] = tuple(chosen)
    if family.lm_head in matched:
        logger.warning(
            f"targets {targets} match the LM head {family.lm_head!r} and ignore {ignore} does "
            f"not exclude it; STaR-Quant keeps the LM head in 16 bit, so it is left as is. "
            f"Add {family.lm_head!r} to ignore to silence this."
        )
        matched.discard(family.lm_head)
    if matched:
        raise ValueError(
            f"targets select linears outside the decoder blocks' groups: {sorted(matched)}; "
            f"STaR-Quant fits only {[list(g) for g in family.linear_groups]} inside each "
            f"{family.block_class}. Add them to ignore."
        )
    if not any(groups.values()):
        example = f"{block_names[id(blocks[0])]}.{family.linear_groups[0][0]}"
        raise ValueError(
            f"STaRQuantModifier targets {targets} (ignore {ignore}) match no decoder-block "
            f"linear of {type(model).__name__}, e.g. {example!r}. Fix targets, or leave them "
            f"unset for the {family.name} default ['re:{family.block_pattern}']."
        )
    return groups
