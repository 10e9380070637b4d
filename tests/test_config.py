"""The config schema: every shipped YAML validates, precedence is defaults < YAML < overrides, errors are located."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lowtune.config import RunConfig, load_config, save_config
from lowtune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(REPO.joinpath("examples").rglob("*.yaml"))


def test_examples_are_found():
    assert {p.name for p in SHIPPED} >= {"huanhuan-qlora.yaml", "qwen-7b-chat-qlora.yaml", "qwen-7b-chat-lora8bit.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates_and_names_its_command(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert "lowtune train" in path.read_text(encoding="utf-8").split("\n", 3)[1]  # the header says how to run it


def test_the_tutorial_settings_are_in_the_gpu_examples():
    for name in ("qwen-7b-chat-qlora.yaml", "qwen-7b-chat-lora8bit.yaml"):
        config = load_config(REPO / "examples" / name)
        assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.1)
        assert (config.train.learning_rate, config.train.epochs) == (1e-4, 3)
        assert (config.train.batch_size, config.train.gradient_accumulation) == (8, 2)
        assert config.train.gradient_checkpointing is True
    assert load_config(REPO / "examples" / "qwen-7b-chat-qlora.yaml").model.double_quant is True


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-3\n  batch_size: 2\n")
    config = load_config(path, ["train.batch_size=16", "lora.target_modules=[q_proj, v_proj]", "data.system=你好"])
    assert config.train.learning_rate == 1e-3  # from the YAML
    assert config.train.batch_size == 16  # override beats YAML
    assert config.train.epochs is None and config.model.precision == "auto"  # defaults
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.data.system == "你好"


def test_an_override_replaces_the_files_other_way_of_saying_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lowtune.config")
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 4\n", encoding="utf-8")
    config = load_config(path, ["train.max_steps=6", "train.tokens_per_batch=2048"])
    assert (config.train.epochs, config.train.max_steps) == (None, 6)
    assert (config.train.batch_size, config.train.tokens_per_batch) == (None, 2048)
    assert "train.epochs from the file no longer applies" in caplog.text
    path.write_text("train:\n  epochs: 3\n  max_steps: 6\n", encoding="utf-8")
    with pytest.raises(UserError, match="not both"):  # within one file, both is still a contradiction
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["model.quantization=4bit", "lora.target_modules=.*proj"])
    assert load_config(save_config(config, tmp_path)) == config


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("model:\n  precision: fp8\n", 2, "model.precision"),
        ("lora:\n  r: 0\n", 2, "lora.r"),
        ("train:\n  lr: 0.1\n", 2, "unknown key 'train.lr'"),
        ("trian:\n  epochs: 1\n", 1, "unknown key 'trian'"),
        ("model:\n  quantization: 8bit\n  compute_dtype: bf16\n", 1, "compute_dtype applies to quantization: 4bit"),
        ("model:\n  quant_type: fp4\n", 1, "quant_type applies to quantization: 4bit only (here none)"),
        ("train:\n  epochs: 2\n  max_steps: 10\n", 1, "give epochs or max_steps, not both"),
        ("train:\n  batch_size: 2\n  tokens_per_batch: 4096\n", 1, "give batch_size or tokens_per_batch"),
        ("train:\n  eval_steps: 10\n", 2, "eval_steps needs held-out records"),
        ("data:\n  val_size: 0.1\n  eval_files: [x.jsonl]\n", 2, "give one"),
        ("model: [1, 2]\n", 1, "model"),
        ("train:\n  epochs: [\n", 3, "not valid YAML"),
    ],
)
def test_bad_configs_name_the_key_and_line(tmp_path, text, line, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    problem = caught.value.problems[0]
    assert problem.file in (path, str(path)) and problem.line == line and needle in str(problem)


def test_unknown_key_lists_the_known_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(UserError, match="known keys here: r, alpha, dropout, target_modules"):
        load_config(path)


def test_every_problem_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  precision: fp8\nlora:\n  r: -1\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert [p.line for p in caught.value.problems] == [2, 4]


@pytest.mark.parametrize("override", ["train.batch_size", "=3", "train..x=1"])
def test_malformed_overrides(override):
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_settings_changed_in_code_are_validated_too():
    from lowtune.config import ModelSettings

    four_bit = ModelSettings(quantization="4bit", quant_type="fp4")
    assert four_bit.updated(precision="fp32").precision == "fp32"
    with pytest.raises(UserError, match="quant_type applies to quantization: 4bit only"):
        four_bit.updated(quantization="none")  # what merge asks for, unless it clears the 4-bit settings too
    assert four_bit.updated(quantization="none", quant_type=None).quant_type is None


def test_a_run_folder_of_lowtune_0_1_still_loads(tmp_path):
    """lowtune 0.1 saved every default into lowtune.yaml, some of which now contradict each other."""
    from lowtune.config import load_run_config

    (tmp_path / "lowtune.yaml").write_text(
        "model:\n  precision: bf16\n  quantization: none\n  quant_type: nf4\n  double_quant: true\n"
        "train:\n  epochs: 1.0\n  max_steps: 60\n  batch_size: 8\n"
    )
    config = load_run_config(tmp_path)
    assert (config.model.quant_type, config.train.epochs, config.train.max_steps) == (None, None, 60)
    assert config.train.batch_size == 8 and config.model.precision == "bf16"
