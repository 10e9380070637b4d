"""lowtune serve: the official openai client against a real server on loopback, answering with the tiny run."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest
import uvicorn

from lowtune.data.read import Message
from lowtune.infer import serve as serve_module
from lowtune.infer.batch import ModelPool, StopCutter
from lowtune.infer.serve import create_app
from lowtune.infer.session import ChatModel
from tests.conftest import MEMORISE

API_KEY = "test-key"
MODEL = "tiny-run"


@pytest.fixture(scope="module")
def chat_model(tiny_run) -> ChatModel:
    return ChatModel.from_adapter(tiny_run)


@pytest.fixture(scope="module")
def base_url(chat_model):
    """A real uvicorn server in a background thread, on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    with running_server(create_app(ModelPool.from_chat_model(chat_model, MODEL), API_KEY)) as url:
        yield url


@contextmanager
def running_server(app) -> Iterator[str]:
    """`app` served by uvicorn in a background thread on a free loopback port; yields its /v1 URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)


def ask(client: openai.OpenAI, prompt: str, **options):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], **{"temperature": 0, "max_tokens": 40} | options
    )


def ask_streamed(client: openai.OpenAI, prompt: str, **options) -> tuple[list[str], list]:
    chunks = list(ask(client, prompt, stream=True, stream_options={"include_usage": True}, **options))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return pieces, chunks


def call(url: str, body: bytes | None = None, key: str | None = API_KEY) -> tuple[int, dict]:
    """A plain HTTP call (no client library): status and JSON body."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_gives_the_trained_reply_with_usage(client, chat_model):
    for record in MEMORISE:
        completion = ask(client, record["instruction"])
        choice = completion.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == record["output"]
        assert choice.finish_reason == "stop" and completion.model == MODEL
        prompt_ids = chat_model.chat_format.encode_prompt([Message("user", record["instruction"])])
        reply_ids = chat_model.tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        assert completion.usage.prompt_tokens == len(prompt_ids)
        assert completion.usage.completion_tokens == len(reply_ids) + 1  # and the end-of-turn token
        assert completion.usage.total_tokens == len(prompt_ids) + len(reply_ids) + 1


def test_streamed_completion_equals_the_plain_one(client):
    for record in MEMORISE[1:]:
        pieces, chunks = ask_streamed(client, record["instruction"])
        assert len(pieces) > 1 and "".join(pieces) == ask(client, record["instruction"]).choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > len(pieces) - 1


def test_max_tokens_ends_with_finish_reason_length(client):
    completion = ask(client, MEMORISE[1]["instruction"], max_tokens=2)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 2
    assert MEMORISE[1]["output"].startswith(completion.choices[0].message.content)


@pytest.mark.parametrize(("record", "stop", "expected"), [(1, "大理", "家父是"), (3, [" Zhen", "x y"], "I am")])
def test_stop_strings_cut_the_reply_plain_and_streamed(client, record, stop, expected):
    completion = ask(client, MEMORISE[record]["instruction"], stop=stop)
    assert completion.choices[0].message.content == expected and completion.choices[0].finish_reason == "stop"
    pieces, chunks = ask_streamed(client, MEMORISE[record]["instruction"], stop=stop)
    assert "".join(pieces) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_sampling_answers(client):
    completion = ask(client, "hello", temperature=1.0, top_p=0.9, max_tokens=5)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 5


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ],
)
def test_bad_requests_get_400_in_openai_shape(client, request_body, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, **request_body)
    error = raised.value.response.json()["error"]
    assert raised.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"] and set(error) == {"message", "type", "param", "code"}


def test_unknown_model_and_unknown_path_get_404(client, base_url):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.response.json()["error"]["code"] == "model_not_found"
    status, body = call(f"{base_url}/nowhere")
    assert status == 404 and body["error"]["message"]


def test_invalid_json_gets_400(base_url):
    status, body = call(f"{base_url}/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_missing_or_wrong_key_gets_401(base_url):
    wrong = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.models.list()
    assert raised.value.status_code == 401
    assert raised.value.response.json()["error"]["code"] == "invalid_api_key"
    status, body = call(f"{base_url}/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # before the body is even looked at


def test_twenty_concurrent_requests_are_queued_and_all_answered(client):
    def one(index: int) -> tuple[str, str]:
        record = MEMORISE[index % len(MEMORISE)]
        if index % 2:
            return "".join(ask_streamed(client, record["instruction"])[0]), record["output"]
        return ask(client, record["instruction"]).choices[0].message.content, record["output"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    assert [answer for answer, _ in results] == [expected for _, expected in results]


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["ab", "c<", "/s", ">d"], ["</s>"], ["ab", "c", "", ""]),
        (["a<", "b"], ["</s>"], ["a", "<b"]),
        (["xyz"], ["y", "z"], ["x"]),
        (["no stop"], [], ["no stop"]),
    ],
)
def test_stop_cutter_holds_back_only_what_may_start_a_stop(pieces, stops, expected):
    cutter = StopCutter(stops)
    given = [cutter.feed(piece) for piece in pieces]
    given[-1] += cutter.flush()
    assert given == expected


def test_serve_binds_to_loopback_by_default_and_warns_when_open_without_key(chat_model, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(serve_module.uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    pool = ModelPool.from_chat_model(chat_model, MODEL)
    serve_module.serve(pool)
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8000
    serve_module.serve(pool, host="0.0.0.0")
    assert "without an API key" in caplog.text
