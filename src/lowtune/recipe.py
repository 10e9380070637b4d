"""The LoRA fine-tuning recipe: prepare (check everything and decide every choice), train, save, evaluate, report.

Everything that can be checked without the model weights (config, data files, every record, the tokenizer,
the encoded lengths, the output folder, and whether each setting can apply on this machine) is checked before the
weights are read; the choices the config leaves open are made once, by `train/resolve.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, set_seed

from lowtune import __version__, internals
from lowtune.config import ModelSettings, RunConfig, save_config
from lowtune.data.encode import EncodedData
from lowtune.data.encoded import Records, Rows
from lowtune.data.mix import Mixture
from lowtune.data.preference import PreferenceData, prepare_preference_data
from lowtune.data.run_data import first_examples, prepare_data
from lowtune.data.templates import ChatFormat, build_chat_format
from lowtune.errors import RunStopped
from lowtune.eval.evaluate import RESULTS_FILE_NAME, SAMPLES_FILE_NAME, sample_generations
from lowtune.eval.inspect import analyse_records
from lowtune.eval.report import write_report
from lowtune.machine import Machine, this_machine
from lowtune.model import arch
from lowtune.model.attention import VARLEN
from lowtune.model.default import portable_reference
from lowtune.model.load import load_tokenizer, load_weights, resolve_model_path
from lowtune.model.lora import attach_lora, load_adapter_weights, name_base_portably
from lowtune.model.summary import summary_table
from lowtune.train.memory import GIB, MemoryPlan
from lowtune.train.metrics import METRICS_FILE_NAME
from lowtune.train.preference import build_preference_trainer
from lowtune.train.preflight import CheckedData, check_paths
from lowtune.train.resolve import Resolved, resolve_loading, resolve_run
from lowtune.train.resume import (
    check_same_run,
    complete_checkpoints,
    find_checkpoint,
    remove_staging,
    save_fingerprint,
)
from lowtune.train.throughput import Throughput, ThroughputMeter
from lowtune.train.trainer import TENSORBOARD_DIR_NAME, GracefulStop, LowtuneTrainer, build_trainer

log = logging.getLogger(__name__)
SUMMARY_FILE_NAME = "run_summary.json"
REPORT_SAMPLES = 3


@dataclass
class Setup:
    """What a run needs before its weights load: the records, their encoding, the chat format, the choices."""

    records: Records  # every record drawn from data.files, held-out ones included (pairs: the chosen sequences)
    tokenizer: PreTrainedTokenizerBase
    chat_format: ChatFormat
    data: EncodedData | PreferenceData
    held_out: Records
    held_out_rows: Rows | list
    resolved: Resolved
    mixture: Mixture
    held_out_pairs: PreferenceData | None = None  # train.method dpo or orpo


def prepare(
    config: RunConfig,
    overwrite: bool = False,
    check_output: bool = True,
    machine: Machine | None = None,
    checked: CheckedData | None = None,
) -> Setup:
    """Checks the output folder, reads and validates every record as it encodes it (or reads the encoded set from
    the cache), and resolves every choice of the run for `machine` (this one by default); loads no weights.

    `checked`: what `train/preflight.check_before_loading` found (the command line validates every record before
    importing torch, and the files are read again here to encode them); without it only the paths are checked first.
    """
    if checked is None:
        check_paths(config, overwrite, check_output)
    model_folder = resolve_model_path(config.model.path)
    tokenizer = load_tokenizer(config.model)
    chat_format = build_chat_format(config.data.template, tokenizer, config.data.system)
    log.info("chat format: %s (end of turn %s)", chat_format.name, chat_format.end_of_turn)
    if config.train.method != "sft":
        return _prepare_pairs(config, machine, model_folder, tokenizer, chat_format)
    prepared = prepare_data(config, chat_format)
    data = prepared.train
    log.info(
        "%d records read, %d trained on (%d cut by max_length, %d dropped), %d trained tokens",
        len(prepared.records),
        len(data.rows),
        data.truncated,
        len(data.dropped),
        data.trained_tokens,
    )
    if len(prepared.held_out):
        log.info("%d records held out for evaluation", len(prepared.held_out))
    model_config = arch.read_model_config(model_folder)
    resolved = resolve_run(config, machine or this_machine(), model_config, data.lengths, chat_format.name)
    resolved.log()
    return Setup(
        prepared.records,
        tokenizer,
        chat_format,
        data,
        prepared.held_out,
        prepared.held_out_rows,
        resolved,
        prepared.mixture,
    )


def _prepare_pairs(
    config: RunConfig,
    machine: Machine | None,
    model_folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    chat_format: ChatFormat,
) -> Setup:
    """`prepare` for train.method dpo or orpo: the preference pairs, the choices resolved for their lengths (chosen
    + rejected: both sequences of a pair run in the same micro-batch)."""
    prepared = prepare_preference_data(config, chat_format)
    data, held_out = prepared.train, prepared.held_out
    log.info(
        "%d preference pairs trained on (%d sequences cut by max_length, %d pairs dropped), %d held out",
        len(data.pairs),
        data.truncated,
        len(data.dropped),
        len(held_out.pairs) if held_out else 0,
    )
    resolved = resolve_run(
        config, machine or this_machine(), arch.read_model_config(model_folder), data.lengths, chat_format.name
    )
    resolved.log()
    chosen_held_out = held_out.chosen() if held_out else Records([])
    return Setup(data.chosen(), tokenizer, chat_format, data, chosen_held_out, [], resolved, prepared.mixture, held_out)


def run(
    config: RunConfig,
    overwrite: bool = False,
    console: Console | None = None,
    resume: str | None = None,
    force: bool = False,
    checked: CheckedData | None = None,
) -> Path:
    """Trains a LoRA adapter as the config says and returns the output folder.

    Args:
        config: the run.
        overwrite: replace a run already in output_dir (its checkpoints are removed first).
        console: where the model table and final message go.
        resume: "latest" (the newest complete checkpoint in output_dir) or a checkpoint folder.
        force: resume even if the config or data differ from the checkpoint's.
        checked: what `check_before_loading` found (the command line checks the records before importing torch),
            else they are checked here.
    """
    console = console or Console(stderr=True)
    output = Path(config.output_dir)
    setup = prepare(config, overwrite=overwrite or resume is not None, checked=checked)
    checkpoint = find_checkpoint(output, resume) if resume else None
    resolved = setup.resolved
    if checkpoint is not None:
        check_same_run(config, resolved, checkpoint, force, setup.mixture.digest())
        log.info("resuming from %s", checkpoint)
    elif overwrite:
        remove_previous_run(output)
    remove_staging(output)
    model = load_weights(config.model, resolved.loading)
    align_special_tokens(model, setup.tokenizer)
    set_seed(config.train.seed)  # the adapters' initial values too depend on the seed, not on what ran before
    model = attach_lora(model, config.lora, resolved.lora_targets, resolved.checkpointing, run_dir=output)
    if config.train.init_adapter:
        load_adapter_weights(model, Path(config.train.init_adapter))
        log.info("adapter initialised from %s", config.train.init_adapter)
    console.print(summary_table(model, title="Model with LoRA adapters"))
    checkpoint_files = partial(save_run_files, config, setup, resolved)
    if isinstance(setup.data, PreferenceData):
        trainer: LowtuneTrainer = build_preference_trainer(
            config, resolved, model, setup.tokenizer, setup.data, setup.held_out_pairs, checkpoint_files
        )
    else:
        trainer = build_trainer(
            config, resolved, model, setup.tokenizer, setup.data.rows, setup.held_out_rows, checkpoint_files
        )
    started = time.time()
    result = train_or_explain(trainer, checkpoint, resolved.plan)
    seconds = time.time() - started
    if trainer.is_world_process_zero():
        throughput = measure_throughput(trainer, config, resolved)
        console.print(throughput.describe(), highlight=False, soft_wrap=True)  # one line, also in a log file
        save_run(trainer, config, setup, output)
        write_summary(output, config, setup, trainer, result.metrics, seconds, throughput)
        write_run_report(output, config, setup, trainer)
        console.print(f"[green]Adapter saved to {output}[/]. Chat with it: lowtune chat --adapter {output}")
    return output


def train_or_explain(trainer: LowtuneTrainer, checkpoint: Path | None, plan: MemoryPlan | None) -> Any:
    """trainer.train(); a run stopped by a signal or by running out of memory ends with what to do next."""
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError:
        predicted = (
            f"lowtune plan predicted a peak of {plan.total / GIB:.1f} GiB for {plan.tokens:,} tokens per micro-batch"
            if plan
            else "no memory plan for this model family"
        )
        raise RunStopped(
            f"out of GPU memory ({predicted}).\n  fix: lower train.tokens_per_batch or train.batch_size "
            "(raise train.gradient_accumulation to keep the batch), set train.gradient_checkpointing: offload, "
            "or quantize the base (model.quantization: 4bit)"
        ) from None
    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GracefulStop))
    if stop.signal is not None:
        saved = complete_checkpoints(Path(trainer.args.output_dir))[-1]
        raise RunStopped(
            f"stopped by {signal.Signals(stop.signal).name} at step {trainer.state.global_step}; checkpoint "
            f"written to {saved}.\n  resume: run the same command with --resume",
            exit_code=128 + stop.signal,
        )
    return result


def measure_throughput(trainer: LowtuneTrainer, config: RunConfig, resolved: Resolved) -> Throughput:
    """The figures of the steps just trained (train/throughput.py), FLOPs included where the model family, and so
    its shape, is known."""
    meter = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputMeter))
    family = arch.family_named(resolved.family) if resolved.family else None
    shape = family.shape(trainer.model.config.to_dict()) if family else None
    return meter.figures(shape, config.lora.r, resolved.lora_targets)


def load_model(
    path: str | Path | None = None, precision: str = "auto", quantization: str | None = None, **settings: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Python API: a local model and its tokenizer, loaded as `lowtune train` would load them on this machine.

    Args:
        path: a local model folder (Hugging Face layout or Qwen-1); None for the embedded SmolLM2-135M-Instruct.
        precision: auto, fp32, fp16 or bf16.
        quantization: None/"none", "8bit" or "4bit".
        **settings: any other field of `ModelSettings` (quant_type, double_quant, compute_dtype, device_map).
    """
    model_settings = ModelSettings(
        path=None if path is None else str(path), precision=precision, quantization=quantization or "none", **settings
    )
    loading = resolve_loading(model_settings, this_machine())
    return load_weights(model_settings, loading), load_tokenizer(model_settings)


def write_run_report(output: Path, config: RunConfig, setup: Setup, trainer: Trainer) -> None:
    """loss.png, length_histogram.png and report.md, with a few replies of the trained model."""
    model = trainer.model
    if internals.attention_implementation(model) == VARLEN:  # generation runs on padded prompts, not packed rows
        model.get_base_model().set_attn_implementation("sdpa")
    shown = first_examples(setup.held_out if len(setup.held_out) else setup.records, REPORT_SAMPLES)
    samples = sample_generations(model, setup.chat_format, shown, count=REPORT_SAMPLES, max_new_tokens=64)
    data = analyse_records(setup.records, setup.chat_format, config.data.max_length, held_out=setup.held_out)
    data.mixture = setup.mixture.to_dict() if setup.mixture.is_drawn else []
    write_report(output, config, trainer.state.log_history, data, samples)


def align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer is the reference for pad and eos (the saved generation config then matches chat)."""
    for config in (model.config, model.generation_config):
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id


def save_run(trainer: Trainer, config: RunConfig, setup: Setup, output: Path) -> None:
    """The adapter, tokenizer, chat format, config and choices: everything chat and merge need."""
    trainer.save_model(str(output))  # adapter and tokenizer
    trainer.save_state()
    save_run_files(config, setup, setup.resolved, output)


def save_run_files(config: RunConfig, setup: Setup, resolved: Resolved, folder: Path) -> None:
    """What makes a run or checkpoint folder self-contained: chat, merge and resume read these; the adapter names
    its base portably, so that the folder copied to another machine loads there."""
    name_base_portably(folder, portable_reference(config.model.path))
    save_config(config, folder)
    resolved.save(folder)
    setup.chat_format.save(folder)
    save_fingerprint(config, folder, setup.mixture.digest())


def remove_previous_run(output: Path) -> None:
    """--overwrite: what the old run wrote that the new one would not replace goes: its checkpoints (they could be
    resumed by mistake), its TensorBoard logs (they would plot beside the new ones) and its evaluation results (of
    the old adapter). Only these names inside output_dir; a link among them is unlinked, never followed."""
    for checkpoint in complete_checkpoints(output):
        shutil.rmtree(checkpoint)
    for name in (TENSORBOARD_DIR_NAME, RESULTS_FILE_NAME, SAMPLES_FILE_NAME, METRICS_FILE_NAME):
        path = output / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    log.info("--overwrite: removed the previous run's checkpoints, logs and eval results in %s", output)


def write_summary(
    output: Path,
    config: RunConfig,
    setup: Setup,
    trainer: Trainer,
    metrics: dict[str, Any],
    seconds: float,
    throughput: Throughput,
) -> None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": metrics.get("train_loss"),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 1),
        "records": {
            "read": len(setup.records),
            "trained": len(setup.data.rows),
            "truncated": setup.data.truncated,
            "dropped": len(setup.data.dropped),
        },
        "trained_tokens_per_epoch": setup.data.trained_tokens,
        "preference": _preference_summary(setup, trainer.state.log_history),
        "mixture": setup.mixture.to_dict() if setup.mixture.is_drawn else None,
        "peak_memory_gib": round(throughput.peak_memory_gib, 3),  # read before the bf16 benchmark raised it
        "throughput": throughput.summary(),
        "device": setup.resolved.machine,
        "versions": {"lowtune": __version__}
        | {name: metadata.version(name) for name in ("torch", "transformers", "peft")},
        "config": config.model_dump(mode="json"),
    }
    (output / SUMMARY_FILE_NAME).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")


def _preference_summary(setup: Setup, log_history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Pairs trained and held out, and the last evaluation's loss, rewards, margin and preference accuracy."""
    if not isinstance(setup.data, PreferenceData):
        return None
    evaluations = [entry for entry in log_history if "eval_accuracy" in entry]
    last = {key.removeprefix("eval_"): value for key, value in evaluations[-1].items()} if evaluations else None
    return {
        "method": setup.resolved.choices()["method"],
        "pairs": len(setup.data.pairs),
        "held_out_pairs": len(setup.held_out_pairs.pairs) if setup.held_out_pairs else 0,
        "last_eval": last,
    }
