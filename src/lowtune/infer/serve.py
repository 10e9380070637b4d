"""An OpenAI-compatible HTTP API for chat models (FastAPI + uvicorn).

`GET /v1/models` and `POST /v1/chat/completions`, answered whole or streamed as server-sent events, with
`max_tokens`, `temperature`, `top_p` and `stop`; the messages are rendered with the chat format the model was
trained with. Errors come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

Several adapters of one base can be served together, each under its own name (the request's `model`). Each request
becomes a job for a single worker thread, which generates the waiting jobs together in batches (`infer/batch.py`).
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException

from lowtune.data.read import Message
from lowtune.errors import UserError
from lowtune.infer.batch import Decoder, ModelPool, Row, Served
from lowtune.infer.session import GenerationSettings

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256  # as lowtune chat and generate
DEFAULT_MAX_BATCH = 16  # requests generated together
DISCONNECT_POLL = 0.1  # seconds between checks that a waiting client is still connected
DEFAULT_BATCH_WINDOW = 0.01  # seconds a batch waits for more requests before it starts (bench/serve_throughput.py)
UNION_MEMBERS = {"str", "int", "float", "bool"}  # how pydantic names the plain members of a union in error paths


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def to_message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return Message(self.role, text)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that lowtune honours; other fields are ignored."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    @field_validator("messages")
    @classmethod
    def _asks_for_a_reply(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if any(message.role == "system" for message in messages[1:]):
            raise ValueError("only the first message may be a system message")
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return messages

    def settings(self) -> GenerationSettings:
        max_tokens = self.max_tokens or self.max_completion_tokens or DEFAULT_MAX_TOKENS
        return GenerationSettings(max_tokens, self.temperature, self.top_p)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [stop for stop in stops if stop]


@dataclass
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    error_type: str = "invalid_request_error"
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class Limits:
    """What one request may take of the server, so that no client can hold up the others.

    Attributes:
        max_prompt_tokens: the longest prompt; None: the model's context.
        max_body_bytes: the largest request body (413 past it).
        request_timeout: seconds from arrival to the end of the reply; then its generation stops (408).
        max_queue: requests waiting for a batch at most (429 with Retry-After past it).
        shutdown_timeout: seconds SIGTERM waits for running requests before it cancels them.
    """

    max_prompt_tokens: int | None = None
    max_body_bytes: int = 4 * 2**20
    request_timeout: float = 300.0
    max_queue: int = 64
    shutdown_timeout: float = 10.0


@dataclass
class Finished:
    """How a reply ended: its token counts and OpenAI's finish_reason."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


class Job:
    """One request's reply: the worker thread sends its events, the request's coroutine reads them.

    Events are pieces of text, then `Finished`, or an `APIError` at any point.
    """

    def __init__(
        self, served: Served, prompt: list[int], settings: GenerationSettings, stops: list[str], deadline: float
    ):
        self.served, self.prompt, self.settings, self.stops, self.deadline = served, prompt, settings, stops, deadline
        self.arrived = time.monotonic()
        self.cancelled = threading.Event()  # the client went away: stop generating
        self._events: asyncio.Queue[str | Finished | APIError] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def send(self, event: str | Finished | APIError) -> None:
        """Called from the worker thread."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def stopped(self) -> bool:
        """Asked before each token: the client went away, or the request ran past its deadline."""
        return self.cancelled.is_set() or self.timed_out

    @property
    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    async def next_event(self) -> str | Finished:
        """The next piece of text, or how the reply ended; raises the APIError that ended it instead."""
        event = await self._events.get()
        if isinstance(event, APIError):
            raise event
        return event


class Worker:
    """Generates the jobs' replies on one thread, continuously batched: up to `max_batch` jobs decode together, of
    any adapter and sampling; a waiting job joins between two decoding steps and a finished, cancelled or timed-out
    one leaves at once, so that its slot goes to the next job.

    Prompts come tokenized (`Tokenizing`); this thread only decodes the replies.
    """

    def __init__(self, pool: ModelPool, max_batch: int, batch_window: float = DEFAULT_BATCH_WINDOW):
        self.pool, self.max_batch, self.batch_window = pool, max_batch, batch_window
        self.largest_batch = 0  # for the log and the tests: batching happened
        self.last_reply_seconds = 1.0  # how long the last reply took: what a client told to retry should wait
        self._waiting: list[Job] = []
        self._running: dict[int, tuple[Job, Row]] = {}  # by id(row)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lowtune-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            for job, _ in self._running.values():
                job.cancelled.set()
            for job in self._waiting:
                job.cancelled.set()
            self._wake.notify()

    def _loop(self) -> None:
        decoder = Decoder(self.pool)
        while True:
            with self._wake:
                while not self._waiting and not decoder.rows and not self._closed:
                    self._wake.wait()
                if not decoder.rows:
                    self._gather()
                if self._closed and not decoder.rows:
                    return
                joining = self._admit(self.max_batch - len(decoder.rows))
            try:
                ended = decoder.add(joining) + (decoder.step() if decoder.rows and not joining else [])
            except Exception:
                log.exception("generation failed")
                self._fail_running()
                decoder = Decoder(self.pool)
                continue
            for row in ended:
                self._finish(*self._running.pop(id(row)))
            if len(decoder.rows) > self.largest_batch:
                self.largest_batch = len(decoder.rows)
                log.info("generating %d requests together", len(decoder.rows))

    def _gather(self) -> None:
        """Waits up to `batch_window` seconds for more requests (the lock held) when none is running: clients that
        start together reach the server milliseconds apart, and their prompts are read fastest in one pass."""
        deadline = time.monotonic() + self.batch_window
        while len(self._waiting) < self.max_batch and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(remaining)

    def _admit(self, free: int) -> list[Row]:
        """The oldest waiting jobs, as many as there are free slots, as rows (the lock held)."""
        joining, self._waiting = self._waiting[:free], self._waiting[free:]
        rows = []
        for job in joining:
            if job.timed_out:
                job.send(_timeout_error())
            elif not job.stopped():
                row = Row(job.served, job.prompt, job.settings, job.send, job.stops, job.stopped)
                self._running[id(row)] = (job, row)
                rows.append(row)
        return rows

    def _finish(self, job: Job, row: Row) -> None:
        self.last_reply_seconds = time.monotonic() - job.arrived
        if job.timed_out and not (row.ended_turn or row.stopped_by_string):
            job.send(_timeout_error())
            return
        finish_reason = "stop" if row.ended_turn or row.stopped_by_string else "length"
        job.send(Finished(len(row.prompt_ids), len(row.new_ids), finish_reason))

    def _fail_running(self) -> None:
        message = "the model failed to generate a reply (see the server log)"
        for job, _ in self._running.values():
            job.send(APIError(500, message, error_type="server_error"))
        self._running.clear()


def _timeout_error() -> APIError:
    message = "the request ran past this server's --request-timeout; its generation was stopped"
    return APIError(408, message, code="request_timeout", error_type="timeout")


class Tokenizing:
    """Prompts tokenized on one thread of their own, off the event loop and beside the generation, so that a huge
    prompt is measured, and refused, without waiting for a batch. The thread encodes with its own copy of each chat
    format: a fast tokenizer is not safe to share between threads (encoding sets its padding, truncation and
    `split_special_tokens` on the one Rust tokenizer while the generation thread decodes with it)."""

    def __init__(self, pool: ModelPool) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowtune-tokenize")
        # used by the executor's thread only (~0.6 s a format, once, before the server takes requests)
        self._formats = {name: copy.deepcopy(served.chat_format) for name, served in pool.served.items()}

    async def prompt(self, served: Served, messages: list[Message]) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, served, messages)

    def _encode(self, served: Served, messages: list[Message]) -> list[int]:
        return self._formats[served.name].encode_prompt(messages)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class Reply:
    """What every payload of one completion repeats: its id, creation time and model."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> Reply:
        return cls(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model)

    def completion(self, text: str, finished: Finished) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finished.finish_reason,
        }
        return self._head("chat.completion") | {"choices": [choice], "usage": finished.usage()}

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._head("chat.completion.chunk") | {"choices": [choice]}

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        return self._head("chat.completion.chunk") | {"choices": [], "usage": finished.usage()}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def create_app(
    pool: ModelPool, api_key: str | None, max_batch: int = DEFAULT_MAX_BATCH, limits: Limits = Limits()
) -> FastAPI:
    """The API for the pool's models, each under its name; with `api_key`, every request but /health must send
    it."""
    worker, tokenizing = Worker(pool, max_batch), Tokenizing(pool)
    context = getattr(pool.model.config, "max_position_embeddings", None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()
        tokenizing.close()

    app = FastAPI(title="lowtune", lifespan=lifespan, dependencies=[Depends(_key_checker(api_key))])
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.state.worker = worker
    _add_error_handlers(app)
    created = int(time.time())
    cards = {name: {"id": name, "object": "model", "created": created, "owned_by": "lowtune"} for name in pool.served}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "waiting": worker.waiting, "running": worker.running}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": list(cards.values())}

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        return cards[_served(model, pool).name]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, connection: Request) -> Response:
        deadline = time.monotonic() + limits.request_timeout
        served = _served(request.model, pool)
        _check_queue(worker, limits)
        try:
            prompt = await tokenizing.prompt(served, [message.to_message() for message in request.messages])
        except UserError as error:  # the chat format cannot render these messages
            raise APIError(400, str(error), "messages") from None
        settings = _bounded_settings(request, len(prompt), context, limits)
        job = Job(served, prompt, settings, request.stop_strings(), deadline)
        _check_queue(worker, limits)
        worker.submit(job)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return await _streamed(job, Reply.new(served.name), include_usage)
        return await _whole(job, Reply.new(served.name), connection)

    return app


def serve(
    pool: ModelPool,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    limits: Limits = Limits(),
) -> None:
    """Answers the OpenAI API at http://HOST:PORT/v1 until interrupted; only this machine can call it by default.

    SIGTERM (or Ctrl-C) stops taking connections, lets running requests finish for `limits.shutdown_timeout`
    seconds, cancels the rest and exits."""
    if api_key is None and not is_loopback(host):
        log.warning("Serving on %s without an API key: anyone who can reach this port can use the model", host)
    names = ", ".join(repr(name) for name in pool.served)
    log.info("OpenAI-compatible API for %s at http://%s:%d/v1, up to %d requests a batch", names, host, port, max_batch)
    app = create_app(pool, api_key, max_batch, limits)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=limits.shutdown_timeout)


class BodyLimit:
    """Answers 413 to a request body over `limit` bytes, whether it says its length or not (ASGI middleware): the
    body is read here first, up to the limit, then handed to the app."""

    def __init__(self, app: Callable[..., Any], limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        given = False

        async def replay() -> dict[str, Any]:
            nonlocal given
            if given:
                return await receive()  # what comes after the body: the client's disconnect
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        message = f"the request body is over this server's limit of {self.limit:,} bytes"
        await APIError(413, message, code="request_too_large").response()(scope, receive, send)


def _check_queue(worker: Worker, limits: Limits) -> None:
    if worker.waiting >= limits.max_queue:
        retry = max(1, math.ceil(worker.last_reply_seconds))
        message = f"{worker.waiting} requests are waiting (this server's --max-queue); retry in {retry} s"
        raise APIError(
            429, message, code="queue_full", error_type="rate_limit_error", headers={"Retry-After": str(retry)}
        )


def _bounded_settings(
    request: ChatCompletionRequest, prompt_tokens: int, context: int | None, limits: Limits
) -> GenerationSettings:
    """The request's settings, or a 400 naming both numbers when the prompt (and the reply it asks for) cannot fit;
    an unset max_tokens is cut to what the context has room for."""
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        limit = limits.max_prompt_tokens
        message = f"the prompt is {prompt_tokens:,} tokens, over this server's --max-prompt-tokens {limit:,}"
        raise APIError(400, message, "messages", "context_length_exceeded")
    settings = request.settings()
    if context is None:
        return settings
    if prompt_tokens >= context:
        message = f"the prompt is {prompt_tokens:,} tokens: the model's context is {context:,} tokens"
        raise APIError(400, message, "messages", "context_length_exceeded")
    if (request.max_tokens or request.max_completion_tokens) is None:
        settings.max_new_tokens = min(settings.max_new_tokens, context - prompt_tokens)
    if prompt_tokens + settings.max_new_tokens > context:
        message = (
            f"the prompt is {prompt_tokens:,} tokens and max_tokens {settings.max_new_tokens:,}: "
            f"{prompt_tokens + settings.max_new_tokens:,} is over the model's context of {context:,} tokens"
        )
        raise APIError(400, message, "messages", "context_length_exceeded")
    return settings


async def _whole(job: Job, reply: Reply, connection: Request) -> JSONResponse:
    watcher = asyncio.create_task(_cancel_on_disconnect(connection, job))
    try:
        pieces = []
        event = await job.next_event()
        while isinstance(event, str):
            pieces.append(event)
            event = await job.next_event()
        return JSONResponse(reply.completion("".join(pieces), event))
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(connection: Request, job: Job) -> None:
    """A client that closes the connection before its whole reply frees its row (streams: `_sse`)."""
    while not await connection.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL)
    job.cancelled.set()


async def _streamed(job: Job, reply: Reply, include_usage: bool) -> StreamingResponse:
    # The first event comes before the response starts, so that a request the chat format rejects still gets a 400.
    first = await job.next_event()
    return StreamingResponse(_sse(job, reply, first, include_usage), media_type="text/event-stream")


async def _sse(job: Job, reply: Reply, event: str | Finished, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunks as server-sent events: the role, the text pieces, the finish reason, [usage,] [DONE]."""
    try:
        yield _event(reply.chunk({"role": "assistant", "content": ""}))
        while isinstance(event, str):
            yield _event(reply.chunk({"content": event}))
            event = await job.next_event()
        yield _event(reply.chunk({}, event.finish_reason))
        if include_usage:
            yield _event(reply.usage_chunk(event))
        yield "data: [DONE]\n\n"
    except APIError as error:  # the response has started: the error can only be an event
        yield _event(error.body())
    finally:
        job.cancelled.set()  # the client may have gone: free the worker


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _served(requested: str, pool: ModelPool) -> Served:
    if requested not in pool.served:
        names = ", ".join(repr(name) for name in pool.served)
        message = f"The model {requested!r} does not exist; this server serves {names}"
        raise APIError(404, message, "model", "model_not_found")
    return pool.served[requested]


def _key_checker(api_key: str | None) -> Callable[..., Coroutine[Any, Any, None]]:
    async def check_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        if api_key is None or request.url.path == "/health":  # health checkers send no key
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            message = "Missing or incorrect API key: send it as the header 'Authorization: Bearer KEY'"
            raise APIError(401, message, None, "invalid_api_key")

    return check_key


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)


def _validation_error(error: RequestValidationError) -> APIError:
    """OpenAI answers an invalid request with 400 (not FastAPI's 422), naming the first bad parameter."""
    problems = [(_param(e["loc"]), e["msg"]) for e in error.errors()]
    message = "; ".join(f"{param}: {text}" if param else text for param, text in problems)
    first_param = problems[0][0] if problems else ""
    return APIError(400, message, first_param or None)


def _param(location: tuple[int | str, ...]) -> str:
    """The dotted parameter of a validation error; pydantic also names the union member it tried ("str",
    "list[TextPart]"), which is no parameter. The first part is where in the request: the body."""
    parts = [str(part) for part in location[1:]]
    return ".".join(part for part in parts if part not in UNION_MEMBERS and "[" not in part)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
