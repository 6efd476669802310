"""The STaR-Quant modifiers for ``oneshot`` recipes: ``STaRQuantModifier`` (the whole method
in one line), ``SGATModifier`` (the state-gated transforms and the quantization of the
targeted linears; the baselines are presets of it) and ``TACModifier`` (the attention-output
correction, stacked after either).

They are glue only: a block modifier records what the sequential pipeline feeds each decoder
block and hands it to ``starquant_plugin.pipeline.quantize_block``, the same per-block function
the core path (``quantize_dllm``) runs, so both produce the same model for the same rows and
seed. TAC sits inside a block, between the attention and its output projection, whose
transform is fitted on TAC-corrected inputs; so a ``TACModifier`` joins the block pass of the
block modifier before it, and ``SGATModifier`` + ``TACModifier`` run exactly what
``STaRQuantModifier`` runs.

They do not mix in llm-compressor's ``QuantizationMixin``: that attaches compressed-tensors
schemes, observers and fake-quant forwards to every targeted ``Linear``, while STaR-Quant
replaces those linears by ``StarQuantLinear``s whose activation quantization depends on the
token state, so the wrappers would double-quantize and then be thrown away.
"""

import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack

import torch
from compressed_tensors.utils import patch_attr
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization import QuantizationMixin
from llmcompressor.modifiers.utils.hooks import HooksMixin
from pydantic import ConfigDict, PrivateAttr
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from starquant_plugin.config import SGATArgs, StarQuantArgs, TACArgs
from starquant_plugin.integrations.format import attach_quantization_config
from starquant_plugin.integrations.llmcompressor.offloading import (
    fp_copy,
    offload_like,
    offloading_of,
)
from starquant_plugin.integrations.llmcompressor.targets import resolve_block_groups
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


class DecoderBlockModifier(Modifier):
    """What ``STaRQuantModifier`` and ``SGATModifier`` share: fit each decoder block in the
    sequential pipeline with ``quantize_block`` (and the TAC of a ``TACModifier`` that follows
    in the recipe), carrying the FP chain alongside.

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

    requires_calibration_data: bool = True
    targets: str | list[str] | None = None
    ignore: list[str] | None = None

    _tac: TACArgs | None = PrivateAttr(None)
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

    def own_args(self) -> dict:
        """This modifier's own knobs, as ``StarQuantArgs`` fields."""
        raise NotImplementedError

    def starquant_args(self) -> StarQuantArgs:
        """The one schema the core path, checkpoint and loaders read: this modifier's knobs,
        with TAC's from the ``TACModifier`` that joined it (known once initialized)."""
        joined = {} if self._tac is None else {"tac": True, **self._tac.model_dump()}
        return StarQuantArgs(**(self.own_args() | joined))

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
                f"{type(self).__name__} got no calibration data; it fits every block on "
                "denoising states. Pass dataset= to oneshot (see dllm_calibration_dataset)."
            )
        tac = check_composition(active_session().lifecycle.recipe.modifiers)
        self._tac = None if tac is None else TACArgs(**tac.model_dump(
            include=set(TACArgs.model_fields)))
        family = family_of(model)
        mask_id = mask_token_id(model)
        self._args, self._family = self.starquant_args(), family
        self._blocks = decoder_blocks(model, family)
        self._groups = resolve_block_groups(model, family, self._blocks, self.targets,
                                            self.ignore)
        if tac is not None and not any((family.attention_output,) in groups
                                       for groups in self._groups.values()):
            raise ValueError(
                f"TACModifier corrects the attention output that {type(self).__name__} "
                f"quantizes, but its targets/ignore keep every {family.attention_output} in "
                "16 bit. Target the attention output projections, or drop TACModifier."
            )
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
                    f"{type(self).__name__} quantized decoder blocks {sorted(self._done)} but not "
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


class STaRQuantModifier(DecoderBlockModifier, StarQuantArgs):
    """STaR-Quant (state-gated affine transforms + TAC) on a LLaDA or Dream model, in one
    modifier; exactly ``SGATModifier`` then ``TACModifier`` with the same fields.

    The fields are ``StarQuantArgs``'s (inherited, so the schema exists once) plus
    ``targets``/``ignore`` (``DecoderBlockModifier``). Calibrate on rows of masked denoising
    states of equal length (``integrations.calibration_dataset.dllm_calibration_dataset``).
    Example recipe::

        starquant_stage:
          quantization_modifiers:
            STaRQuantModifier:
              scheme: W4A4
              epochs: 15
              ignore: ['model.transformer.ff_out']
    """

    model_config = ConfigDict(extra="forbid", frozen=False)

    def own_args(self) -> dict:
        return {name: getattr(self, name) for name in StarQuantArgs.model_fields}


class SGATModifier(DecoderBlockModifier, SGATArgs):
    """SGAT: the (state-gated) input transforms and the quantization of the targeted linears,
    without TAC unless a ``TACModifier`` follows it. Its fields are ``SGATArgs``'s plus
    ``targets``/``ignore``; the baselines are presets of them (``config.METHODS``: RTN is
    ``transform: identity, state_gating: false, kv_rotation: false, k_smoothing: 0``)::

        sgat_stage:
          quantization_modifiers:
            SGATModifier: {scheme: W4A4, weight_quantizer: gptq}
    """

    model_config = ConfigDict(extra="forbid", frozen=False)

    def own_args(self) -> dict:
        return {name: getattr(self, name) for name in SGATArgs.model_fields} | {"tac": False}


class TACModifier(Modifier, TACArgs):
    """TAC: the block-diagonal affine correction of the attention output, fitted in closed form
    against the FP model, on the blocks whose attention output an earlier ``SGATModifier`` (or
    ``STaRQuantModifier`` with ``tac: false``) of the same recipe quantizes. Its fields are
    ``TACArgs``'s::

        starquant_stage:
          quantization_modifiers:
            SGATModifier: {scheme: W4A4, transform: identity, state_gating: false}
            TACModifier: {tac_shrinkage: auto}

    The fit runs inside that modifier's block pass (the output projection's transform is
    fitted on the corrected inputs), so this modifier only checks the recipe and hands over
    its fields; its tensors are stored with the output projection's input transform.
    """

    model_config = ConfigDict(extra="forbid", frozen=False)

    def on_initialize(self, state: State, **kwargs) -> bool:
        check_composition(active_session().lifecycle.recipe.modifiers)
        return True


def check_composition(modifiers: Sequence[Modifier]) -> TACModifier | None:
    """Refuse a recipe whose STaR-Quant modifiers do not stack, before any of them changes the
    model; return the ``TACModifier`` that joins the block modifier, if any.

    Stacks: one block modifier (``STaRQuantModifier`` or ``SGATModifier``), optionally followed
    by one ``TACModifier`` (then the block modifier must not fit TAC itself), next to
    llm-compressor modifiers that do not quantize (e.g. ``SmoothQuantModifier``).
    """
    names = [type(modifier).__name__ for modifier in modifiers]
    blocks = [i for i, m in enumerate(modifiers) if isinstance(m, DecoderBlockModifier)]
    tacs = [i for i, m in enumerate(modifiers) if isinstance(m, TACModifier)]
    foreign = [names[i] for i, m in enumerate(modifiers) if isinstance(m, QuantizationMixin)]
    if not blocks and not tacs:
        return None
    if len(blocks) > 1:
        raise ValueError(
            f"The recipe holds {[names[i] for i in blocks]}; a second would re-quantize the "
            "linears the first replaced (and carry a wrong FP chain). Keep one "
            "STaRQuantModifier or SGATModifier per recipe; choose linears by targets/ignore."
        )
    if len(tacs) > 1:
        raise ValueError(f"The recipe holds {len(tacs)} TACModifiers; keep one (it corrects "
                         "every quantized attention output).")
    if foreign and tacs and not blocks:
        raise ValueError(
            f"TACModifier follows {foreign[0]}, which writes compressed-tensors linears with no "
            "place for TAC's correction of the attention output. Quantize with SGATModifier "
            "before TACModifier instead; round-to-nearest (RTN) is SGATModifier with "
            "transform: identity, state_gating: false, kv_rotation: false, k_smoothing: 0.0."
        )
    if foreign:
        raise ValueError(
            f"The recipe stacks {foreign[0]} with {names[blocks[0]]}; both quantize the "
            f"decoder blocks' linears. For GPTQ's weights under SGAT's transforms, set "
            f"weight_quantizer: gptq on {names[blocks[0]]} and drop {foreign[0]}."
        )
    if not tacs:
        return None
    if not blocks or tacs[0] < blocks[0]:
        raise ValueError(
            "TACModifier corrects the attention output of blocks an earlier modifier quantized, "
            f"but the recipe's modifiers are {names}. Put SGATModifier (or a baseline preset of "
            "it) before TACModifier."
        )
    block = modifiers[blocks[0]]
    if isinstance(block, STaRQuantModifier) and block.tac:
        raise ValueError(
            "STaRQuantModifier already fits TAC (tac: true), so TACModifier would fit it "
            "twice. Set tac: false on STaRQuantModifier, or use SGATModifier, to stack "
            "TACModifier after it."
        )
    return modifiers[tacs[0]]

