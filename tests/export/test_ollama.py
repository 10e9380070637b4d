"""lowtune export ollama: a folder whose Modelfile, read as Ollama's parser reads it and rendered by Go's own
text/template with the data Ollama passes (its SYSTEM put first as Ollama puts it), gives lowtune chat's prompt token
for token in the exported GGUF's own tokenizer (llama.cpp), for a run of each chat format. No Ollama binary runs here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from lowtune.data.read import Message
from lowtune.data.templates import ChatFormat, QwenFormat, TokenizerFormat
from lowtune.errors import UserError
from lowtune.export.ollama import MODELFILE, OllamaTemplate, export_ollama, modelfile_text, stop_tokens
from lowtune.infer.session import ChatModel
from tests.conftest import MEMORISE, tiny_config, write_jsonl
from tests.export.conftest import PROMPTS

CONVERSATIONS = [[Message("user", prompt)] for prompt in PROMPTS] + [
    [Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "Who are you?")],
    [
        Message("system", "You are terse."),
        Message("user", "你好"),
        Message("assistant", "皇上万福金安。"),
        Message("user", '{{ .System }} and """\nquotes'),  # data, never read as template or Modelfile text
    ],
]

# Go's text/template given what Ollama's template package passes a TEMPLATE that ranges over .Messages: Ollama's
# chat handler puts the Modelfile's SYSTEM first when a conversation does not begin with a system message, then joins
# consecutive messages of one role with a blank line, and gives every system message's content as .System.
GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Request struct {
	Template      string
	System        string
	Conversations [][]Message
}

func main() {
	var request Request
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(request.Template))
	rendered := []string{}
	for _, messages := range request.Conversations {
		if request.System != "" && (len(messages) == 0 || messages[0].Role != "system") {
			messages = append([]Message{{Role: "system", Content: request.System}}, messages...)
		}
		var system []string
		var collated []*Message
		for i := range messages {
			if messages[i].Role == "system" {
				system = append(system, messages[i].Content)
			}
			if n := len(collated); n > 0 && collated[n-1].Role == messages[i].Role {
				collated[n-1].Content += "\n\n" + messages[i].Content
			} else {
				collated = append(collated, &messages[i])
			}
		}
		data := map[string]any{
			"System": strings.Join(system, "\n\n"), "Messages": collated, "Tools": nil, "Response": "",
			"Think": false, "ThinkLevel": "", "IsThinkSet": false,
		}
		var out strings.Builder
		if err := tmpl.Execute(&out, data); err != nil {
			panic(err)
		}
		rendered = append(rendered, out.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(rendered); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory) -> Path:
    """The Go program above, built once."""
    if shutil.which("go") is None:
        pytest.fail(
            "Go is not installed: the Modelfile's template is checked with Go's text/template. Install it: "
            "apt-get install -y golang-go"
        )
    folder = tmp_path_factory.mktemp("go-render")
    (folder / "main.go").write_text(GO_RENDER, encoding="utf-8")
    subprocess.run(["go", "build", "-o", "render", "main.go"], cwd=folder, check=True, timeout=300)
    return folder / "render"


def render_in_go(program: Path, modelfile: dict, conversations: list[list[Message]]) -> list[str]:
    request = {
        "Template": modelfile["template"],
        "System": modelfile.get("system", ""),
        "Conversations": [[{"Role": m.role, "Content": m.content} for m in c] for c in conversations],
    }
    done = subprocess.run([program], input=json.dumps(request), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def read_modelfile(text: str) -> dict:
    """Commands and values as Ollama's Modelfile parser reads them (its rules, written apart from lowtune's writer):
    `#` starts a comment line; a value runs to the first line break at which it is no longer inside a quote (three
    quotes or one), and loses its quotes; characters Go does not print are dropped; PARAMETER values add up in lists."""
    commands: dict = {}
    at = 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        if text[at] == "#":
            at = text.find("\n", at) + 1 or len(text)
            continue
        command, at = _word(text, at)
        command = command.lower()
        if command == "parameter":
            command, at = _word(text, at)
        value, at = _value(text, at)
        if command in ("from", "template", "system"):
            commands[command] = value
        else:
            commands.setdefault(command, []).append(value)
    return commands


def _word(text: str, at: int) -> tuple[str, int]:
    end = at
    while end < len(text) and (text[end].isalnum() or text[end] == "_"):
        end += 1
    assert text[end] in " \t", f"a command or parameter name must be followed by a space: {text[at : end + 5]!r}"
    return text[at:end], end + 1


def _value(text: str, at: int) -> tuple[str, int]:
    for end in [i for i, c in enumerate(text) if i >= at and c in "\r\n"] + [len(text)]:
        value = text[at:end].strip()
        for quote in ('"""', '"'):
            if value.startswith(quote):
                if len(value) >= 2 * len(quote) and value.endswith(quote):
                    kept = value[len(quote) : -len(quote)]
                    return "".join(c for c in kept if c.isprintable() or c in "\t\r\n"), end
                break
        else:
            return value, end
    raise AssertionError(f"a quoted value never ends: {text[at : at + 40]!r}")


@pytest.fixture(scope="module")
def runs(tiny_run, tiny_qwen2, tmp_path_factory) -> dict[str, Path]:
    """A run of each chat format: the tiny run (the Qwen tokenizer's own template), and qwen and seed runs."""
    from lowtune.recipe import run

    folder = tmp_path_factory.mktemp("formats")
    data = write_jsonl(folder / "data.jsonl", MEMORISE)
    made = {"tokenizer": tiny_run}
    for name in ("qwen", "seed"):
        settings = [f"data.template={name}"]
        made[name] = run(tiny_config(tiny_qwen2, data, folder / name, settings, max_steps=2))
    return made


@pytest.mark.parametrize("name", ["tokenizer", "qwen", "seed"])
def test_the_modelfile_renders_lowtune_chat_s_prompts_token_for_token(name, runs, go_render, tmp_path):
    commands = export_ollama(tmp_path / "ollama", adapter=runs[name], name="huanhuan")
    assert commands == [f"ollama create huanhuan -f {tmp_path / 'ollama' / MODELFILE}", "ollama run huanhuan"]
    assert [p.name for p in tmp_path.iterdir()] == ["ollama"]  # no staging folder left
    chat_format = ChatModel.from_adapter(runs[name]).chat_format
    assert chat_format.name == name
    modelfile = read_modelfile((tmp_path / "ollama" / MODELFILE).read_text(encoding="utf-8"))
    gguf = tmp_path / "ollama" / modelfile["from"]
    assert modelfile["from"] == "./model.gguf" and gguf.is_file()
    assert modelfile["stop"] == stop_tokens(chat_format) == ["<|im_end|>", "<|endoftext|>"]
    assert modelfile["temperature"] == ["0"] and modelfile["num_predict"] == ["256"]  # lowtune chat's defaults
    # The trained system prompt (the tokenizer format's is the one its template adds).
    assert modelfile["system"] == (chat_format.system or "You are a helpful assistant.")
    assert ".Messages" in modelfile["template"]  # Ollama passes the messages only to templates that use them
    vocabulary = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    for conversation, prompt in zip(CONVERSATIONS, render_in_go(go_render, modelfile, CONVERSATIONS), strict=True):
        # As Ollama's llama.cpp runner reads a prompt: the file's own BOS rule, special tokens parsed.
        ids = vocabulary.tokenize(prompt.encode(), add_bos=True, special=True)
        assert ids == chat_format.encode_prompt(conversation), prompt


def lowtune_text(chat_format: ChatFormat, messages: list[Message]) -> str:
    return "".join(segment.text for segment in chat_format.segments(messages, generation_prompt=True))


def test_template_text_go_or_the_modelfile_would_read_otherwise_is_escaped(qwen_tokenizer, go_render):
    # A header with braces, quotes (three, then a line break), a backslash, a tab and a character Go does not print.
    header = ' {" {{ .Role }} """\n\\\\ \t\u200d\n'
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '" + header + "' + m['content'] + '<|im_end|>}}\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant" + header + "' }}{% endif %}"
    )
    chat_format = TokenizerFormat(qwen_tokenizer, system='He said "hi" and """ twice', template=template)
    ollama = OllamaTemplate.of(chat_format)
    modelfile = read_modelfile(modelfile_text(ollama, stop_tokens(chat_format)))
    assert modelfile["system"] == chat_format.system
    rendered = render_in_go(go_render, modelfile, CONVERSATIONS)
    assert rendered == [lowtune_text(chat_format, conversation) for conversation in CONVERSATIONS]


SMOL_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_s_own_default_system_prompt_becomes_the_modelfile_s_system(qwen_tokenizer):
    assert OllamaTemplate.of(TokenizerFormat(qwen_tokenizer, template=SMOL_TEMPLATE)).system == "You are SmolLM"
    assert OllamaTemplate.of(TokenizerFormat(qwen_tokenizer, "Mine", template=SMOL_TEMPLATE)).system == "Mine"


def chatml(content: str, before: str = "") -> str:
    return (
        "{% for m in messages %}"
        + before
        + "{{ '<|im_start|>' + m['role'] + '\n' + "
        + content
        + " + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


# A blank line between a user message and a system message, not before other messages: text of two roles.
USER_THEN_SYSTEM = (
    "{% if not loop.first and loop.previtem['role'] == 'user' and m['role'] == 'system' %}{{ '\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "system", "refused"),
    [
        (chatml("m['content'] | trim"), None, "trims, escapes or rewrites"),
        (chatml("loop.index | string + m['content']"), None, "depends on both"),
        (chatml("m['content']", USER_THEN_SYSTEM), None, "depends on both"),
        (None, "", "empty system prompt"),
        (None, 'Say """\nthen stop', "three quotes before a line break"),
        (None, "zero\u200bwidth", "characters Ollama drops ('\\u200b')"),
    ],
)
def test_what_ollama_cannot_render_as_lowtune_does_is_refused_with_the_reason(
    template, system, refused, qwen_tokenizer
):
    if template is None:
        chat_format = QwenFormat(qwen_tokenizer, system)
    else:
        chat_format = TokenizerFormat(qwen_tokenizer, system, template=template, end_of_turn="<|im_end|>")
    with pytest.raises(UserError, match="cannot be written") as error:
        modelfile_text(OllamaTemplate.of(chat_format), stop_tokens(chat_format))
    assert refused in str(error.value) and "fix:" in str(error.value)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from lowtune.cli import main

    monkeypatch.setattr(sys, "argv", ["lowtune", *args])
    with pytest.raises(SystemExit) as exited:
        main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_the_cli_writes_the_folder_prints_the_commands_and_never_replaces_one_unasked(
    tiny_run, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "ollama"
    code, printed, _ = cli(monkeypatch, capsys, "export", "ollama", "--adapter", str(tiny_run), "--out", str(out))
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert printed.splitlines() == [f"ollama create run -f {out / MODELFILE}", "ollama run run"]
    written = (out / MODELFILE).read_text(encoding="utf-8")
    arguments = ["export", "ollama", "--model", str(tiny_run), "--out", str(out), "--type", "q4_k_m", "--name", "a b"]
    code, _, err = cli(monkeypatch, capsys, *arguments)
    assert code == 2 and "3 problems" in err and "not empty" in err and "llama-quantize" in err
    assert "not an Ollama model name" in err and (out / MODELFILE).read_text(encoding="utf-8") == written
