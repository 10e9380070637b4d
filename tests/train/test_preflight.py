"""User errors are found before torch is imported: `lowtune --help`, a config error, an output folder that holds a
run and a malformed data file each end in a fresh process without torch or transformers in `sys.modules`.

A check of what is imported rather than of seconds (bench/first_error.py times the same cases).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MEMORISE, write_jsonl

PROBE = """
import json, sys
from lowtune.cli import main
sys.argv = ["lowtune", *json.loads(sys.argv[1])]
try:
    main()
    code = 0
except SystemExit as exited:
    code = exited.code
heavy = sorted(name for name in ("torch", "transformers", "peft", "bitsandbytes") if name in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def probe(arguments: list[str], cwd: Path) -> dict:
    src = Path(__file__).resolve().parents[2] / "src"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(arguments)], cwd=cwd, env=env, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"err": done.stderr}


def cases(tmp_path: Path) -> dict[str, tuple[list[str], int, str]]:
    good = write_jsonl(tmp_path / "good.jsonl", MEMORISE)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": 3\n', encoding="utf-8")
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  max_stepz: 3\n", encoding="utf-8")
    held = tmp_path / "held"
    held.mkdir()
    (held / "adapter_config.json").write_text("{}", encoding="utf-8")
    return {
        "help": (["--help"], 0, ""),
        "train help": (["train", "--help"], 0, ""),
        "config error": (["train", str(config)], 2, "unknown key 'train.max_stepz'"),
        "output_dir holds a run": (
            ["train", "--data", str(good), "--output-dir", str(held)],
            2,
            "output_dir already holds a run",
        ),
        "data-format error": (
            ["train", "--data", str(bad), "--output-dir", str(tmp_path / "new")],
            2,
            "not valid JSON",
        ),
        "missing model folder": (
            ["train", "--model", str(tmp_path / "nowhere"), "--data", str(good), "--output-dir", str(tmp_path / "n")],
            2,
            "model folder not found",
        ),
        "plan with a data-format error": (["plan", "--set", f"data.files=[{bad}]"], 2, "not valid JSON"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "help",
        "train help",
        "config error",
        "output_dir holds a run",
        "data-format error",
        "missing model folder",
        "plan with a data-format error",
    ],
)
def test_user_error_before_torch_is_imported(case, tmp_path):
    arguments, code, needle = cases(tmp_path)[case]
    result = probe(arguments, tmp_path)
    assert result["code"] == code, result["err"]
    assert needle in result["err"].replace("\n", " ")
    assert result["heavy"] == [], f"imported before the error: {result['heavy']}"
