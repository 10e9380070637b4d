"""Chat and generate read the saved chat format, keep history, and stop at the end of the turn."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lowtune.data.read import Message
from lowtune.errors import UserError
from lowtune.infer.chat import Conversation, chat_loop, generate_all, read_prompts
from lowtune.infer.session import ChatModel, GenerationSettings
from tests.conftest import MEMORISE


@pytest.fixture(scope="module")
def chat_model(tiny_run) -> ChatModel:
    return ChatModel.from_adapter(tiny_run)


def test_replies_come_from_the_trained_format_and_stop_at_the_end_of_turn(chat_model):
    """The adapter memorised MEMORISE in the saved chat format; it answers each prompt with exactly its reply."""
    settings = GenerationSettings(max_new_tokens=40)
    for record in MEMORISE:
        assert chat_model.reply([Message("user", record["instruction"])], settings) == record["output"]


def test_generation_stops_at_the_end_of_turn_token(chat_model):
    prompt = chat_model.chat_format.encode_prompt([Message("user", MEMORISE[0]["instruction"])])
    output = chat_model.model.generate(
        torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=chat_model.chat_format.stop_token_ids
    )
    new_tokens = output[0, len(prompt) :].tolist()
    im_end = chat_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert new_tokens[-1] == im_end and new_tokens.count(im_end) == 1 and len(new_tokens) < 40


def test_saved_format_wins_over_the_model_folder(tiny_run):
    saved = json.loads((tiny_run / "chat_format.json").read_text())
    model = ChatModel.from_adapter(tiny_run)
    assert model.chat_format.to_dict() == saved


def test_stream_yields_pieces_that_join_into_the_reply(chat_model):
    messages = [Message("user", MEMORISE[1]["instruction"])]
    pieces = list(chat_model.stream(messages, GenerationSettings(max_new_tokens=40)))
    assert len(pieces) > 1 and "".join(pieces) == MEMORISE[1]["output"]


def test_chat_loop_keeps_history_and_handles_commands(chat_model, monkeypatch):
    seen: list[list[Message]] = []
    original = chat_model.stream

    def recording_stream(messages, settings):
        seen.append(list(messages))
        return original(messages, settings)

    monkeypatch.setattr(chat_model, "stream", recording_stream)
    lines = iter(["皇上驾到！", "你是谁？", "/system 你是甄嬛", "今天天气如何？", "/reset", "Who are you?", "/exit"])
    chat_loop(chat_model, GenerationSettings(max_new_tokens=20), None, read_line=lambda _: next(lines))
    assert [len(messages) for messages in seen] == [1, 3, 2, 2]
    assert seen[1][:2] == [Message("user", "皇上驾到！"), Message("assistant", "皇上万福金安。")]
    assert seen[2][0] == Message("system", "你是甄嬛")
    assert seen[3] == [Message("system", "你是甄嬛"), Message("user", "Who are you?")]


def test_conversation_uses_the_trained_system_prompt_by_default(chat_model):
    prompt = chat_model.tokenizer.decode(chat_model.chat_format.encode_prompt(Conversation(None).messages("hi")))
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_generate_file_gives_one_json_answer_per_line(chat_model, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('"皇上驾到！"\n{"prompt": "你是谁？", "system": "S"}\n', encoding="utf-8")
    answers = [
        json.loads(line)
        for line in generate_all(chat_model, read_prompts(path), GenerationSettings(max_new_tokens=20), None)
    ]
    assert [a["prompt"] for a in answers] == ["皇上驾到！", "你是谁？"]
    assert answers[0]["response"] == "皇上万福金安。"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(UserError):
        read_prompts(bad)


def test_cli_generate_prompt(tiny_run, monkeypatch, capsys):
    from lowtune.cli import main

    monkeypatch.setattr(
        sys,
        "argv",
        ["lowtune", "generate", "--adapter", str(tiny_run), "--prompt", "皇上驾到！", "--max-new-tokens", "20"],
    )
    main()
    assert capsys.readouterr().out == "皇上万福金安。\n"


def test_not_a_run_folder(tmp_path):
    with pytest.raises(UserError, match="not a lowtune run"):
        ChatModel.from_adapter(tmp_path)
