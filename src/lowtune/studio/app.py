"""lowtune studio: the whole job in a web page, on the CLI's own code path.

FastAPI (already what `lowtune serve` runs on) and one static page of plain JavaScript: no build step, nothing to
download at run time, and every check the page shows is the CLI's (`studio/form.py`). Runs, merges and exports are
`lowtune` processes (`studio/jobs.py`); chat loads the run's adapter in this process, one model at a time.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from lowtune.config import CONFIG_FILE_NAME, load_run_config
from lowtune.data.read import Message
from lowtune.errors import UserError
from lowtune.export.merge_check import REPORT_FILE_NAME as MERGE_REPORT
from lowtune.studio import jobs
from lowtune.studio.form import checked_settings, form_schema, form_values
from lowtune.studio.workspace import Workspace, run_overview
from lowtune.train.metrics import read_metrics
from lowtune.train.preflight import check_output_dir

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
RUN_FILES = ("loss.png", "length_histogram.png", "report.md", "eval_results.json")
MERGED_FOLDER = "merged"  # where the export page's merge writes, with its merge_report.json
HISTOGRAM_BINS = 20


class FormAnswers(BaseModel):
    overrides: list[str] = Field(default_factory=list)  # section.key=value, as --set


class SaveConfig(FormAnswers):
    path: str
    overwrite: bool = False


class RunRequest(BaseModel):
    path: str


class ExportRequest(RunRequest):
    kind: str  # merge, gguf, ollama
    gguf_type: str = "q8_0"


class ChatRequest(BaseModel):
    path: str  # the run folder
    messages: list[dict[str, str]]
    system: str | None = None
    with_base: bool = False
    max_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0, le=2)


def create_app(workspace: Workspace, token: str | None = None) -> FastAPI:
    """The studio for `workspace`; with `token`, every API call must send it (`Authorization: Bearer TOKEN`)."""
    app = FastAPI(title="lowtune studio", dependencies=[Depends(_token_checker(token))])
    chats = _Chats()

    @app.exception_handler(UserError)
    async def user_error(request: Any, error: UserError) -> JSONResponse:
        return JSONResponse({"problems": [str(problem) for problem in error.problems]}, status_code=400)

    @app.get("/api/schema")
    def schema() -> dict[str, Any]:
        return {"sections": form_schema(), "workspace": str(workspace.root)}

    @app.post("/api/config")
    def check(answers: FormAnswers) -> dict[str, Any]:
        text, config, problems = checked_settings(answers.overrides, workspace)
        return {"yaml": text, "valid": config is not None, "problems": problems}

    @app.get("/api/config/file")
    def config_file(path: Annotated[str, Query()]) -> dict[str, Any]:
        return {"values": form_values(workspace.path(path))}

    @app.post("/api/config/save")
    def save(request: SaveConfig) -> dict[str, Any]:
        text, config, problems = checked_settings(request.overrides, workspace)
        target = workspace.path(request.path)
        if config is None:
            return {"saved": None, "problems": problems}
        if target.exists() and not request.overwrite:
            raise UserError.one(f"{request.path} exists", fix="choose another name, or tick overwrite")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return {"saved": workspace.relative(target), "problems": []}

    @app.post("/api/runs")
    def start_run(answers: FormAnswers) -> dict[str, Any]:
        text, config, problems = checked_settings(answers.overrides, workspace)
        if config is None:
            return {"started": None, "problems": problems}
        run = Path(config.output_dir)
        check_output_dir(run, overwrite=False)
        config_file = workspace.studio_file(run, "yaml")
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(text, encoding="utf-8")
        jobs.start(workspace, run, ["train", str(config_file)])
        return {"started": workspace.relative(run), "problems": []}

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return {"runs": [run_overview(workspace, run) for run in workspace.runs()]}

    @app.get("/api/run")
    def run_detail(path: Annotated[str, Query()]) -> dict[str, Any]:
        run = workspace.path(path)
        detail = run_overview(workspace, run)
        detail["metrics"] = read_metrics(run)
        detail["log"] = jobs.log_tail(workspace, run)
        detail["export_log"] = jobs.log_tail(workspace, run, "export")
        detail["files"] = [name for name in RUN_FILES if (run / name).is_file()]
        for name, path in (
            ("eval_results", run / "eval_results.json"),
            ("merge_report", run / MERGED_FOLDER / MERGE_REPORT),
        ):
            if path.is_file():
                detail[name] = json.loads(path.read_text(encoding="utf-8"))
        if (run / "report.md").is_file():
            detail["report"] = (run / "report.md").read_text(encoding="utf-8")
        return detail

    @app.get("/api/run/file")
    def run_file(path: Annotated[str, Query()], name: Annotated[str, Query()]) -> FileResponse:
        if name not in RUN_FILES:
            raise HTTPException(404, f"no such run file: {name}")
        return FileResponse(workspace.path(path) / name)

    @app.post("/api/run/stop")
    def stop(request: RunRequest) -> dict[str, Any]:
        jobs.stop(workspace, workspace.path(request.path))
        return {"stopping": request.path}

    @app.post("/api/run/resume")
    def resume(request: RunRequest) -> dict[str, Any]:
        run = workspace.path(request.path)
        config_file = workspace.studio_file(run, "yaml")
        if not config_file.is_file():  # a run that the CLI started: its saved config
            config_file = run / CONFIG_FILE_NAME
        jobs.start(workspace, run, ["train", str(config_file), "--resume"])
        return {"resumed": request.path}

    @app.post("/api/run/export")
    def export(request: ExportRequest) -> dict[str, Any]:
        run = workspace.path(request.path)
        arguments = {
            "merge": ["merge", "--adapter", str(run), "--out", str(run / MERGED_FOLDER), "--overwrite"],
            "gguf": ["export", "gguf", "--adapter", str(run), "--out", str(run / f"model-{request.gguf_type}.gguf")],
            "ollama": ["export", "ollama", "--adapter", str(run), "--out", str(run / "ollama"), "--overwrite"],
        }
        if request.kind not in arguments:
            raise UserError.one(f"unknown export {request.kind!r}", fix="merge, gguf or ollama")
        extra = ["--type", request.gguf_type, "--overwrite"] if request.kind == "gguf" else []
        jobs.start(workspace, run, arguments[request.kind] + extra, task="export")
        return {"started": request.kind}

    @app.post("/api/data")
    def inspect(answers: FormAnswers) -> dict[str, Any]:
        from lowtune.eval.inspect import inspect_data

        text, config, problems = checked_settings(answers.overrides, workspace)
        if config is None:
            return {"report": None, "problems": problems}
        report = inspect_data(config, sample_count=3)
        return {"report": _data_page(report), "problems": []}

    @app.post("/api/chat")
    def chat(request: ChatRequest) -> StreamingResponse:
        run = workspace.path(request.path)
        messages = [Message(turn["role"], turn["content"]) for turn in request.messages]
        if request.system:
            messages.insert(0, Message("system", request.system))
        events = chats.replies(run, messages, request)
        return StreamingResponse(events, media_type="text/event-stream")

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def serve_studio(workspace: Workspace, host: str, port: int, token: str | None) -> None:
    """Serves the studio until interrupted; off loopback it always asks for a token (made up if none is given)."""
    import secrets

    import uvicorn

    from lowtune.infer.serve import is_loopback

    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(16)
    address = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    log.info("lowtune studio for %s at %s", workspace.root, address)
    uvicorn.run(create_app(workspace, token), host=host, port=port, log_level="warning")


class _Chats:
    """One run's model in memory at a time; one reply generated at a time (the CPU has no room for two)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[Path, Any] | None = None

    def replies(self, run: Path, messages: list[Message], request: ChatRequest) -> Iterator[str]:
        from lowtune.infer.session import GenerationSettings

        settings = GenerationSettings(max_new_tokens=request.max_tokens, temperature=request.temperature)
        with self._lock:
            model = self._model(run)
            for piece in model.stream(messages, settings):
                yield _event({"side": "adapter", "text": piece})
            if request.with_base:
                with model.model.disable_adapter():
                    for piece in model.stream(messages, settings):
                        yield _event({"side": "base", "text": piece})
        yield _event({"done": True})

    def _model(self, run: Path) -> Any:
        from lowtune.infer.session import ChatModel

        if self._loaded is None or self._loaded[0] != run:
            load_run_config(run)  # a folder that is no run is refused before any weight loads
            self._loaded = None
            self._loaded = (run, ChatModel.from_adapter(run))
        return self._loaded[1]


def _data_page(report: Any) -> dict[str, Any]:
    """`lowtune data inspect` as the data page shows it: the summary lines, the length histogram, the samples with
    their trained spans."""
    lengths = report.lengths
    top = max(max(lengths), 1)
    width = max(1, -(-top // HISTOGRAM_BINS))
    counts = [0] * HISTOGRAM_BINS
    for length in lengths:
        counts[min(length // width, HISTOGRAM_BINS - 1)] += 1
    return {
        "summary": report.summary(),
        "histogram": {"bin_width": width, "counts": counts, "max_length": report.max_length},
        "samples": [
            {"source": sample.source, "pieces": sample.pieces, "cut_tokens": sample.cut_tokens}
            for sample in report.samples
        ],
        "dropped": report.dropped,
        "truncated": report.truncated,
    }


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _token_checker(token: str | None) -> Any:
    """The page itself loads without the token (it holds nothing); every API call sends it."""

    async def no_token() -> None:
        return None

    if token is None:
        return no_token

    async def check_token(
        authorization: Annotated[str | None, Header()] = None,
        token_parameter: Annotated[str, Query(alias="token")] = "",
    ) -> None:
        given = (authorization or "").removeprefix("Bearer ").strip() or token_parameter  # an <img> sends no header
        if not hmac.compare_digest(given, token):
            raise HTTPException(401, "this studio needs its token: open the address it printed at start")

    return check_token
