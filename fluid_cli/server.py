"""`fluid serve`: an OpenAI-compatible HTTP server with continuous batching, streaming and decoding statistics.

Endpoints: `POST /v1/chat/completions` (the tokenizer's chat template), `POST /v1/completions` (the prompt as
plain text, as `fluid generate --no-chat-template` encodes it, or token ids), `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus text, `fluid_cli.metrics`). With an API key, the `/v1` endpoints need
`Authorization: Bearer <key>` (401 otherwise). Request fields and what is refused: `fluid_cli.openai_api`.

Every response carries `usage` and a `fluid` object (forwards, verify forwards, drafted tokens, accepted drafts,
tokens per forward, mean horizon, `exact_to`); a stream carries `fluid` in the chunk with the `finish_reason`.
Streams are server-sent events: the role in the first delta (chat), one chunk per committed block that adds text
(an incomplete character, or what may be the start of a stop string, waits for the next), the `finish_reason`
(`stop` or `length`), a usage chunk when `stream_options.include_usage` asks, then `data: [DONE]`.

One decoding thread serves every request (`fluid_cli.engine`): a request arriving while others decode starts at
the next forward; a client that hangs up frees its row before the next forward; more requests than rows and queue
get 429. SIGINT or SIGTERM stops accepting connections, lets the requests in flight finish for up to `[serve]
drain_s` seconds, cancels the rest, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from rich.console import Console

from fluid_cli.config import Recipe
from fluid_cli.acceptance import GREEDY, Sampling
from fluid_cli.decode import Decoder, DecodeResult, ar_settings, check_sampling, generation_budget
from fluid_cli.decode import Request as DecodeRequest
from fluid_cli.engine import Engine, Job, QueueFull, Stopped
from fluid_cli.errors import FluidError
from fluid_cli.hf import context_length
from fluid_cli.inference import decode_settings, generate_config, load_decoding_model
from fluid_cli.inference import sampling as default_sampling
from fluid_cli.metrics import Metrics, fluid_stats
from fluid_cli.model import FluidModel
from fluid_cli.openai_api import (
    FINISH_REASONS,
    ApiError,
    ChatBody,
    CompletionBody,
    CompletionText,
    bad_request,
    parse,
)
from fluid_cli.prompts import encode_prompt, stop_strings

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class Service:
    """What the endpoints share: the model, the engine, the limits and defaults."""

    model: FluidModel
    engine: Engine
    metrics: Metrics
    name: str  # the model's id for clients
    api_key: str | None
    max_len: int  # positions per row: prompt + completion
    max_tokens: int  # a request's default max_tokens ([generate] max_new_tokens)
    stops: list[str]  # a request's default stop strings ([generate] stop)
    created: int
    sampling: Sampling = GREEDY  # a request's default ([generate] temperature, top_p, top_k, seed)

    def submit(self, ids: list[int], body: Any, param: str) -> tuple[Job, CompletionText]:
        """Queue a request's prompt ids; `param` names the prompt's field in errors."""
        if len(ids) >= self.max_len:
            raise bad_request(param, f"the prompt is {len(ids)} tokens; this server's context is {self.max_len} "
                                     "positions (prompt and completion)", code="context_length_exceeded")
        limit = body.limit() or self.max_tokens
        stops = body.stops()
        stops = self.stops if stops is None else stops
        try:
            budget = generation_budget(self.model, ids, min(limit, self.max_len - len(ids)))
        except FluidError as e:  # an empty prompt
            raise bad_request(param, str(e)) from None
        sampling = body.sampling().resolve(self.sampling)
        try:  # the server's decoding settings must allow it (verified, threshold 0)
            check_sampling(self.engine.decoder.plan, self.engine.decoder.settings.verify, sampling)
        except FluidError as e:
            raise bad_request("temperature", str(e)) from None
        try:
            job = self.engine.submit(DecodeRequest(ids, budget[0], stop_strings(self.model.tokenizer, stops),
                                                   sampling), budget)
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except Stopped as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        self.metrics.prompt_tokens.inc(len(ids))
        return job, CompletionText(self.model.tokenizer, stops)

    def cancel(self, job: Job) -> None:
        self.engine.cancel(job)
        self.metrics.finished.labels("cancelled").inc()


def _encode(service: Service, prompt: str | list[dict[str, str]], param: str, chat: bool) -> list[int]:
    """A prompt's ids, as `fluid generate` encodes it: text that spells the model's mask token is refused (a 400
    naming the field)."""
    try:
        return encode_prompt(service.model.tokenizer, prompt, chat_template=chat,
                             mask_token=service.model.meta.mask_token, where=param)
    except FluidError as e:
        raise bad_request(param, str(e)) from None


def create_app(service: Service) -> Any:
    """The ASGI app: FastAPI's, wrapped so that every response is counted in `fluid_http_requests`."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="fluid", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), service.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           type="authentication_error", code="invalid_api_key")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request) -> Response:
        body = parse(ChatBody, await _json(request), service.name)
        tokenizer = service.model.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request("messages", "this model's tokenizer has no chat template: use /v1/completions")
        ids = _encode(service, body.chat(), "messages", chat=True)
        return await _respond(service, request, body, ids, "messages", chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        body = parse(CompletionBody, await _json(request), service.name)
        prompt = body.text_or_ids()
        if isinstance(prompt, str):
            ids = _encode(service, prompt, "prompt", chat=False)
        else:
            vocab = service.model.lm.get_input_embeddings().weight.shape[0]
            if not all(0 <= i < vocab for i in prompt):
                raise bad_request("prompt", f"token ids must be between 0 and {vocab - 1}")
            ids = list(prompt)
        return await _respond(service, request, body, ids, "prompt", chat=False)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                             "owned_by": "fluid"}]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return _CountRequests(app, service.metrics)


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the request body is not JSON") from None


async def _respond(service: Service, request: Request, body: Any, ids: list[int], param: str, chat: bool
                   ) -> Response:
    job, text = service.submit(ids, body, param)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": service.name}
    if body.stream:
        return StreamingResponse(_stream(service, job, text, head, body.include_usage, len(ids), chat),
                                 media_type="text/event-stream")
    result = await _wait(service, request, job)
    if result is None:  # the client hung up: nobody reads this
        return Response(status_code=499)
    content = text.add(result.tokens) + text.finish()
    reason = FINISH_REASONS[result.stats.stop_reason]
    choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
               "finish_reason": reason} if chat else
              {"index": 0, "text": content, "logprobs": None, "finish_reason": reason})
    return JSONResponse({**head, "choices": [choice], "usage": _usage(len(ids), result),
                         "fluid": fluid_stats(result.stats)})


async def _wait(service: Service, request: Request, job: Job) -> DecodeResult | None:
    """The job's result; None if the client hung up first (the job is cancelled then, and when the server's
    drain time runs out and cancels this)."""
    result = asyncio.ensure_future(job.result())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            service.cancel(job)
    if result.cancelled():
        return None
    try:
        return result.result()
    except Stopped as e:
        raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
    except Exception as e:  # noqa: BLE001 - a failed forward: the client gets the reason, the server goes on
        raise ApiError(500, f"decoding failed: {e}", type="server_error") from None


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is read: the server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(service: Service, job: Job, text: CompletionText, head: dict[str, Any], include_usage: bool,
                  prompt_tokens: int, chat: bool) -> AsyncIterator[str]:
    """Server-sent events; a client that hangs up cancels the stream here (Starlette), and the job with it."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def chunk(new: str | None, reason: str | None = None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if new is None else {"content": new}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": new or "", "logprobs": None, "finish_reason": reason}
        return {**head, "choices": [choice], **extra}

    result = None
    try:
        if chat:
            yield event(chunk(None, role=True))
        while not isinstance(item := await job.events.get(), DecodeResult):
            if isinstance(item, BaseException):
                error = ApiError(503 if isinstance(item, Stopped) else 500, str(item), type="server_error")
                yield event(error.body())
                yield "data: [DONE]\n\n"
                return
            if new := text.add(item):
                yield event(chunk(new))
        result = item
        yield event({**chunk(text.finish() or None, FINISH_REASONS[result.stats.stop_reason]),
                     "fluid": fluid_stats(result.stats)})
        if include_usage:
            yield event({**head, "choices": [], "usage": _usage(prompt_tokens, result)})
        yield "data: [DONE]\n\n"
    finally:
        if result is None:
            service.cancel(job)


def _usage(prompt_tokens: int, result: DecodeResult) -> dict[str, int]:
    n = len(result.tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


class _CountRequests:
    """ASGI middleware: every HTTP response counted by endpoint and status (streams when they start)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


# --------------------------------------------------------------------------------------------- the command


def build_service(recipe: Recipe, model: FluidModel | None = None) -> Service:
    """The model ([generate]; loaded unless given), its engine and the server's settings ([serve])."""
    cfg, sc = generate_config(recipe), recipe.serve
    model = model if model is not None else load_decoding_model(cfg)
    context = context_length(model.lm.config)
    if sc.max_len is not None and context is not None and sc.max_len > context:
        raise FluidError(f"[serve] max_len = {sc.max_len}: beyond the model's context of {context} positions")
    max_len = sc.max_len or context
    if max_len is None:
        raise FluidError("the model's config names no context length (max_position_embeddings): set [serve] max_len")
    settings = replace(decode_settings(cfg, model), stop=None)  # each request brings its stop strings
    decoder = Decoder(model, ar_settings(settings) if sc.decoder == "ar" else settings,
                      batch_size=sc.max_batch_size)
    metrics = Metrics()
    engine = Engine(decoder, max_queue=sc.max_queue, max_len=max_len,
                    warmup=encode_prompt(model.tokenizer, "Hello", chat_template=False), on_finish=metrics.observe)
    metrics.watch(engine)
    name = sc.model_name or Path(cfg.model_dir).resolve().name
    return Service(model, engine, metrics, name, sc.api_key, max_len, cfg.max_new_tokens, list(cfg.stop),
                   int(time.time()), default_sampling(cfg))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (a port in use is a one-line error, before the model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FluidError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGINT or SIGTERM that shut it down gracefully is not raised again
    afterwards (uvicorn re-raises it, which would end the process with the signal's status instead of 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def server_for(service: Service, drain_s: float) -> Server:
    return Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                                 timeout_graceful_shutdown=drain_s))


def run(recipe: Recipe, console: Console | None = None) -> None:
    """Serve until SIGINT or SIGTERM."""
    console = console or Console(stderr=True, soft_wrap=True)
    sc = recipe.serve
    sock = bind(sc.host, sc.port)
    with console.status("loading the model"):
        service = build_service(recipe)
    decoder = service.engine.decoder
    console.print(f"fluid serve: [bold]{service.name}[/] at http://{sc.host}:{sc.port}/v1 ({sc.decoder}, horizon "
                  f"{decoder.plan.policy}, {sc.max_batch_size} rows of {service.max_len} positions, queue "
                  f"{sc.max_queue}{', API key required' if sc.api_key else ''}); Ctrl-C stops")
    server_for(service, sc.drain_s).run(sockets=[sock])
    console.print("fluid serve: stopped")
