"""lm-evaluation-harness model for diffusion LMs (LLaDA, Dream), FP or STaR-Quant.

lm-eval 0.4.13 has no diffusion adapter, and LLaDA's and Dream's own evaluation code each
register one; this is the same idea on the project's models and samplers:

* ``loglikelihood``: LLaDA's Monte-Carlo ELBO (``elbo_log_likelihood``: ``mc_num`` draws of
  stratified mask counts over the continuation, prompt clean, optional classifier-free
  guidance ``cfg_scale``); lm-eval's ``--batch_size`` is the Monte-Carlo batch. ``is_greedy``
  runs the family's greedy sampler on the context for the continuation's length and compares.
* ``loglikelihood_rolling``: the same ELBO over lm-eval's rolling windows of ``max_length``.
* ``generate_until``: the family's sampler (LLaDA: ``steps``, ``gen_length``,
  ``block_length``, ``remasking``, ``cfg_scale``; Dream: ``steps``, ``gen_length``, ``alg``),
  cut at the first stop string.

Registered as ``starquant``. From the shell, ``starquant lm-eval`` is lm-eval's own command
line with this model registered (lm-eval 0.4.13 has no plugin entry points, so a bare
``lm_eval`` process cannot know it)::

    starquant lm-eval --model starquant \\
        --model_args pretrained=tiny-llada-w4a4,mc_num=32 --tasks piqa --batch_size 16

From Python, ``import starquant_plugin`` is enough: the name is registered as soon as
lm-eval's registry is imported (``simple_evaluate(model="starquant", model_args=...)``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from starquant_plugin.assets import resolve_bundled
from starquant_plugin.integrations import LM_EVAL_MODEL_NAME
from starquant_plugin.models.evaluation import elbo_log_likelihood
from starquant_plugin.models.families import family_of
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.models.sampling import dream_generate, llada_generate

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "steps", "gen_length",
              "block_length", "remasking", "alg", "cfg_scale")
"""``gen_kwargs`` keys a task (or ``--gen_kwargs``) may set; others are refused."""


def _positive(name: str, value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: pass a positive integer.")
    return value


@register_model(LM_EVAL_MODEL_NAME)
class DiffusionLM(LM):
    """A LLaDA or Dream model (FP, or a STaR-Quant checkpoint) for lm-eval.

    :param pretrained: model folder, Hub id, or ``tiny-llada``/``tiny-dream``.
    :param mc_num: Monte-Carlo draws per likelihood (LLaDA uses 128; 1 for single-token
        answers). Must be a multiple of the batch size.
    :param batch_size: Monte-Carlo batch (lm-eval's ``--batch_size``; ``auto`` = 16).
    :param cfg_scale: classifier-free guidance for likelihoods and LLaDA generation (0 = off).
    :param steps, gen_length, block_length, remasking, alg, temperature: sampler settings for
        ``generate_until`` (a request's ``max_gen_toks`` sets ``gen_length`` unless given).
    :param greedy_check: compute ``is_greedy`` for likelihood requests (one sampler run each).
    :param max_length: longest sequence scored; longer contexts are cut from the left.
    """

    def __init__(self, pretrained: str, mc_num: int = 128, batch_size: int | str = 16,
                 cfg_scale: float = 0.0, steps: int = 128, gen_length: int = 128,
                 block_length: int = 32, remasking: str = "low_confidence",
                 alg: str = "entropy", temperature: float = 0.0, greedy_check: bool = True,
                 max_length: int = 4096, dtype: str = "float32", device: str | None = None,
                 seed: int = 0, max_batch_size: Any = None) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; pass one of {sorted(DTYPES)}.")
        self.batch_size = 16 if str(batch_size).startswith("auto") else _positive(
            "batch_size", batch_size)
        self.mc_num = _positive("mc_num", mc_num)
        if self.mc_num % self.batch_size and self.mc_num > self.batch_size:
            raise ValueError(f"mc_num={self.mc_num} is not a multiple of batch_size="
                             f"{self.batch_size}; pick mc_num = a multiple of the batch size.")
        self.mc_batch = min(self.batch_size, self.mc_num)
        self.cfg_scale = float(cfg_scale)
        self.sampler = {"steps": _positive("steps", steps),
                        "gen_length": _positive("gen_length", gen_length),
                        "block_length": _positive("block_length", block_length),
                        "remasking": remasking, "alg": alg, "temperature": float(temperature)}
        self.greedy_check = greedy_check in (True, "True", "true", 1, "1")
        self.max_length = _positive("max_length", max_length)
        self.seed = int(seed)
        self._device = torch.device(device or "cpu")
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's --device defaults to cuda; its own HF model falls back the same way
            logger.warning("device=%s requested but CUDA is not available; running on CPU.",
                           device)
            self._device = torch.device("cpu")
        source = resolve_bundled(pretrained)
        if not Path(source).exists() and str(source).count("/") != 1:
            raise ValueError(f"pretrained={pretrained} does not exist; pass a model folder, a Hub "
                             "id (owner/name) or tiny-llada / tiny-dream.")
        self.model, self.tokenizer = load_dllm(source, dtype=DTYPES[dtype])
        self.model.to(self._device)
        self.family = family_of(self.model)
        self.pretrained = str(pretrained)

    # tokens

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split after tokenizing them together (as lm-eval's
        causal models do); trailing spaces of the context move to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        split = len(context_ids)
        if whole[:split] != context_ids:  # the boundary merged into one token
            return context_ids, self._encode(continuation)
        return context_ids, whole[split:]

    def _tensor(self, ids: list[int]) -> torch.LongTensor:
        return torch.tensor(ids, dtype=torch.long, device=self._device)

    # likelihoods

    def _elbo(self, context_ids: list[int], target_ids: list[int]) -> float:
        keep = max(0, self.max_length - len(target_ids))  # the context's most recent tokens
        context_ids = context_ids[len(context_ids) - keep:] if keep else []
        return elbo_log_likelihood(self.model, self._tensor(context_ids),
                                   self._tensor(target_ids), mc_num=self.mc_num,
                                   batch_size=self.mc_batch, seed=self.seed,
                                   cfg_scale=self.cfg_scale)

    def _is_greedy(self, context_ids: list[int], target_ids: list[int]) -> bool:
        """Would the family's greedy sampler (one token per step) write ``target_ids``?"""
        prompt = self._tensor(context_ids)[None]
        length = len(target_ids)
        if self.family.name == "dream":
            out = dream_generate(self.model, prompt, steps=length, gen_length=length,
                                 alg="maskgit_plus")
        else:
            out = llada_generate(self.model, prompt, steps=length, gen_length=length,
                                 block_length=length, cfg_scale=self.cfg_scale)
        return out.sequences[0, prompt.shape[1]:].tolist() == target_ids

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="ELBO likelihoods", disable=disable_tqdm):
            context, continuation = request.args
            context_ids, target_ids = self._encode_pair(context, continuation)
            if not target_ids:
                raise ValueError(f"The continuation {continuation!r} tokenizes to nothing; "
                                 "the task's doc_to_target/choices must be non-empty text.")
            with torch.no_grad():
                score = self._elbo(context_ids, target_ids)
                greedy = self.greedy_check and self._is_greedy(context_ids, target_ids)
            results.append((score, greedy))
            self.cache_hook.add_partial("loglikelihood", request.args, (score, greedy))
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False
                              ) -> list[float]:
        prefix = self.tokenizer.bos_token_id
        if prefix is None:
            prefix = self.tokenizer.eos_token_id
        results = []
        for request in tqdm(requests, desc="ELBO rolling", disable=disable_tqdm):
            (text,) = request.args
            ids = self._encode(text)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, prefix_token=prefix, max_seq_len=self.max_length, context_len=1)]
            with torch.no_grad():
                score = sum(self._elbo([t for t in context if t is not None], target)
                            for context, target in windows)
            results.append(score)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, score)
        return results

    # generation

    def _settings(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"gen_kwargs {unknown} are not understood by the {self.family.name} "
                             f"sampler; it takes {list(GEN_KWARGS)}.")
        settings = dict(self.sampler)
        if "max_gen_toks" in gen_kwargs and "gen_length" not in gen_kwargs:
            settings["gen_length"] = _positive("max_gen_toks", gen_kwargs["max_gen_toks"])
        for key in ("steps", "gen_length", "block_length", "remasking", "alg", "temperature"):
            if key in gen_kwargs:
                settings[key] = gen_kwargs[key]
        if gen_kwargs.get("do_sample") is False:
            settings["temperature"] = 0.0
        until = gen_kwargs.get("until") or []
        return settings, [until] if isinstance(until, str) else list(until)

    def _generate(self, prompt: torch.LongTensor, settings: dict[str, Any],
                  generator: torch.Generator) -> list[int]:
        if self.family.name == "dream":
            out = dream_generate(self.model, prompt, steps=int(settings["steps"]),
                                 gen_length=int(settings["gen_length"]),
                                 temperature=float(settings["temperature"]),
                                 alg=settings["alg"], generator=generator)
        else:
            gen_length = int(settings["gen_length"])
            block_length = min(int(settings["block_length"]), gen_length)
            out = llada_generate(self.model, prompt, steps=int(settings["steps"]),
                                 gen_length=gen_length, block_length=block_length,
                                 temperature=float(settings["temperature"]),
                                 cfg_scale=self.cfg_scale, remasking=settings["remasking"],
                                 generator=generator)
        return out.sequences[0, prompt.shape[1]:].tolist()

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False
                       ) -> list[str]:
        results = []
        generator = torch.Generator().manual_seed(self.seed)
        for request in tqdm(requests, desc="diffusion generation", disable=disable_tqdm):
            context, gen_kwargs = request.args
            settings, until = self._settings(dict(gen_kwargs or {}))
            context_ids = self._encode(context)[-self.max_length:]
            with torch.no_grad():
                generated = self._generate(self._tensor(context_ids)[None], settings, generator)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results

    # lm-eval bookkeeping

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        config = getattr(self.model.config, "quantization_config", None)
        if config is not None and not isinstance(config, dict):
            config = config.to_dict()
        scheme = (config or {}).get("starquant", {}).get("args", {}).get("scheme", "FP")
        return {"model_family": self.family.name, "quantization": scheme,
                "mc_num": self.mc_num, "cfg_scale": self.cfg_scale, **self.sampler}
