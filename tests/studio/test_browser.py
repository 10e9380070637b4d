"""The studio in a real browser (Debian's Chromium, driven by Playwright): fill the new-run form for a tiny model,
start the run, watch its loss curve grow, stop and resume it, look at the data, chat with the result (streamed,
beside the base model), merge it, and try a path outside the workspace.

Screenshots of each page go to $LOWTUNE_STUDIO_SCREENSHOTS when it is set (docs/img holds the README's).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lowtune.studio.app import create_app
from lowtune.studio.workspace import Workspace
from tests.conftest import MEMORISE, write_jsonl
from tests.infer.test_serve import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root in a container, on a machine without network: no sandbox, no GPU, no calls home.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECONDS = 1000  # Playwright counts milliseconds


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail("Chromium is missing: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def studio(tmp_path, tiny_qwen2):
    root = tmp_path / "workspace"
    root.mkdir()
    write_jsonl(root / "data.jsonl", MEMORISE)
    with running_server(create_app(Workspace.at(root, [tiny_qwen2]))) as url:
        yield url.removesuffix("/v1"), root


def shot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("LOWTUNE_STUDIO_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"studio-{name}.png"), full_page=False)


def field(page, key: str):
    return page.locator(f'[id="field-{key}"]')


def test_the_whole_job_in_the_browser(browser, studio, tiny_qwen2, tmp_path):
    url, root = studio
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(30 * SECONDS)
    page.goto(url)

    # New run: a path outside the workspace is refused at its field, with the CLI's words.
    field(page, "model.path").fill(str(tiny_qwen2))
    field(page, "data.files").fill("../../etc/passwd")
    error = page.locator('.field[data-key="data.files"] .error')
    error.filter(has_text="outside the workspace").wait_for()
    for key, value in {
        "data.files": "data.jsonl",
        "data.val_size": "0",
        "lora.dropout": "0",
        "train.max_steps": "400",
        "train.learning_rate": "1e-2",
        "train.logging_steps": "1",
        "train.save_steps": "0",
        "output_dir": "runs/tiny",
    }.items():
        field(page, key).fill(value)
    field(page, "model.precision").select_option("fp32")
    page.locator("#yaml").filter(has_text="max_steps: 400").wait_for()
    assert error.inner_text() == ""
    shot(page, "new-run", tmp_path)

    # Data: what the form's data gives, with the trained spans marked.
    page.click('nav a[data-page="data"]')
    page.click("#inspect")
    page.locator("#data-summary").wait_for()
    assert page.locator("#histogram rect").count() > 0
    assert page.locator("mark.trained").count() > 0
    shot(page, "data", tmp_path)

    # Start: the runs page follows the run; its loss curve gets new points.
    page.click('nav a[data-page="new"]')
    page.click("#start")
    page.locator("#run-state", has_text="running").wait_for()
    points = page.locator("#loss-curve circle.train-point")
    page.wait_for_function("document.querySelectorAll('#loss-curve circle.train-point').length >= 3")
    seen = points.count()
    page.wait_for_function(f"document.querySelectorAll('#loss-curve circle.train-point').length > {seen}")
    shot(page, "runs", tmp_path)

    # Stop writes a checkpoint and ends the process; Resume goes on from it to the end.
    page.click("#stop")
    page.locator("#run-state", has_text="stopped").wait_for(timeout=60 * SECONDS)
    stopped_at = points.count()
    assert stopped_at < 400 and (root / "runs" / "tiny").glob("checkpoint-*")
    page.click("#resume")
    page.locator("#run-state", has_text="finished").wait_for(timeout=180 * SECONDS)
    assert points.count() == 400

    # Chat: the trained reply, streamed, beside the base model's.
    page.click('nav a[data-page="chat"]')
    page.locator('#chat-run option[value="runs/tiny"]').wait_for(state="attached")
    page.select_option("#chat-run", "runs/tiny")
    page.check("#chat-base")
    page.fill("#chat-input", MEMORISE[1]["instruction"])
    page.click("#chat-send")
    page.locator(".adapter-reply", has_text=MEMORISE[1]["output"]).wait_for(timeout=120 * SECONDS)
    page.wait_for_function("!document.querySelector('#chat-send').disabled", timeout=120 * SECONDS)
    assert page.locator(".adapter-reply").inner_text() == MEMORISE[1]["output"]
    assert page.locator(".base-reply").inner_text() != MEMORISE[1]["output"]
    shot(page, "chat", tmp_path)

    # Export: a merge, verified against base + adapter, its figures on the page.
    page.click('nav a[data-page="export"]')
    page.locator('#export-run option[value="runs/tiny"]').wait_for(state="attached")
    page.select_option("#export-run", "runs/tiny")
    page.click("#export-merge")
    page.locator("#export-report", has_text="agreement").wait_for(timeout=180 * SECONDS)
    assert (root / "runs" / "tiny" / "merged" / "config.json").is_file()
    shot(page, "export", tmp_path)
