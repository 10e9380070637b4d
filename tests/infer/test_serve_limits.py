"""No client can stall lowtune serve: bounded prompts and bodies, deadlines, cancelled work, back-pressure, a
bounded shutdown. A real server on loopback, the official openai client, loops that end by themselves."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import Message

import openai
import pytest

from lowtune.infer.batch import ModelPool
from lowtune.infer.serve import Limits, create_app
from lowtune.infer.session import ChatModel
from tests.infer.test_serve import running_server

MODEL = "tiny"
HUGE = "长" * 70_000  # 210 KB of UTF-8: far over the tiny model's 1,024-token context


@pytest.fixture(scope="module")
def random_base(tiny_qwen2) -> ModelPool:
    """The untrained tiny model: it never ends a turn on its own, so every reply runs to its max_tokens."""
    return ModelPool.from_chat_model(ChatModel.from_model_dir(tiny_qwen2), MODEL)


def post(url: str, body: dict | bytes | list[bytes], timeout: float = 60) -> tuple[int, Message, dict]:
    """A plain POST (a list of bytes: sent chunked, with no Content-Length): status, headers and JSON body."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, iter(data) if isinstance(data, list) else data)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.load(error)


def ask_body(tokens: int = 300, content: str = "hello") -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": tokens}


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)


def long_request(client: openai.OpenAI, tokens: int = 300, **options):
    messages = [{"role": "user", "content": "hello"}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=tokens, temperature=0, **options)


def test_a_huge_prompt_is_refused_at_once_while_another_request_is_answered(random_base):
    with running_server(create_app(random_base, None)) as url:
        client = client_of(url)
        with ThreadPoolExecutor(max_workers=1) as other:
            running = other.submit(long_request, client, 200)
            time.sleep(0.3)  # the other request is generating
            start = time.monotonic()
            with pytest.raises(openai.BadRequestError) as raised:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": HUGE}])
            assert time.monotonic() - start < 1.0
            assert running.result().usage.completion_tokens == 200  # answered normally
    error = raised.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert re.fullmatch(r"the prompt is \d\d,\d{3} tokens: the model's context is 1,024 tokens", error["message"])


def test_prompt_limit_body_limit_and_an_unset_max_tokens(random_base):
    limits = Limits(max_prompt_tokens=50, max_body_bytes=100_000)
    with running_server(create_app(random_base, None, limits=limits)) as url:
        client = client_of(url)
        with pytest.raises(openai.BadRequestError, match="over this server's --max-prompt-tokens 50"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 60}])
        status, _, body = post(f"{url}/chat/completions", ask_body(5, HUGE))
        assert status == 413 and body["error"]["code"] == "request_too_large"
        status, _, _ = post(f"{url}/chat/completions", [b"{" + b" " * 60_000, b" " * 60_000 + b"}"])
        assert status == 413  # no Content-Length: counted as it arrives
        with pytest.raises(openai.BadRequestError, match="max_tokens 2,000: 2,0.. is over the model's context"):
            long_request(client, 2000)
        reply = long_request(client, None)  # unset: cut to what the context has room for, not refused
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 1024


def test_a_request_past_its_deadline_is_stopped(random_base):
    with running_server(create_app(random_base, None, limits=Limits(request_timeout=1.0))) as url:
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as raised:
            long_request(client_of(url), 1000)
        assert raised.value.status_code == 408 and time.monotonic() - start < 3.0
        assert long_request(client_of(url), 5).usage.completion_tokens == 5  # the slot is free again


def test_a_closed_stream_frees_the_server(random_base):
    app = create_app(random_base, None)
    with running_server(app) as url:
        client = client_of(url)
        stream = long_request(client, 1000, stream=True)
        next(iter(stream))
        stream.close()
        start = time.monotonic()
        assert long_request(client, 5).usage.completion_tokens == 5
        assert time.monotonic() - start < 1.0  # not behind the 1,000 tokens of the closed stream


def test_a_short_request_is_answered_beside_a_long_one_and_a_closed_row_frees_its_slot(random_base):
    """Continuous batching: a request joins the batch that is running, and a row whose stream was closed leaves it
    at its next token, even while another row of that batch goes on."""
    app = create_app(random_base, None, max_batch=2)
    with running_server(app) as url:
        client = client_of(url)
        running = long_request(client, 1000, stream=True)
        next(iter(running))
        closed = long_request(client, 1000, stream=True)  # takes the second slot, then gives it back
        next(iter(closed))
        closed.close()
        start = time.monotonic()
        assert long_request(client, 5).usage.completion_tokens == 5
        assert time.monotonic() - start < 1.0  # neither behind the running reply nor behind the closed one
        assert app.state.worker.running == 1  # the long reply still goes on
        running.close()


def test_a_client_that_hangs_up_frees_the_server(random_base):
    with running_server(create_app(random_base, None)) as url:
        with pytest.raises(TimeoutError):  # waits 0.3 s for a 1,000-token reply, then hangs up
            post(f"{url}/chat/completions", ask_body(1000), timeout=0.3)
        start = time.monotonic()
        assert long_request(client_of(url), 5).usage.completion_tokens == 5
        assert time.monotonic() - start < 1.0


def test_a_full_queue_answers_429_with_retry_after_and_health_answers_under_load(random_base):
    app = create_app(random_base, None, max_batch=1, limits=Limits(max_queue=2))
    with running_server(app) as url:
        start = threading.Barrier(4)

        def one(index: int) -> tuple[int, Message, dict]:
            start.wait(timeout=30)
            time.sleep(0.05 * index)  # arrivals in order: one runs, two wait, the fourth finds the queue full
            return post(f"{url}/chat/completions", ask_body(200), timeout=120)

        def health() -> tuple[dict, float]:
            asked = time.monotonic()
            with urllib.request.urlopen(f"{url.removesuffix('/v1')}/health", timeout=5) as answer:
                return json.load(answer), time.monotonic() - asked

        with ThreadPoolExecutor(max_workers=4) as clients:
            responses = clients.map(one, range(4))
            answers = [health()]
            loaded = {"status": "ok", "waiting": 2, "running": 1}
            while answers[-1][0] != loaded and len(answers) < 100:  # until one generates and two wait
                time.sleep(0.1)
                answers.append(health())
            responses = list(responses)
    assert max(seconds for _, seconds in answers) < 0.5  # at once, also while the model generates
    assert answers[-1][0] == loaded
    assert sorted(status for status, _, _ in responses) == [200, 200, 200, 429]
    (_, headers, body), *_ = [response for response in responses if response[0] == 429]
    assert int(headers["Retry-After"]) >= 1 and body["error"]["code"] == "queue_full"


def test_sigterm_with_requests_in_flight_exits_within_the_bound(tiny_qwen2):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "lowtune", "serve", "--model", str(tiny_qwen2), "--name", MODEL]
    server = subprocess.Popen([*command, f"--port={port}", "--shutdown-timeout=2"], stderr=subprocess.DEVNULL)
    try:
        client = client_of(f"http://127.0.0.1:{port}/v1")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.2)
        stream = long_request(client, 1000, stream=True)
        next(iter(stream))  # a reply is being generated
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)
        assert time.monotonic() - signalled < 2 + 3  # the bound, and a few decoding steps
    finally:
        server.kill()
