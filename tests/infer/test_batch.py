"""Several adapters over one base, generated together: each row answers as its adapter does alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from lowtune.cli import _named_folders
from lowtune.data.read import Message
from lowtune.errors import UserError
from lowtune.infer.batch import Decoder, ModelPool, Row, generate_rows
from lowtune.infer.serve import create_app
from lowtune.infer.session import ChatModel, GenerationSettings
from tests.conftest import MEMORISE, tiny_config, write_jsonl
from tests.infer.test_serve import running_server

# The same questions, other answers: a second persona on the same base.
OTHER_ANSWERS = ["退下吧。", "本宫是华妃。", "雨。", "I am Hua."]
OTHER = [dict(record, output=answer) for record, answer in zip(MEMORISE, OTHER_ANSWERS, strict=True)]
GREEDY = GenerationSettings(max_new_tokens=24)


@pytest.fixture(scope="module")
def other_run(tmp_path_factory, tiny_qwen2) -> Path:
    from lowtune.recipe import run

    folder = tmp_path_factory.mktemp("other-run")
    data = write_jsonl(folder / "data.jsonl", OTHER)
    return run(tiny_config(tiny_qwen2, data, folder / "run", max_steps=30, learning_rate=1e-2))


@pytest.fixture(scope="module")
def pool(tiny_run, other_run) -> ModelPool:
    return ModelPool.from_adapters({"huan": tiny_run, "hua": other_run})


def alone(pool: ModelPool, name: str, prompt: str) -> str:
    """The reply of one request in a batch of its own."""
    pieces: list[str] = []
    served = pool.served[name]
    prompt_ids = served.chat_format.encode_prompt([Message("user", prompt)])
    generate_rows(pool, [Row(served, prompt_ids, GREEDY, pieces.append)])
    return "".join(pieces)


def test_a_mixed_batch_answers_as_each_adapter_alone(pool):
    prompts = [record["instruction"] for record in MEMORISE] + ["你好，请介绍一下你自己的家世和入宫的经过。"]
    expected = {(name, prompt): alone(pool, name, prompt) for name in ("huan", "hua") for prompt in prompts}
    assert expected[("huan", MEMORISE[1]["instruction"])] == MEMORISE[1]["output"]
    assert expected[("hua", MEMORISE[1]["instruction"])] == OTHER[1]["output"]
    rows, texts = [], {}
    for name, prompt in expected:  # both adapters, prompts of different lengths, in one batch
        served, pieces = pool.served[name], []
        texts[(name, prompt)] = pieces
        rows.append(Row(served, served.chat_format.encode_prompt([Message("user", prompt)]), GREEDY, pieces.append))
    generate_rows(pool, rows)
    assert {key: "".join(pieces) for key, pieces in texts.items()} == expected
    assert all(row.ended_turn for row in rows if len(row.new_ids) < GREEDY.max_new_tokens)


def test_rows_that_join_between_steps_answer_as_alone(pool):
    """Continuous batching: rows join a running batch (their cache padded to its length) and leave it as they end,
    each row as it would alone; a sampled row beside greedy ones changes none of them."""
    long_prompt = "你好，请介绍一下你自己的家世和入宫的经过。"
    asks = [("huan", long_prompt), ("hua", MEMORISE[1]["instruction"]), ("huan", MEMORISE[0]["instruction"])]
    expected = {ask: alone(pool, *ask) for ask in asks}
    texts: dict[tuple[str, str], list[str]] = {ask: [] for ask in asks}

    def row(ask: tuple[str, str], settings: GenerationSettings = GREEDY) -> Row:
        served = pool.served[ask[0]]
        prompt_ids = served.chat_format.encode_prompt([Message("user", ask[1])])
        return Row(served, prompt_ids, settings, texts.setdefault(ask, []).append if settings is GREEDY else str)

    decoder = Decoder(pool)
    first = row(asks[0])
    decoder.add([first])
    decoder.step()
    assert decoder.rows == [first] and len(first.new_ids) == 2  # under way: its reply is longer
    sampled = row(("hua", long_prompt), GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=0.9))
    decoder.add([row(asks[1]), sampled, row(asks[2])])
    assert len(decoder.rows) == 4
    while decoder.rows:
        decoder.step()
    assert {ask: "".join(texts[ask]) for ask in asks} == expected
    assert len(sampled.new_ids) > 0


def test_rows_end_on_their_own(pool):
    served = pool.served["huan"]
    prompt = served.chat_format.encode_prompt([Message("user", MEMORISE[1]["instruction"])])
    short = Row(served, prompt, GenerationSettings(max_new_tokens=2), lambda piece: None)
    cut = Row(served, prompt, GREEDY, lambda piece: None, stops=["大理"])
    gone = Row(served, prompt, GREEDY, lambda piece: None, cancelled=lambda: True)
    whole = Row(served, prompt, GREEDY, lambda piece: None)
    generate_rows(pool, [short, cut, gone, whole])
    assert len(short.new_ids) == 2 and not short.ended_turn
    assert cut.stopped_by_string and len(cut.new_ids) < len(whole.new_ids)
    assert len(gone.new_ids) == 1  # asked before each token: it stops after the first
    assert whole.ended_turn and whole.new_ids[-1] in served.chat_format.stop_token_ids


def test_adapters_of_another_base_are_refused(tiny_run, tmp_path, tiny_qwen3):
    from lowtune.recipe import run

    data = write_jsonl(tmp_path / "data.jsonl", MEMORISE[:1])
    qwen3_run = run(tiny_config(tiny_qwen3, data, tmp_path / "run", max_steps=1))
    with pytest.raises(UserError, match="model.path") as raised:
        ModelPool.from_adapters({"a": tiny_run, "b": qwen3_run})
    assert "separate lowtune serve" in str(raised.value)


def test_a_dora_adapter_is_served_alone_and_refused_beside_others(tiny_run, tmp_path, tiny_qwen2):
    from lowtune.recipe import run

    config = tiny_config(tiny_qwen2, write_jsonl(tmp_path / "data.jsonl", MEMORISE), tmp_path / "run", max_steps=20)
    config.lora.variant, config.train.learning_rate = "dora", 1e-2
    dora_run = run(config)
    with pytest.raises(UserError, match="'dora' is a DoRA adapter") as raised:
        ModelPool.from_adapters({"huan": tiny_run, "dora": dora_run})
    assert "a lowtune serve process of its own" in str(raised.value)
    pool = ModelPool.from_adapters({"dora": dora_run})
    question = MEMORISE[0]["instruction"]
    assert alone(pool, "dora", question) == ChatModel.from_adapter(dora_run).reply([Message("user", question)], GREEDY)


def test_adapter_names_from_the_command_line(tmp_path):
    assert _named_folders(["huan=runs/a", "runs/hua"], None) == {"huan": Path("runs/a"), "hua": Path("runs/hua")}
    assert _named_folders(["runs/a"], "mine") == {"mine": Path("runs/a")}
    with pytest.raises(UserError, match="two adapters are named 'a'"):
        _named_folders(["a=x", "a=y"], None)
    with pytest.raises(UserError, match="--name names one model"):
        _named_folders(["x", "y"], "mine")


def test_sixteen_concurrent_streamed_requests_to_two_adapters(pool):
    app = create_app(pool, api_key=None, max_batch=16)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert sorted(model.id for model in client.models.list().data) == ["hua", "huan"]
        start = threading.Barrier(16)

        def one(index: int) -> tuple[str, str]:
            name, records = ("huan", MEMORISE) if index % 2 else ("hua", OTHER)
            record = records[index % len(records)]
            start.wait(timeout=30)
            stream = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": record["instruction"]}],
                stream=True,
                temperature=0,
                max_tokens=40,
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices), record["output"]

        with ThreadPoolExecutor(max_workers=16) as threads:
            answers = list(threads.map(one, range(16)))
    assert [answer for answer, _ in answers] == [expected for _, expected in answers]
    assert app.state.worker.largest_batch > 1  # generated together, not one at a time


def test_one_model_from_a_chat_model(tiny_run):
    pool = ModelPool.from_chat_model(ChatModel.from_adapter(tiny_run), "tiny")
    assert list(pool.served) == ["tiny"] and pool.adapters == ["default"]
    assert alone(pool, "tiny", MEMORISE[0]["instruction"]) == MEMORISE[0]["output"]
