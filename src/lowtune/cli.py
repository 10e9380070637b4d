"""The `lowtune` command: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from lowtune.errors import USAGE_EXIT_CODE, RunStopped, UserError

# Plain (click) help: typer's rich panels label every flag `<bool>` as if it took a value, `--help` included.
PLAIN_HELP = {"rich_markup_mode": None}
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Low-precision LoRA fine-tuning of chat models: one config, one command.",
    **PLAIN_HELP,
)
convert_app = typer.Typer(
    no_args_is_help=True, help="Convert checkpoints into standard Hugging Face folders.", **PLAIN_HELP
)
app.add_typer(convert_app, name="convert")
data_app = typer.Typer(no_args_is_help=True, help="Look at training data before training on it.", **PLAIN_HELP)
app.add_typer(data_app, name="data")
export_app = typer.Typer(
    no_args_is_help=True, help="Write a run's model for other runtimes (llama.cpp, Ollama, vLLM).", **PLAIN_HELP
)
app.add_typer(export_app, name="export")
err_console = Console(stderr=True)
INTERRUPTED = 130

AdapterOption = Annotated[Path, typer.Option("--adapter", help="A lowtune run folder (or a checkpoint in it).")]
ModelOption = Annotated[str | None, typer.Option("--model", help="Base model folder, if it moved since training.")]
SystemOption = Annotated[str | None, typer.Option("--system", help="System prompt (default: the trained one).")]
MaxNewOption = Annotated[int, typer.Option("--max-new-tokens", help="Longest reply in tokens.")]
TemperatureOption = Annotated[float, typer.Option("--temperature", help="0 for greedy decoding.")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with temperature > 0).")]
# A run, or a model folder instead (export gguf, export ollama; serve's --model).
RunDirOption = Annotated[Path | None, typer.Option("--adapter", help="A lowtune run folder (or a checkpoint).")]
ModelDirOption = Annotated[Path | None, typer.Option("--model", help="A model folder instead (e.g. lowtune merge's).")]
BaseOption = Annotated[str | None, typer.Option("--base", help="The run's base model folder, if it moved.")]
IntoOption = Annotated[
    str | None,
    typer.Option(
        "--into",
        help="For an adapter trained on a 4-bit or 8-bit base: merge it into those quantized weights, dequantized "
        "(dequantized, the default: the merged model computes what base + adapter computed in training), or into "
        "the full-precision ones (original: without the rounding the adapter learned against). An error for an "
        "unquantized base.",
    ),
]


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config (see examples/).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Override model.path.")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="Override data.files (repeatable).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Override train.max_steps.")] = None,
    save_steps: Annotated[int | None, typer.Option("--save-steps", help="Override train.save_steps.")] = None,
    output_dir: Annotated[str | None, typer.Option("--output-dir", help="Override output_dir.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any override: section.key=value.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in output_dir.")] = False,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue from the newest checkpoint in output_dir, or from the one given."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even if the config or data changed.")] = False,
) -> None:
    """Fine-tune a LoRA adapter as CONFIG says (defaults: the embedded model and data)."""
    from lowtune.config import load_config
    from lowtune.train.preflight import check_before_loading

    overrides = [f"model.path={model}"] if model else []
    overrides += [f"data.files={_yaml_list(data)}"] if data else []
    overrides += [f"train.max_steps={max_steps}"] if max_steps is not None else []
    overrides += [f"train.save_steps={save_steps}"] if save_steps is not None else []
    overrides += [f"output_dir={output_dir}"] if output_dir else []
    run_config = load_config(config, overrides + (set_ or []))
    checked = check_before_loading(run_config, overwrite or resume is not None)  # user errors before torch loads
    route_library_logging()
    from lowtune.recipe import run

    run(run_config, overwrite, err_console, resume, force, checked)


@app.command()
def chat(
    adapter: AdapterOption,
    model: ModelOption = None,
    system: SystemOption = None,
    max_new_tokens: MaxNewOption = 256,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
) -> None:
    """Chat with a trained adapter (history kept; /reset, /system TEXT, /exit)."""
    route_library_logging()
    from lowtune.infer.chat import chat_loop
    from lowtune.infer.session import ChatModel, GenerationSettings

    chat_model = ChatModel.from_adapter(adapter, model)
    chat_loop(chat_model, GenerationSettings(max_new_tokens, temperature, top_p), system)


@app.command()
def generate(
    adapter: AdapterOption,
    prompt: Annotated[str | None, typer.Option("--prompt", help="One prompt; the reply goes to stdout.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="JSONL of prompts; one JSON answer a line.")] = None,
    model: ModelOption = None,
    system: SystemOption = None,
    max_new_tokens: MaxNewOption = 256,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
) -> None:
    """Answer one prompt (--prompt) or a file of prompts (--file)."""
    route_library_logging()
    from lowtune.infer.chat import Conversation, generate_all, read_prompts
    from lowtune.infer.session import ChatModel, GenerationSettings

    if (prompt is None) == (file is None):
        raise UserError.one("give exactly one of --prompt TEXT or --file prompts.jsonl")
    prompts = read_prompts(file) if file is not None else []
    chat_model = ChatModel.from_adapter(adapter, model)
    settings = GenerationSettings(max_new_tokens, temperature, top_p)
    if prompt is not None:
        for piece in chat_model.stream(Conversation(system).messages(prompt), settings):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for line in generate_all(chat_model, prompts, settings, system):
        print(line, flush=True)


@app.command()
def plan(
    config: Annotated[Path | None, typer.Argument(help="YAML config (see examples/).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Override model.path.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any override: section.key=value.")] = None,
) -> None:
    """Every choice the run would make on this machine, and its peak memory (GPU, or host memory on the CPU), before
    loading any weight."""
    from lowtune.config import load_config
    from lowtune.train.preflight import check_before_loading

    overrides = [f"model.path={model}"] if model else []
    run_config = load_config(config, overrides + (set_ or []))
    checked = check_before_loading(run_config, check_output=False)
    route_library_logging()
    from lowtune.recipe import prepare

    resolved = prepare(run_config, check_output=False, checked=checked).resolved
    console = Console()
    console.print(resolved.table())
    if resolved.plan is not None:
        console.print(resolved.plan.table())


@app.command()
def bench(
    modes: Annotated[str, typer.Option("--modes", help="Comma-separated: 4bit, 8bit, none (bf16).")] = "4bit,8bit,none",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per recipe.")] = 14,
    warmup: Annotated[int, typer.Option("--warmup", help="Steps left out of the timing (at least 1).", min=1)] = 3,
    tokens_per_batch: Annotated[
        int | None, typer.Option("--tokens-per-batch", help="A token budget per step (16384 unless --batch).")
    ] = None,
    batch: Annotated[
        str | None,
        typer.Option(
            "--batch",
            help="Comma-separated records per micro-batch x accumulation, each a regime: 8x2 (the tutorial's), "
            "2x4 (Unsloth's notebooks').",
        ),
    ] = None,
    peer: Annotated[str | None, typer.Option("--peer", help="Also race this peer (unsloth).")] = None,
    layers: Annotated[int | None, typer.Option("--layers", help="Fewer layers: a quick check, not recorded.")] = None,
    results: Annotated[Path, typer.Option("--results", help="JSON lines to append to.")] = Path("bench/results.jsonl"),
    profile: Annotated[
        Path | None, typer.Option("--profile", help="Folder for torch.profiler tables and timelines.")
    ] = None,
    checkpointing: Annotated[
        str,
        typer.Option(
            "--checkpointing",
            help="Comma-separated lowtune train.gradient_checkpointing settings, one lowtune run each: auto (what "
            "lowtune train picks on this GPU), offload (Unsloth's own memory policy), true or false.",
        ),
    ] = "auto",
    dropout: Annotated[
        float, typer.Option("--dropout", help="LoRA dropout: tutorial, lowtune (Unsloth: 0).", min=0, max=1)
    ] = 0.1,
    peer_checkpointing: Annotated[
        str, typer.Option("--peer-checkpointing", help="Unsloth's checkpointing: offload (its own) or false.")
    ] = "offload",
) -> None:
    """Race the tutorial's recipe and lowtune's (and a peer's) on a Qwen-7B-shaped model, on this GPU."""
    route_library_logging()
    from lowtune.bench.run import (
        CHECKPOINTING_SETTINGS,
        PEER,
        PEER_CHECKPOINTING_SETTINGS,
        QUANTIZATIONS,
        Regime,
        run_bench,
    )

    chosen, settings = _listed(modes), tuple(_listed(checkpointing))
    unknown = [mode for mode in chosen if mode not in QUANTIZATIONS]
    unknown_settings = [setting for setting in settings if setting not in CHECKPOINTING_SETTINGS]
    wrong_peer = peer not in (None, PEER) or peer_checkpointing not in PEER_CHECKPOINTING_SETTINGS
    if unknown or wrong_peer or unknown_settings or not settings:
        raise UserError.one(
            f"unknown --modes {unknown}, --peer {peer!r}, --checkpointing {checkpointing!r} or --peer-checkpointing "
            f"{peer_checkpointing!r}",
            fix=f"modes: 4bit, 8bit, none; peer: {PEER}; checkpointing: {', '.join(CHECKPOINTING_SETTINGS)}; "
            f"peer checkpointing: {', '.join(PEER_CHECKPOINTING_SETTINGS)}",
        )
    regimes = [Regime.parse(text) for text in _listed(batch or "")]
    if tokens_per_batch or not regimes:
        regimes.insert(0, Regime(tokens=tokens_per_batch or 16384))
    console = Console(width=170)
    run_bench(
        chosen, regimes, steps, warmup, peer, layers, results, console, profile, settings, dropout, peer_checkpointing
    )


def _listed(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("config")
def config_reference() -> None:
    """Print the config reference: every section and key, its default and what it does."""
    from lowtune.config import reference_markdown

    print(reference_markdown(), end="")


@convert_app.command("qwen1")
def convert_qwen1(
    src: Annotated[Path, typer.Argument(help="Qwen-1 folder (e.g. Qwen-7B-Chat).")],
    dst: Annotated[Path, typer.Argument(help="New folder for the Qwen2-format model.")],
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32.")] = "bf16",
) -> None:
    """Write a Qwen-1 checkpoint as a standard Qwen2 folder that transformers and vLLM load."""
    route_library_logging()
    from lowtune.model.arch.qwen1 import convert_qwen1 as convert

    convert(src, dst, dtype=dtype)
    err_console.print(f"[green]Converted {src} -> {dst}[/]")


@app.command("eval")
def eval_run(
    adapter: AdapterOption,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Records or preference pairs to evaluate on (default: the run's held-out ones)."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate the first N records only.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate the base model (adapter off) beside it.")] = False,
    max_new_tokens: MaxNewOption = 128,
    model: ModelOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Records per forward and generation.")] = 8,
) -> None:
    """Eval loss, perplexity, BLEU-4, ROUGE-L and stop rate on held-out records; on pairs (a DPO or ORPO run),
    preference accuracy, reward margin and rewards (writes eval_results.json)."""
    route_library_logging()
    from lowtune.eval.evaluate import RESULTS_FILE_NAME, SAMPLES_FILE_NAME, evaluate_run, results_table

    results = evaluate_run(adapter, data, limit, base, max_new_tokens, batch_size, model)
    Console().print(results_table(results))
    err_console.print(f"[green]Wrote {adapter / RESULTS_FILE_NAME} and {adapter / SAMPLES_FILE_NAME}[/]")


@data_app.command("inspect")
def data_inspect(
    config: Annotated[Path | None, typer.Argument(help="YAML config (see examples/).")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="Override data.files (repeatable).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any override: section.key=value.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Records to render with their trained spans.")] = 3,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the files (default: OUTPUT_DIR-data).")] = None,
) -> None:
    """Records, drops, duplicates, token lengths and trained spans of CONFIG's data; loads no model weights."""
    route_library_logging()
    from lowtune.config import load_config
    from lowtune.eval.inspect import default_folder, inspect_data, print_inspection, save_inspection

    overrides = [f"data.files={_yaml_list(data)}"] if data else []
    run_config = load_config(config, overrides + (set_ or []))
    report = inspect_data(run_config, samples)
    print_inspection(report, Console())
    written = save_inspection(report, out or default_folder(run_config))
    err_console.print(f"[green]Wrote {', '.join(str(path) for path in written)}[/]")


@app.command()
def merge(
    adapter: AdapterOption,
    out: Annotated[Path, typer.Option("--out", help="New folder for the merged model.")],
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32.")] = "bf16",
    model: ModelOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False,
    into: IntoOption = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="JSONL of prompts to compare on (strings or {prompt, system}); default: the run's held-out records, "
            "else the last records of its data.",
        ),
    ] = None,
    max_kl: Annotated[
        float, typer.Option("--max-kl", help="Highest mean KL(base + adapter || merged) that passes, in nats.")
    ] = 0.05,  # merge_check.DEFAULT_LIMITS (test_merge.py checks)
    min_agreement: Annotated[
        float, typer.Option("--min-agreement", help="Lowest share of next tokens picked alike that passes.")
    ] = 0.9,
    force: Annotated[bool, typer.Option("--force", help="Write the merge even if it crosses the limits.")] = False,
) -> None:
    """Merge the adapter into its base model: one folder that transformers, vLLM and lowtune serve load.

    The merged model is first compared with base + adapter as trained (greedy agreement and mean KL of the next
    tokens, written to merge_report.json); past the limits nothing is written, unless --force.
    """
    route_library_logging()
    from lowtune.export.merge import merge_adapter
    from lowtune.export.merge_check import MergeCheck
    from lowtune.export.verify import Limits

    check = MergeCheck(prompts_file=prompts, limits=Limits(max_kl, min_agreement), force=force)
    merge_adapter(
        adapter, out, dtype=dtype, model_path=model, overwrite=overwrite, into=into, check=check, console=Console()
    )
    err_console.print(f"[green]Merged {adapter} -> {out}[/]. Serve it: lowtune serve --model {out}")


@export_app.command("gguf")
def export_gguf(
    out: Annotated[Path, typer.Option("--out", help="The .gguf file to write.")],
    adapter: RunDirOption = None,
    model: ModelDirOption = None,
    gguf_type: Annotated[
        str, typer.Option("--type", help="f16, bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0 (K-quants: see the error).")
    ] = "f16",
    base: BaseOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    into: IntoOption = None,
) -> None:
    """One GGUF file (weights, tokenizer, the run's chat template and stop token) for llama.cpp and Ollama."""
    route_library_logging()
    from lowtune.export.gguf import export_gguf as write

    written = write(out, gguf_type, adapter=adapter, model=model, model_path=base, overwrite=overwrite, into=into)
    err_console.print(f"[green]Wrote {written}[/]. Run it: llama-cli -m {written} -cnv")


@export_app.command("ollama")
def export_ollama(
    out: Annotated[Path, typer.Option("--out", help="New folder for the GGUF and the Modelfile.")],
    adapter: RunDirOption = None,
    model: ModelDirOption = None,
    gguf_type: Annotated[str, typer.Option("--type", help="The GGUF's type, as for export gguf.")] = "q8_0",
    name: Annotated[
        str | None, typer.Option("--name", help="The model's name in Ollama (default: the folder's).")
    ] = None,
    base: BaseOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """A folder for Ollama: the GGUF and a Modelfile (template of the run's chat format, system prompt, stops)."""
    route_library_logging()
    from lowtune.export.ollama import export_ollama as write

    commands = write(out, gguf_type, adapter=adapter, model=model, model_path=base, name=name, overwrite=overwrite)
    print("\n".join(commands))  # the log said what was written; stdout has the commands alone, for scripts


@export_app.command("vllm")
def export_vllm(
    adapter: AdapterOption,
    out: Annotated[Path, typer.Option("--out", help="New folder for the adapter vLLM serves.")],
    name: Annotated[
        str | None, typer.Option("--name", help="The adapter's name in requests (default: the run's).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out folder.")] = False,
) -> None:
    """An adapter folder that vLLM's LoRA loader takes (its rules checked first), and the command that serves it."""
    route_library_logging()
    from lowtune.export.vllm import export_vllm as write

    command = write(adapter, out, name=name, overwrite=overwrite)
    err_console.print(f"[green]Wrote {out}[/]. Serve it with vLLM:")
    print(command)


@app.command()
def serve(
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="A lowtune run folder (or a checkpoint), as NAME=DIR to name it; repeat to serve several adapters "
            "of one base together.",
        ),
    ] = None,
    model: ModelDirOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="LOWTUNE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Model name clients send, for one model (default: the folder's).")
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Requests generated together (1: one at a time).", min=1)
    ] = 16,
    max_prompt_tokens: Annotated[
        int | None, typer.Option("--max-prompt-tokens", help="Longest prompt (default: the model's context).", min=1)
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests waiting for a batch; past it 429 + Retry-After.", min=1)
    ] = 64,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", help="Seconds a request may take; then 408.", min=0.1)
    ] = 300.0,
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", help="Largest request body; then 413.", min=0.01)
    ] = 4.0,
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", help="Seconds SIGTERM lets running requests finish.", min=0)
    ] = 10.0,
) -> None:
    """Serve models through an OpenAI-compatible API: /v1/chat/completions (streamed or not), /v1/models."""
    route_library_logging()
    from lowtune.infer.batch import ModelPool
    from lowtune.infer.serve import Limits
    from lowtune.infer.serve import serve as serve_api
    from lowtune.infer.session import ChatModel

    if bool(adapter) == (model is not None):
        raise UserError.one("give --adapter RUN_DIR (or NAME=RUN_DIR, repeatable), or --model MODEL_DIR")
    if model is not None:
        pool = ModelPool.from_chat_model(ChatModel.from_model_dir(model), name or model.resolve().name)
    else:
        pool = ModelPool.from_adapters(_named_folders(adapter, name))
    limits = Limits(max_prompt_tokens, int(max_body_mb * 2**20), request_timeout, max_queue, shutdown_timeout)
    serve_api(pool, host=host, port=port, api_key=api_key, max_batch=max_batch, limits=limits)


@app.command()
def studio(
    workspace: Annotated[
        Path, typer.Option("--workspace", help="Folder of the configs, data and runs that the page may use.")
    ] = Path("."),
    model_dir: Annotated[
        list[Path] | None, typer.Option("--model-dir", help="A model folder the page may train on (repeatable).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (not loopback: a token is required).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 7860,
    token: Annotated[
        str | None, typer.Option("--token", envvar="LOWTUNE_STUDIO_TOKEN", help="The page's token (default: made up).")
    ] = None,
) -> None:
    """The whole job in a web page: new run, data, runs (live), chat, export; on this machine only by default."""
    from lowtune.studio.app import serve_studio
    from lowtune.studio.workspace import Workspace

    if not workspace.is_dir():
        raise UserError.one("--workspace is not a folder", workspace)
    missing = [folder for folder in model_dir or [] if not folder.is_dir()]
    if missing:
        raise UserError.one(f"--model-dir {missing[0]} is not a folder")
    serve_studio(Workspace.at(workspace, model_dir), host, port, token)


def _named_folders(values: list[str], name: str | None) -> dict[str, Path]:
    """NAME=DIR or DIR (named by --name, else by the folder) for each --adapter, each name once."""
    if name is not None and len(values) > 1:
        raise UserError.one("--name names one model", fix="name each adapter as --adapter NAME=DIR")
    named: dict[str, Path] = {}
    for value in values:
        label, sep, folder = value.partition("=")
        if not sep or not label or "/" in label:
            label, folder = name or Path(value).resolve().name, value
        if label in named:
            raise UserError.one(f"two adapters are named {label!r}", fix="give each a name: --adapter NAME=DIR")
        named[label] = Path(folder)
    return named


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(repr(item) for item in items) + "]"


def setup_logging() -> None:
    level = os.environ.get("LOWTUNE_LOG_LEVEL", "INFO").upper()
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("lowtune").setLevel(level)
    # bitsandbytes warns at import that a hub-hosted CPU inference kernel is missing; lowtune never downloads.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def route_library_logging() -> None:
    """transformers' warnings through lowtune's log, at warning level. Called by each command before it imports the
    libraries (not at start-up: importing transformers, and with it torch, would slow `--help` and every user
    error)."""
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_default_handler()
    transformers.logging.enable_propagation()


def resume_without_value(argv: list[str]) -> list[str]:
    """`--resume` alone means the newest checkpoint: click options cannot take an optional value, so a bare
    `--resume` (not followed by a checkpoint-N folder) becomes `--resume latest`."""
    args = list(argv)
    for index, arg in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else None
        is_checkpoint = following is not None and re.fullmatch(r"checkpoint-\d+", Path(following).name)
        if arg == "--resume" and not is_checkpoint:
            args[index] = "--resume=latest"
    return args


def main() -> None:
    from lowtune.train.allocator import prefer_expandable_segments

    prefer_expandable_segments()
    setup_logging()
    try:
        code = app(args=resume_without_value(sys.argv[1:]), standalone_mode=False)
    except UserError as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(USAGE_EXIT_CODE)
    except RunStopped as stopped:
        err_console.print(f"[bold yellow]stopped:[/] {escape(str(stopped))}", highlight=False, soft_wrap=True)
        sys.exit(stopped.exit_code)
    except Exception as error:
        if hasattr(error, "show") and hasattr(error, "exit_code"):  # click's usage errors (typer vendors click)
            error.show()
            sys.exit(USAGE_EXIT_CODE)
        raise
    if code == INTERRUPTED:  # typer turns KeyboardInterrupt (a second Ctrl-C) into this code
        err_console.print("[yellow]interrupted: stopped at once, nothing saved since the last checkpoint[/]")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
