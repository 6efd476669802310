"""Measurements behind ``starquant inspect``: pure functions of models and token ids, no
plotting, so they can be tested and reused (e.g. on a stress variant of a model).

* ``activation_profiles``: per decoder block and linear group, the per-channel RMS of the
  group's input over masked and over unmasked tokens, the two token states whose different
  activation statistics SGAT gives separate transforms.
* ``denoising_errors``: relative error of the last block's hidden states against the FP
  model at every step of a real sampler run: on the FP model's own canvases (the error each
  step adds) and on each model's own trajectory (the error that accumulates as its choices
  drift), with the share of generated tokens that differ from FP's; TAC targets the second.
* ``linear_group_errors``: relative output error of every linear group inside a full
  forward (error carried in from earlier blocks included), to compare methods layer by layer.

Relative error is ``||y - y_fp||_F / ||y_fp||_F`` throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from starquant_plugin.method.transforms import hadamard
from starquant_plugin.models.families import DLLMFamily, decoder_blocks, family_of, mask_token_id
from starquant_plugin.models.sampling import dream_generate, llada_generate


def group_name(group: tuple[str, ...]) -> str:
    """``("q_proj", "k_proj", "v_proj")`` -> ``"q_proj/k_proj/v_proj"`` (input of the group)."""
    return "/".join(name.split(".")[-1] for name in group)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(
        1e-12)).item()


@contextmanager
def _capture(modules: dict[str, nn.Module], inputs: bool) -> Iterator[dict[str, list]]:
    """Record each module's first input (``inputs``) or output per call, by name."""
    records: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        if inputs:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: records[name].append(args[0].detach())))
        else:
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, name=name: records[name].append(
                    (out[0] if isinstance(out, tuple) else out).detach())))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _group_inputs(model: PreTrainedModel, family: DLLMFamily,
                  blocks: list[int]) -> dict[str, nn.Module]:
    """``"<block>:<group>"`` -> the group's first linear (all members read its input)."""
    modules = decoder_blocks(model, family)
    return {f"{index}:{group_name(group)}": modules[index].get_submodule(group[0])
            for index in blocks for group in family.linear_groups}


@dataclass
class ChannelProfile:
    """Per-channel RMS of one linear group's input, by token state. masked/unmasked: [d]."""

    masked: torch.Tensor
    unmasked: torch.Tensor

    @property
    def norm_ratio(self) -> float:
        """Overall RMS of masked tokens over that of unmasked tokens."""
        return (self.masked.norm() / self.unmasked.norm().clamp_min(1e-12)).item()

    def channel_ratios(self) -> torch.Tensor:
        """Per channel, masked RMS over unmasked RMS: what the grid's two curves show, where
        ``norm_ratio`` pools every channel (and is near 1 whenever a few large channels of
        each state balance)."""
        return self.masked / self.unmasked.clamp_min(1e-12)

    @property
    def profile_distance(self) -> float:
        """``1 - cos`` between the two channel profiles: 0 when masked and unmasked tokens
        load the same channels in the same proportions."""
        cosine = torch.nn.functional.cosine_similarity(self.masked, self.unmasked, dim=0)
        return 1.0 - cosine.item()


@torch.no_grad()
def activation_profiles(model: PreTrainedModel, rows: torch.LongTensor,
                        blocks: list[int] | None = None, batch_size: int = 8
                        ) -> dict[str, ChannelProfile]:
    """Per ``"<block>:<group>"`` the per-channel RMS of the group's input over masked and
    unmasked tokens. rows: [n, seq] token ids containing ``[MASK]`` (denoising states)."""
    family = family_of(model)
    mask_id = mask_token_id(model)
    blocks = list(range(len(decoder_blocks(model, family)))) if blocks is None else blocks
    modules = _group_inputs(model, family, blocks)
    sums = {name: {True: 0.0, False: 0.0} for name in modules}
    counts = {True: 0, False: 0}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        state = (batch == mask_id).reshape(-1)
        with _capture(modules, inputs=True) as records:
            model(batch)
        for name, (x,) in records.items():
            squares = x.float().reshape(-1, x.shape[-1]).square()
            for masked in (True, False):
                sums[name][masked] = sums[name][masked] + squares[state == masked].sum(0)
        counts[True] += int(state.sum())
        counts[False] += int((~state).sum())
    if not counts[True] or not counts[False]:
        raise ValueError(f"The rows hold {counts[True]} masked and {counts[False]} unmasked "
                         "tokens; both states are needed to compare them (mask some tokens).")
    return {name: ChannelProfile(masked=(s[True] / counts[True]).sqrt(),
                                 unmasked=(s[False] / counts[False]).sqrt())
            for name, s in sums.items()}


@dataclass
class DenoisingErrors:
    """Per sampler step (the canvas before the step), for one model against FP.

    teacher_forced: relative error of the last block's hidden states on FP's own canvas.
    free_running: the same on this model's own trajectory (its earlier choices included).
    token_disagreement: share of generated positions whose token (or mask) differs from FP's
    canvas at that step.
    """

    teacher_forced: list[float] = field(default_factory=list)
    free_running: list[float] = field(default_factory=list)
    token_disagreement: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SamplerSettings:
    """One sampler run: ``steps`` over ``gen_length`` tokens (LLaDA in ``block_length``
    blocks, Dream with the ``entropy`` rule), greedy."""

    steps: int = 64
    gen_length: int = 64
    block_length: int = 32

    def canvases(self, model: PreTrainedModel, prompts: torch.LongTensor
                 ) -> list[torch.LongTensor]:
        """The canvas [batch, prompt + gen_length] before every step."""
        if family_of(model).name == "dream":
            return dream_generate(model, prompts, steps=self.steps, gen_length=self.gen_length,
                                  alg="entropy", return_canvases=True).canvases
        return llada_generate(model, prompts, steps=self.steps, gen_length=self.gen_length,
                              block_length=min(self.block_length, self.gen_length),
                              return_canvases=True).canvases


def _last_block(model: PreTrainedModel) -> nn.Module:
    return decoder_blocks(model, family_of(model))[-1]


@contextmanager
def _ticks(model: PreTrainedModel, progress: tqdm) -> Iterator[None]:
    """One ``progress`` tick per forward of ``model`` inside the context."""
    def tick(*_) -> None:  # a forward hook's return value would replace the output
        progress.update()

    handle = _last_block(model).register_forward_hook(tick)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _last_block_outputs(model: PreTrainedModel, progress: tqdm
                        ) -> Iterator[list[torch.Tensor]]:
    """The last decoder block's hidden states of every forward of ``model`` inside the
    context, ticking ``progress``."""
    with _capture({"last": _last_block(model)}, inputs=False) as records, _ticks(model,
                                                                                 progress):
        yield records["last"]


def _hidden_on(model: PreTrainedModel, canvases: list[torch.LongTensor], batch_rows: int,
               progress: tqdm) -> list[torch.Tensor]:
    """The last block's hidden states on each canvas [batch, seq], all canvases stacked into
    forwards of ``batch_rows`` rows (many small forwards cost more than a few large ones on a
    CPU; each row's result does not depend on the others)."""
    stacked = torch.cat(canvases)
    with _last_block_outputs(model, progress) as outputs:
        for start in range(0, len(stacked), batch_rows):
            model(stacked[start:start + batch_rows])
    return list(torch.cat(outputs).split([len(canvas) for canvas in canvases]))


def _sampler_forwards(settings: SamplerSettings, prompts: torch.LongTensor,
                      batch_rows: int) -> int:
    """Forwards one model makes in ``denoising_errors``: a sampler step each, then the
    stacked canvases (for the bar's total)."""
    return settings.steps + -(-settings.steps * len(prompts) // batch_rows)


@torch.no_grad()
def denoising_errors(fp_model: PreTrainedModel, models: dict[str, PreTrainedModel],
                     prompts: torch.LongTensor, settings: SamplerSettings,
                     batch_rows: int = 32, progress: bool = True
                     ) -> dict[str, DenoisingErrors]:
    """``DenoisingErrors`` of each of ``models`` against ``fp_model`` over one sampler run.
    prompts: [batch, prompt] token ids.

    Each model's own trajectory is scored by the forwards its sampler makes anyway (the
    canvas before a step is what that step's forward reads); the FP canvases are scored in
    stacked forwards of ``batch_rows`` rows, the same way for every model, so a model scores
    exactly 0 against itself."""
    per_model = _sampler_forwards(settings, prompts, batch_rows)
    bar = tqdm(total=per_model * (len(models) + 1), desc="denoising run (forwards)",
               disable=not progress)
    with bar:
        with _ticks(fp_model, bar):
            fp_canvases = settings.canvases(fp_model, prompts)
        fp_hidden = _hidden_on(fp_model, fp_canvases, batch_rows, bar)
        prompt_len = prompts.shape[1]
        results = {}
        for name, model in models.items():
            bar.set_postfix_str(name)
            with _last_block_outputs(model, bar) as own_hidden:
                own = settings.canvases(model, prompts)
            teacher_forced = _hidden_on(model, fp_canvases, batch_rows, bar)
            errors = DenoisingErrors()
            for canvas, hidden, own_canvas, forced, free in zip(
                    fp_canvases, fp_hidden, own, teacher_forced, own_hidden, strict=True):
                errors.teacher_forced.append(relative_error(forced, hidden))
                errors.free_running.append(relative_error(free, hidden))
                differs = own_canvas[:, prompt_len:] != canvas[:, prompt_len:]
                errors.token_disagreement.append(differs.float().mean().item())
            results[name] = errors
    return results


def _group_outputs(model: PreTrainedModel, family: DLLMFamily, batch: torch.LongTensor
                   ) -> dict[str, list[torch.Tensor]]:
    """One forward of ``batch``: per ``"<block>:<group>"`` its linears' outputs, in the FP
    model's basis: a block quantized with ``kv_rotation`` writes V rotated per head by the
    Hadamard ``H`` (folded into ``v_proj``), so its V is rotated back (``H H = I``)."""
    blocks = decoder_blocks(model, family)
    modules = {f"{i}:{group_name(group)}|{linear}": block.get_submodule(linear)
               for i, block in enumerate(blocks)
               for group in family.linear_groups for linear in group}
    value = next(writer for writer, readers in family.scale_pairs
                 if readers == (family.attention_output,))
    with _capture(modules, inputs=False) as records:
        model(batch)
    grouped: dict[str, list[torch.Tensor]] = {}
    for key, (output,) in records.items():
        output = output.float()
        index, linear = int(key.split(":")[0]), key.split("|")[1]
        attention = blocks[index].get_submodule(family.attention_module)
        if linear == value and getattr(attention, "k_rotation", False):
            h = hadamard(attention.head_dim).to(output.device)
            output = (output.unflatten(-1, (-1, attention.head_dim)) @ h).flatten(-2)
        grouped.setdefault(key.split("|")[0], []).append(output)
    return grouped


@torch.no_grad()
def linear_group_errors(fp_model: PreTrainedModel, models: dict[str, PreTrainedModel],
                        rows: torch.LongTensor, batch_size: int = 8, progress: bool = True
                        ) -> dict[str, dict[str, float]]:
    """Per model, per ``"<block>:<group>"``, the relative error of the group's outputs (all
    its linears, all rows) against the FP model's, both run on ``rows`` [n, seq]."""
    family = family_of(fp_model)
    squared_error = {name: {} for name in models}
    squared_norm: dict[str, float] = {}
    starts = range(0, len(rows), batch_size)
    with tqdm(total=len(starts) * (len(models) + 1), desc="per-layer errors (forwards)",
              disable=not progress) as bar:
        for start in starts:
            batch = rows[start:start + batch_size]
            reference = _group_outputs(fp_model, family, batch)
            bar.update()
            for key, outputs in reference.items():
                squared_norm[key] = squared_norm.get(key, 0.0) + sum(
                    y.square().sum().item() for y in outputs)
            for name, model in models.items():
                for key, outputs in _group_outputs(model, family, batch).items():
                    squared_error[name][key] = squared_error[name].get(key, 0.0) + sum(
                        (y - y_fp).square().sum().item()
                        for y, y_fp in zip(outputs, reference[key], strict=True))
                bar.update()
    return {name: {key: (error / max(squared_norm[key], 1e-24)) ** 0.5
                   for key, error in errors.items()}
            for name, errors in squared_error.items()}
