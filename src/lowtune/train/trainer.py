"""transformers.Trainer set up from a lowtune config: arguments, collator, callbacks."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import rotate_checkpoints

from lowtune.config import RunConfig
from lowtune.data.batching import LengthBucketBatchSampler
from lowtune.data.pack import PackedCollator, PaddedCollator
from lowtune.errors import RunStopped
from lowtune.eval.evaluate import eval_loss
from lowtune.model.attention import choose_attention
from lowtune.train.kernels import apply_kernels
from lowtune.train.loss import install_hidden_state_loss
from lowtune.train.progress import RichProgressCallback
from lowtune.train.resume import STAGING_PREFIX, complete_checkpoints

log = logging.getLogger(__name__)


def mixed_precision(config: RunConfig) -> dict[str, bool]:
    """Autocast flags for Trainer; the adapters themselves stay fp32 (peft keeps them so)."""
    precision = config.model.precision
    if precision == "fp16" and not torch.cuda.is_available():
        log.info("fp16 on the CPU: no autocast (CPU autocast is bf16); fp16 weights, fp32 adapters")
        return {}
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(config: RunConfig, evaluate: bool = False) -> TrainingArguments:
    train = config.train
    evaluation = {}
    if evaluate:  # at the start (the base model's loss), every eval_steps, and at the end
        evaluation = dict(
            eval_strategy="steps", eval_steps=train.eval_steps or 5 * train.logging_steps, eval_on_start=True
        )
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # transformers reads a value below 1 as a share of the steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        data_seed=train.seed,
        report_to="none",  # TensorBoard is attached below, writing into the run folder
        disable_tqdm=True,
        logging_nan_inf_filter=False,  # a NaN loss must show (and stop the run), not be averaged away
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        **mixed_precision(config),
        **evaluation,
    )


class LowtuneTrainer(Trainer):
    """Trainer with lowtune's batches (similar lengths, shuffled by (seed, epoch), optionally by token budget) and
    an evaluation that weighs every held-out token alike and keeps no logits."""

    def __init__(
        self,
        *args: Any,
        batch_sampler: LengthBucketBatchSampler,
        checkpoint_files: Callable[[Path], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler
        self.checkpoint_files = checkpoint_files

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Atomic checkpoints: written under .tmp-checkpoint-N, completed with the run's own files (config, chat
        format, fingerprint), then renamed to checkpoint-N. A process killed while saving leaves only the staging
        folder behind, and every checkpoint-N is whole."""
        run_dir = Path(self._get_output_dir(trial))
        step = self.state.global_step
        staging = run_dir / f"{STAGING_PREFIX}{step}"
        shutil.rmtree(staging, ignore_errors=True)
        real_output_dir = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(staging)  # Trainer writes checkpoint-N inside this folder
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = real_output_dir
        self.accelerator.wait_for_everyone()  # every process has written its RNG state into the staging folder
        if not self.args.should_save:
            return
        written, final = staging / f"checkpoint-{step}", run_dir / f"checkpoint-{step}"
        if self.checkpoint_files is not None:
            self.checkpoint_files(written)
        os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit, use_mtime=False)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """Stops the run before an optimizer step would apply a NaN or infinite gradient (with fp16, infinities
        are the loss scaler's to skip; NaN still stops)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        value = float(grad_norm)
        if math.isnan(value) or (math.isinf(value) and not self.args.fp16):
            checkpoints = complete_checkpoints(Path(self.args.output_dir))
            last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written"
            raise RunStopped(
                f"the gradient became {value} at step {self.state.global_step + 1}: training stopped before "
                f"applying it; {last}.\n  fix: lower train.learning_rate, keep train.max_grad_norm, or train in "
                "bf16 rather than fp16; then resume with --resume (or start over)"
            )
        return grad_norm

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        rows = self.eval_dataset if eval_dataset is None else eval_dataset
        per_batch = max(1, len(self.train_dataset) // max(1, len(self.batch_sampler)))  # the training batches' size
        result = eval_loss(self.model, rows, self.data_collator, per_batch)
        metrics = {
            f"{metric_key_prefix}_loss": result["eval_loss"],
            f"{metric_key_prefix}_perplexity": result["perplexity"],
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def get_train_dataloader(self) -> DataLoader:
        """Every process plans the same global batches and takes its share of each (see the sampler), so that
        tokens_per_batch and gradient accumulation mean the same global batch for any number of processes."""
        self.batch_sampler.num_replicas, self.batch_sampler.rank = self.args.world_size, self.args.process_index
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        prepared = self.accelerator.prepare(loader)
        shard = getattr(prepared, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is self.batch_sampler:
            # accelerate must not share out the shares again, nor drop batches whose size differs from batch_size.
            shard.num_processes, shard.process_index, shard.batch_size = 1, 0, None
        return prepared


def resolve_packing(setting: bool | str) -> bool:
    """train.packing; auto packs on CUDA, where varlen attention makes packed rows free of padding and masks."""
    return torch.cuda.is_available() if setting == "auto" else bool(setting)


class GracefulStop(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the step, write a checkpoint, stop. A second signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signal = number
        log.warning(
            "%s: stopping after this step and writing a checkpoint (again to stop at once)", signal.Signals(number).name
        )

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


class FinalEvaluation(TrainerCallback):
    """Evaluates after the last step too, whether or not it falls on eval_steps."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy != "no" and state.global_step >= state.max_steps:
            control.should_evaluate = True


def build_trainer(
    config: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, list[int]]],
    eval_rows: list[dict[str, list[int]]] | None = None,
    checkpoint_files: Callable[[Path], None] | None = None,
) -> LowtuneTrainer:
    train = config.train
    packed = resolve_packing(train.packing)
    log.info("packing: %s", "one row per micro-batch, no padding" if packed else "padded batches of similar lengths")
    lengths = [len(row["input_ids"]) for row in rows]
    choose_attention(model.get_base_model(), train.attention, packed, max(lengths))
    collator = PackedCollator() if packed else PaddedCollator(tokenizer.pad_token_id)
    sampler = LengthBucketBatchSampler(lengths, train.batch_size, train.tokens_per_batch, packed, train.seed)
    install_hidden_state_loss(model.get_base_model())
    apply_kernels(model, train)
    trainer = LowtuneTrainer(
        model=model,
        args=training_arguments(config, evaluate=bool(eval_rows)),
        train_dataset=rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        processing_class=tokenizer,
        batch_sampler=sampler,
        checkpoint_files=checkpoint_files,
    )
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(RichProgressCallback())
    trainer.add_callback(FinalEvaluation())
    trainer.add_callback(GracefulStop())
    if trainer.is_world_process_zero():
        trainer.add_callback(TensorBoardCallback(SummaryWriter(str(Path(config.output_dir) / "tensorboard"))))
    budget = f"up to {train.tokens_per_batch} tokens" if train.tokens_per_batch else f"{train.batch_size} records"
    log.info("batches: %s of similar length (less padding), %d per epoch", budget, len(sampler))
    return trainer
