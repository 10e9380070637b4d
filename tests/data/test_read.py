"""Reading and validating records: every kind of bad input names the file, the line and the problem."""

from __future__ import annotations

import json

import pytest

from lowtune.data.read import Message, read_examples
from lowtune.errors import UserError
from tests.conftest import write_jsonl


def problems_of(path, **kwargs) -> list:
    with pytest.raises(UserError) as caught:
        read_examples([str(path)], **kwargs)
    return caught.value.problems


def test_alpaca_json_array_keeps_line_numbers_and_fields(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(
        '[\n  {"instruction": "q1", "input": "", "output": "a1"},\n'
        '  {"instruction": "q2", "input": "ctx", "output": "a2", "system": "S",\n'
        '   "history": [["h1", "r1"]]}\n]\n',
        encoding="utf-8",
    )
    first, second = read_examples([str(path)])
    assert first.source == f"{path}:2" and second.source == f"{path}:3"
    assert first.messages == (Message("user", "q1"), Message("assistant", "a1"))
    assert second.messages == (
        Message("system", "S"),
        Message("user", "h1"),
        Message("assistant", "r1"),
        Message("user", "q2\nctx"),
        Message("assistant", "a2"),
    )


def test_input_separator_is_the_callers_choice(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "input": "x", "output": "a"}])
    (example,) = read_examples([str(path)], input_separator="")
    assert example.messages[0].content == "qx"


def test_chat_jsonl_multi_turn(tmp_path):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    (example,) = read_examples([str(path)])
    assert [m.role for m in example.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert example.system == "S"


def test_builtin_data_set_is_bundled():
    examples = read_examples(["builtin:huanhuan"])
    assert len(examples) == 3729
    assert examples[0].messages[-1].content == "你放心，本宫到任何时候都不会自轻自贱委屈了这孩子。"


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        ('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": \n', 2, "not valid JSON"),
        ('{"instruction": "q"}\n', 1, "missing field 'output'"),
        (
            '{"instrution": "q", "input": "", "output": "a"}\n',
            1,
            "did you mean 'instruction' instead of 'instrution'",
        ),
        ('{"instruction": 3, "output": "a"}\n', 1, "must be a string"),
        ('{"instruction": "q", "output": "   "}\n', 1, "empty 'output'"),
        ('{"instruction": "", "input": "", "output": "a"}\n', 1, "empty prompt"),
        ('{"instruction": "q", "output": "a", "history": [["only one"]]}\n', 1, "history[0]"),
        ('"just a string"\n', 1, "must be a JSON object"),
        ('{"messages": [{"role": "human", "content": "hi"}]}\n', 1, "unknown role 'human'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
            1,
            "expected",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "last message must be the assistant"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}\n',
            1,
            "content must be a string",
        ),
        ('\n\n{"foo": 1}\n', 3, "cannot tell the record's format"),
    ],
)
def test_bad_jsonl_records_name_file_line_and_problem(tmp_path, content, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    (problem,) = problems_of(path)
    assert problem.file == path and problem.line == line
    assert needle in str(problem)


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        (
            '[\n {"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}\n]',
            3,
            "not valid JSON",
        ),
        (
            '[\n {"instruction": "q", "output": "a"}\n {"instruction": "q", "output": "a"}\n]',
            3,
            "expected ','",
        ),
        ('[\n {"instruction": "q", "output": "a"},\n', 3, "not valid JSON"),
        ('[\n {"instruction": "q", "output": "a"}\n] trailing', 3, "after the closing"),
    ],
)
def test_bad_json_arrays(tmp_path, content, line, needle):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    (problem,) = problems_of(path)
    assert problem.line == line and needle in problem.message


def test_empty_missing_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("  \n", encoding="utf-8")
    assert "empty" in problems_of(empty)[0].message
    assert "not found" in problems_of(tmp_path / "nope.jsonl")[0].message
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "q", "output": "a"}\n{"instruction": "caf\xe9", "output": "a"}\n')
    (problem,) = problems_of(latin)
    assert problem.line == 2 and "UTF-8" in problem.message


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_jsonl(
        tmp_path / "many.jsonl",
        [
            {"instruction": "q", "output": "a"},
            {"instruction": "q"},
            {"output": "a"},
            {"instruction": "q", "output": ""},
        ],
    )
    problems = problems_of(path)
    assert [p.line for p in problems] == [2, 3, 4]
    assert "3 problems" in str(UserError(problems))


def test_a_file_with_no_records_is_refused(tmp_path):
    path = tmp_path / "none.json"
    path.write_text("[]", encoding="utf-8")
    assert "no training records" in problems_of(path)[0].message


def test_unknown_builtin_set():
    with pytest.raises(UserError, match="unknown built-in"):
        read_examples(["builtin:nope"])


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes("\ufeff".encode() + json.dumps([{"instruction": "q", "output": "a"}]).encode())
    assert len(read_examples([str(path)])) == 1
