"""An OpenAI-compatible HTTP API for one chat model (FastAPI + uvicorn).

`GET /v1/models` and `POST /v1/chat/completions`, answered whole or streamed as server-sent events, with
`max_tokens`, `temperature`, `top_p` and `stop`; the messages are rendered with the chat format the model was
trained with. Errors come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

One generation runs at a time: each request becomes a job for a single worker thread, which takes them in arrival
order and also does all the tokenizing (a fast tokenizer is not safe to share between threads: encoding with
`split_special_tokens` flips a flag on the one Rust tokenizer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList, TextStreamer

from lowtune.data.read import Message
from lowtune.errors import UserError
from lowtune.infer.session import ChatModel, GenerationSettings

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256  # as lowtune chat and generate
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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass
class Finished:
    """How a reply ended: its token counts and OpenAI's finish_reason."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


class StopCutter:
    """Cuts streamed text before the first stop string, holding back any tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of the text so far that surely comes before any stop string, not given out yet."""
        if self.stopped:
            return ""
        text = self._held + text
        found = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[: min(found)]
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the text has ended without the stop string."""
        held, self._held = self._held, ""
        return held


class Job:
    """One request's reply: the worker thread sends its events, the request's coroutine reads them.

    Events are pieces of text, then `Finished`, or an `APIError` at any point.
    """

    def __init__(self, messages: list[Message], settings: GenerationSettings, stops: list[str]):
        self.messages, self.settings, self.stops = messages, settings, stops
        self.cancelled = threading.Event()  # the client went away: stop generating
        self._events: asyncio.Queue[str | Finished | APIError] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def send(self, event: str | Finished | APIError) -> None:
        """Called from the worker thread."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next_event(self) -> str | Finished:
        """The next piece of text, or how the reply ended; raises the APIError that ended it instead."""
        event = await self._events.get()
        if isinstance(event, APIError):
            raise event
        return event


class _JobStreamer(TextStreamer):
    """Sends a job its reply's text as it is decoded, cut before its stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, job: Job):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job = job
        self.cutter = StopCutter(job.stops)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        piece = self.cutter.feed(text) + (self.cutter.flush() if stream_end else "")
        if piece:
            self.job.send(piece)


class _StopWhen(StoppingCriteria):
    """Ends generation at the next token once `done()` says so."""

    def __init__(self, done: Callable[[], bool]):
        self.done = done

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.done(), dtype=torch.bool, device=input_ids.device)


class Worker:
    """Generates the jobs' replies one at a time, in arrival order, on one thread: the queue in front of the model."""

    def __init__(self, chat_model: ChatModel):
        self.chat_model = chat_model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowtune-generate")
        self._current: Job | None = None

    def submit(self, job: Job) -> None:
        self._executor.submit(self._run, job)

    def close(self) -> None:
        if self._current is not None:
            self._current.cancelled.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        self._current = job
        try:
            job.send(self._generate(job))
        except UserError as error:  # the chat format cannot render these messages
            job.send(APIError(400, str(error), "messages"))
        except Exception:
            log.exception("generation failed")
            message = "the model failed to generate a reply (see the server log)"
            job.send(APIError(500, message, error_type="server_error"))
        finally:
            self._current = None

    def _generate(self, job: Job) -> Finished:
        chat_format = self.chat_model.chat_format
        prompt = chat_format.encode_prompt(job.messages)
        streamer = _JobStreamer(self.chat_model.tokenizer, job)
        stop_early = _StopWhen(lambda: job.cancelled.is_set() or streamer.cutter.stopped)
        new_ids = self.chat_model.generate_ids(prompt, job.settings, streamer, StoppingCriteriaList([stop_early]))
        ended_turn = bool(new_ids) and new_ids[-1] in chat_format.stop_token_ids
        finish_reason = "stop" if streamer.cutter.stopped or ended_turn else "length"
        return Finished(len(prompt), len(new_ids), finish_reason)


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


def create_app(chat_model: ChatModel, model_name: str, api_key: str | None) -> FastAPI:
    """The API for `chat_model`, which clients call `model_name`; with `api_key`, every request must send it."""
    worker = Worker(chat_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="lowtune", lifespan=lifespan, dependencies=[Depends(_key_checker(api_key))])
    _add_error_handlers(app)
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "lowtune"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        _check_model(model, model_name)
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest) -> Response:
        _check_model(request.model, model_name)
        messages = [message.to_message() for message in request.messages]
        job = Job(messages, request.settings(), request.stop_strings())
        worker.submit(job)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return await _streamed(job, Reply.new(model_name), include_usage)
        return await _whole(job, Reply.new(model_name))

    return app


def serve(
    chat_model: ChatModel, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None
) -> None:
    """Answers the OpenAI API at http://HOST:PORT/v1 until interrupted; only this machine can call it by default."""
    if api_key is None and not _is_loopback(host):
        log.warning("Serving on %s without an API key: anyone who can reach this port can use the model", host)
    log.info("OpenAI-compatible API for model %r at http://%s:%d/v1", model_name, host, port)
    uvicorn.run(create_app(chat_model, model_name, api_key), host=host, port=port)


async def _whole(job: Job, reply: Reply) -> JSONResponse:
    pieces = []
    event = await job.next_event()
    while isinstance(event, str):
        pieces.append(event)
        event = await job.next_event()
    return JSONResponse(reply.completion("".join(pieces), event))


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


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        message = f"The model {requested!r} does not exist; this server serves {served!r}"
        raise APIError(404, message, "model", "model_not_found")


def _key_checker(api_key: str | None) -> Callable[..., Coroutine[Any, Any, None]]:
    async def check_key(authorization: Annotated[str | None, Header()] = None) -> None:
        if api_key is None:
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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
