"""A run folder names its base portably: copied to another machine (another LOWTUNE_CACHE, another hub cache), it
loads in lowtune, the embedded base rebuilt on demand, and an adapter of a hub model loads in plain peft."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from lowtune.infer.session import ChatModel
from lowtune.model import default
from lowtune.model.default import DEFAULT_MODEL_HUB_ID, portable_reference, resolve_model_path
from lowtune.recipe import run
from tests.conftest import MEMORISE, tiny_config, write_jsonl

HUB_ID = "lowtune-tests/tiny-qwen2"
PROMPT = [151644, 872, 198, 105043, 100165, 11319, 151645, 198, 151644, 77091, 198]  # a ChatML prompt of Qwen's ids


def next_token_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT])).logits[0, -1]


def run_files_text(folder: Path) -> str:
    texts = [path.read_text(encoding="utf-8") for path in folder.rglob("*") if path.suffix in (".json", ".yaml", ".md")]
    return "\n".join(texts)


@pytest.fixture
def stand_in_for_the_gguf(tiny_qwen2, monkeypatch):
    """The embedded default's conversion writes the tiny model instead (the real GGUF takes ~30 s to convert); it
    counts the conversions, into which caches."""
    converted: list[Path] = []

    def convert(folder: Path, gguf_file: str, target: Path) -> None:
        shutil.copytree(tiny_qwen2, target)
        converted.append(target)

    monkeypatch.setattr(default, "_convert_gguf", convert)
    return converted


def test_an_embedded_default_run_loads_from_a_fresh_cache(tmp_path, monkeypatch, stand_in_for_the_gguf):
    monkeypatch.setenv("LOWTUNE_CACHE", str(tmp_path / "cache-a"))
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    output = run(tiny_config(Path("unused"), data, tmp_path / "run", ["model.path=null"], max_steps=3))
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == DEFAULT_MODEL_HUB_ID
    assert "cache-a" not in run_files_text(output)  # nothing in the run folder names this machine's cache
    trained = next_token_logits(ChatModel.from_adapter(output).model)

    copied = shutil.copytree(output, tmp_path / "elsewhere" / "run")
    monkeypatch.setenv("LOWTUNE_CACHE", str(tmp_path / "cache-b"))  # another machine: an empty cache
    loaded = ChatModel.from_adapter(copied).model
    assert stand_in_for_the_gguf == [tmp_path / "cache-a" / "models" / default.DEFAULT_MODEL_NAME] + [
        tmp_path / "cache-b" / "models" / default.DEFAULT_MODEL_NAME
    ]  # rebuilt where it was missing
    assert torch.equal(next_token_logits(loaded), trained)


def hub_snapshot(hub: Path, model: Path) -> Path:
    """`model` as a Hugging Face hub cache holds a download of HUB_ID."""
    repo = hub / f"models--{HUB_ID.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return Path(shutil.copytree(model, repo / "snapshots" / revision))


def test_a_hub_base_is_named_by_its_hub_id_for_plain_peft_and_lowtune(tmp_path, tiny_qwen2, monkeypatch):
    snapshot = hub_snapshot(tmp_path / "hub", tiny_qwen2)
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    output = run(tiny_config(snapshot, data, tmp_path / "run", max_steps=3))
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    trained = next_token_logits(ChatModel.from_adapter(output).model)

    # Another machine: the hub cache elsewhere, the training machine's snapshot folder gone.
    hub = Path(shutil.move(tmp_path / "hub", tmp_path / "other-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert torch.allclose(next_token_logits(ChatModel.from_adapter(output).model), trained, atol=1e-6)

    # Plain peft, offline, with that hub cache: the adapter names its base, and peft finds it.
    probe = (
        "import sys, torch; from peft import AutoPeftModelForCausalLM\n"
        "model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        f"print(model(input_ids=torch.tensor([{PROMPT}])).logits[0, -1].tolist())"
    )
    env = os.environ | {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", probe, str(output)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    logits = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    assert torch.allclose(logits, trained, atol=1e-5)


def test_portable_references(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWTUNE_CACHE", str(tmp_path / "cache"))
    assert portable_reference(None) == DEFAULT_MODEL_HUB_ID
    assert portable_reference(tmp_path / "cache" / "models" / default.DEFAULT_MODEL_NAME) == DEFAULT_MODEL_HUB_ID
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert portable_reference(snapshot) == "Qwen/Qwen2.5-7B-Instruct"
    assert portable_reference(tmp_path) == str(tmp_path.resolve())  # a plain folder: nothing more portable known


def test_the_embedded_hub_id_means_the_embedded_model(tmp_path, monkeypatch, stand_in_for_the_gguf):
    monkeypatch.setenv("LOWTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    assert resolve_model_path(DEFAULT_MODEL_HUB_ID) == tmp_path / "cache" / "models" / default.DEFAULT_MODEL_NAME
