"""The studio's API without a browser: paths confined to the workspace and the model folders, the form checked with
the CLI's messages placed at their fields, the token, the metrics file a run writes, a run's state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lowtune.errors import UserError
from lowtune.studio.app import create_app
from lowtune.studio.workspace import Job, Workspace, run_state
from lowtune.train.metrics import METRICS_FILE_NAME, read_metrics
from tests.conftest import MEMORISE, write_jsonl


@pytest.fixture
def workspace(tmp_path, tiny_qwen2) -> Workspace:
    root = tmp_path / "workspace"
    root.mkdir()
    write_jsonl(root / "data.jsonl", MEMORISE)
    return Workspace.at(root, [tiny_qwen2])


def form(workspace: Workspace, *overrides: str) -> list[str]:
    return [f"model.path={workspace.model_folders[0]}", "data.files=[data.jsonl]", *overrides]


@pytest.mark.parametrize("given", ["../outside.jsonl", "/etc/passwd", "data/../../outside.jsonl"])
def test_paths_outside_the_workspace_are_refused(workspace, given):
    with pytest.raises(UserError, match="outside the workspace"):
        workspace.path(given)


def test_a_link_out_of_the_workspace_is_refused_and_model_folders_are_allowed(workspace, tmp_path):
    os.symlink(tmp_path, workspace.root / "escape")
    with pytest.raises(UserError, match="outside the workspace"):
        workspace.path("escape/anything")
    model = workspace.model_folders[0]
    assert workspace.path(model, models_too=True) == model
    with pytest.raises(UserError):
        workspace.path(model)  # a model folder is no place for data or runs
    assert workspace.path("runs/new") == workspace.root / "runs" / "new"


def test_the_form_is_the_config_schema(workspace):
    client = TestClient(create_app(workspace))
    sections = {section["name"]: section for section in client.get("/api/schema").json()["sections"]}
    assert list(sections) == ["model", "lora", "data", "train", "run"]
    fields = {field["key"]: field for section in sections.values() for field in section["fields"]}
    assert fields["model.quantization"]["kind"] == "choice"
    assert set(fields["model.quantization"]["choices"]) >= {"none", "8bit", "4bit"}
    assert fields["lora.r"] == fields["lora.r"] | {"kind": "number", "default": "8"}
    assert fields["data.files"]["kind"] == "lines"
    assert all(field["description"] for field in fields.values())


def test_form_problems_are_the_clis_at_their_fields(workspace):
    client = TestClient(create_app(workspace))
    answer = client.post("/api/config", json={"overrides": form(workspace, "lora.r=0", "train.learning_rate=-1")})
    problems = {problem["field"]: problem["message"] for problem in answer.json()["problems"]}
    assert not answer.json()["valid"]
    assert problems["lora.r"] == "lora.r: Input should be greater than 0"
    assert "train.learning_rate" in problems
    answer = client.post("/api/config", json={"overrides": form(workspace, "data.files=[../secret.jsonl]")})
    (problem,) = answer.json()["problems"]
    assert problem["field"] == "data.files" and "outside the workspace" in problem["message"]


def test_a_bad_record_is_shown_with_its_file_and_line(workspace):
    (workspace.root / "bad.jsonl").write_text('{"instruction": "hi", "output": "ok"}\n{"instruction": 3}\n')
    client = TestClient(create_app(workspace))
    answer = client.post("/api/config", json={"overrides": form(workspace, "data.files=[bad.jsonl]")}).json()
    (problem,) = answer["problems"]
    assert problem["field"] == "data.files"
    assert f"{workspace.root / 'bad.jsonl'}:2:" in problem["message"]


def test_valid_answers_give_their_yaml_and_save_inside_the_workspace_only(workspace):
    client = TestClient(create_app(workspace))
    answers = form(workspace, "train.max_steps=3")
    answer = client.post("/api/config", json={"overrides": answers}).json()
    assert answer["valid"] and "max_steps: 3" in answer["yaml"]
    saved = client.post("/api/config/save", json={"overrides": answers, "path": "configs/a.yaml"}).json()
    assert saved["saved"] == "configs/a.yaml"
    assert (workspace.root / "configs" / "a.yaml").read_text(encoding="utf-8") == answer["yaml"]
    refused = client.post("/api/config/save", json={"overrides": answers, "path": "../a.yaml"})
    assert refused.status_code == 400 and "outside the workspace" in refused.json()["problems"][0]
    assert not (workspace.root.parent / "a.yaml").exists()


def test_files_of_a_run_are_only_its_report_files(workspace):
    client = TestClient(create_app(workspace))
    assert client.get("/api/run/file", params={"path": ".", "name": "data.jsonl"}).status_code == 404
    assert client.get("/api/run/file", params={"path": "../..", "name": "report.md"}).status_code == 400


def test_a_token_guards_the_api_not_the_page(workspace):
    client = TestClient(create_app(workspace, token="secret"))
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer secret"}).status_code == 200
    assert client.get("/api/runs", params={"token": "secret"}).status_code == 200
    assert client.get("/").status_code == 200 and "lowtune studio" in client.get("/").text


def test_off_loopback_the_studio_makes_up_a_token(workspace, monkeypatch):
    import uvicorn

    from lowtune.studio import app

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **options: served.update(options, app=application))
    app.serve_studio(workspace, "0.0.0.0", 7860, None)
    assert TestClient(served["app"]).get("/api/runs").status_code == 401


def test_a_run_writes_its_metrics_and_a_resumed_one_replaces_the_lines_after_its_checkpoint(tmp_path, tiny_run):
    lines = read_metrics(tiny_run)
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, lines[0]["max_steps"] + 1))
    assert all(line["max_steps"] == lines[0]["max_steps"] and "peak_memory_gib" in line for line in lines)
    assert any("tokens_per_second" in line for line in lines)
    stopped = [{"step": step, "max_steps": 6, "first_step": 0, "seconds": step, "loss": 1.0} for step in (1, 2, 3, 4)]
    resumed = [{"step": step, "max_steps": 6, "first_step": 2, "seconds": step, "loss": 0.5} for step in (3, 4, 5)]
    (tmp_path / METRICS_FILE_NAME).write_text("".join(json.dumps(line) + "\n" for line in stopped + resumed) + '{"st')
    assert [(line["step"], line["loss"]) for line in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 1.0),
        (3, 0.5),
        (4, 0.5),
        (5, 0.5),
    ]


def test_run_states(workspace, tiny_run):
    run = workspace.root / "runs" / "a"
    assert run_state(workspace, run) == "new"
    Job(run, os.getpid(), ["lowtune", "train"], 0.0).write(workspace.studio_file(run, "train.job.json"))
    assert run_state(workspace, run) == "running"
    assert workspace.runs() == [run]  # listed from its job before lowtune train wrote anything
    Job(run, 2**22 + 12345, ["lowtune", "train"], 0.0).write(workspace.studio_file(run, "train.job.json"))
    assert run_state(workspace, run) == "failed"
    assert run_state(Workspace.at(tiny_run.parent), tiny_run) == "finished"


def test_the_form_loads_a_config_file_of_the_workspace(workspace):
    from lowtune.studio.form import checked_settings

    example = Path(__file__).resolve().parents[2] / "examples" / "huanhuan-qlora.yaml"
    (workspace.root / "examples").mkdir()
    shutil.copy(example, workspace.root / "examples")
    client = TestClient(create_app(workspace))
    values = client.get("/api/config/file", params={"path": "examples/huanhuan-qlora.yaml"}).json()["values"]
    assert values["model.quantization"] == "4bit" and values["output_dir"] == "runs/huanhuan-qlora"
    lists = {"data.files", "data.eval_files", "lora.target_modules"}  # sent as the page does: a YAML flow list
    overrides = [f"{key}=[{value}]" if key in lists else f"{key}={value}" for key, value in values.items()]
    _, config, problems = checked_settings(overrides, workspace)
    assert problems == [] and config.model.quantization == "4bit"
    refused = client.get("/api/config/file", params={"path": str(example)})
    assert refused.status_code == 400 and "outside the workspace" in refused.json()["problems"][0]
