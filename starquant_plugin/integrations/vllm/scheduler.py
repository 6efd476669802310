"""Continuous batching of denoising requests on vLLM's asynchronous engine (``AsyncLLM``).

Each admitted request runs its family's sampler (``driver.run_sampler``, the offline driver's
code) in a worker thread, on a ``VllmDenoiser`` whose forward submits every canvas as one
``AsyncLLM.encode`` request to the server's event loop and waits for it. vLLM's scheduler puts
every request waiting at an engine step into that step's batch, so the next denoising step of
every in-flight canvas shares one model forward, whatever its prompt length, settings or
arrival time (vLLM takes per-request lengths; nothing is padded); a request admitted between
two steps joins the next one and each request finishes on its own schedule. The numbers are
the offline driver's: the same sampler, per-token state gating and per-request generator.

Limits: ``max_running`` samplers at once (worker threads), ``max_waiting`` more queued behind
them (beyond that ``Overloaded``, the server's 503), a deadline per request from admission
(``RequestTimeout``), and ``DenoiseJob.cancel`` (the client went away), which aborts the
request's engine call in flight and stops its sampler before its next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.pooling_params import PoolingParams

from starquant_plugin.integrations.vllm.driver import VllmDenoiser, run_sampler
from starquant_plugin.integrations.vllm.pooler import DEFAULT_TOP_K, TOP_K_ATTRIBUTE
from starquant_plugin.models.families import mask_token_id


class Overloaded(Exception):
    """Every running slot and queue place is taken."""


class RequestTimeout(Exception):
    """The request did not finish within the server's per-request timeout."""


class Cancelled(Exception):
    """Raised in a sampler thread whose request was cancelled."""


@dataclass
class Update:
    """What a request has produced so far: ``tokens``, the generated ids committed left to
    right (up to the first position still masked), and ``done`` on the final update (then
    ``tokens`` is every generated id)."""

    tokens: list[int]
    done: bool = False
    # the first update comes with the first engine call (the sampler accepted its settings)


@dataclass(eq=False)
class DenoiseJob:
    """One request: its prompt, sampler settings, and the channel its thread reports on."""

    id: str
    prompt: list[int]
    settings: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    in_flight: concurrent.futures.Future | None = None
    committed: int | None = None

    def report(self, item: Update | BaseException) -> None:
        """From the sampler thread: hand ``item`` to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.updates.put_nowait, item)

    def cancel(self) -> None:
        """Stop the sampler before its next step and abort its engine call in flight."""
        self.cancelled.set()
        if self.in_flight is not None:
            self.in_flight.cancel()


class DenoiseScheduler:
    """Admits denoising requests and runs them on ``engine`` (an ``AsyncLLM`` on a LLaDA or
    Dream checkpoint started with ``runner="pooling"``) as the module docstring says."""

    def __init__(self, engine: Any, config: Any, max_running: int = 16, max_waiting: int = 64,
                 timeout: float = 600.0) -> None:
        if max_running < 1 or max_waiting < 0 or timeout <= 0:
            raise ValueError(
                f"Got max_running={max_running}, max_waiting={max_waiting}, timeout={timeout}; "
                "expected max_running >= 1, max_waiting >= 0 and a positive timeout."
            )
        self.engine, self.config = engine, config
        self.mask_id = mask_token_id(config)
        self.top_k: int = getattr(config, TOP_K_ATTRIBUTE, DEFAULT_TOP_K)
        self.max_running, self.max_waiting, self.timeout = max_running, max_waiting, timeout
        self.running = 0
        self.admitted = 0
        self._slots = asyncio.Semaphore(max_running)
        self._executor = ThreadPoolExecutor(max_running, thread_name_prefix="denoise")
        self._ids = itertools.count()
        self._jobs: set[DenoiseJob] = set()

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def new_denoiser(self, job: DenoiseJob) -> VllmDenoiser:
        """A denoiser whose forward is one engine request per canvas, from ``job``'s thread."""
        def encode(rows: list[list[int]]) -> list[torch.Tensor]:
            if job.cancelled.is_set():
                raise Cancelled
            self._report_committed(job, rows[0])
            job.in_flight = asyncio.run_coroutine_threadsafe(self._encode(job, rows), job.loop)
            try:
                return job.in_flight.result()
            except concurrent.futures.CancelledError:
                raise Cancelled from None

        return VllmDenoiser(self.config, encode)

    async def _encode(self, job: DenoiseJob, rows: list[list[int]]) -> list[torch.Tensor]:
        step = next(self._ids)

        async def one(index: int, row: list[int]) -> torch.Tensor:
            final = None
            async for output in self.engine.encode(
                    {"prompt_token_ids": row}, PoolingParams(task="token_classify"),
                    f"{job.id}-{step}-{index}"):
                final = output
            return final.outputs.data

        return list(await asyncio.gather(*(one(i, row) for i, row in enumerate(rows))))

    def _report_committed(self, job: DenoiseJob, canvas: list[int]) -> None:
        generated = canvas[len(job.prompt):]
        committed = generated.index(self.mask_id) if self.mask_id in generated else len(generated)
        if job.committed is None or committed > job.committed:  # the first step: settings ok
            job.committed = committed
            job.report(Update(generated[:committed]))

    def _run(self, job: DenoiseJob) -> None:
        """The sampler thread: the offline driver's sampler on one prompt."""
        try:
            generator = torch.Generator().manual_seed(job.settings.get("seed", 0))
            settings = {k: v for k, v in job.settings.items() if k != "seed"}
            output = run_sampler(self.new_denoiser(job), [job.prompt], generator=generator,
                                 **settings)
            job.report(Update(output.sequences[0, len(job.prompt):].tolist(), done=True))
        except BaseException as error:  # noqa: BLE001  (handed to the request's coroutine)
            job.report(error)

    async def generate(self, prompt: list[int], settings: dict[str, Any]
                       ) -> AsyncIterator[Update]:
        """Updates of one request, the last with ``done``; raises ``Overloaded`` when full,
        ``RequestTimeout`` past the deadline and the sampler's ``ValueError`` for settings it
        refuses (before any update). Closing the iterator early cancels the request."""
        if self.admitted >= self.max_running + self.max_waiting:
            raise Overloaded(
                f"The server is at capacity ({self.max_running} running, {self.max_waiting} "
                "queued); retry later."
            )
        self.admitted += 1
        deadline = time.monotonic() + self.timeout
        job = DenoiseJob(f"denoise-{next(self._ids)}", prompt, settings,
                         asyncio.get_running_loop())
        self._jobs.add(job)
        acquired = False
        try:
            await asyncio.wait_for(self._slots.acquire(), deadline - time.monotonic())
            acquired = True
            self.running += 1
            thread = job.loop.run_in_executor(self._executor, self._run, job)
            thread.add_done_callback(lambda _: self._release())
            acquired = False  # released by the thread's end
            while True:
                item = await asyncio.wait_for(job.updates.get(), deadline - time.monotonic())
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        except TimeoutError:
            raise RequestTimeout(
                f"The request did not finish within the server's {self.timeout:g} s timeout; "
                "ask for fewer steps or tokens, or start the server with a longer "
                "--request-timeout."
            ) from None
        finally:
            job.cancel()
            self._jobs.discard(job)
            self.admitted -= 1
            if acquired:
                self._slots.release()

    def _release(self) -> None:
        self.running -= 1
        self._slots.release()

    def shutdown(self) -> None:
        """Stop every sampler (none may wait on an engine that is going away)."""
        for job in list(self._jobs):
            job.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
