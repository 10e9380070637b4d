"""transformers.Trainer set up from a lowtune config and its resolved choices: arguments, collator, callbacks."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable
from functools import partial
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

from lowtune import internals
from lowtune.config import RunConfig
from lowtune.data.batching import LengthBucketBatchSampler
from lowtune.data.pack import PackedCollator, PaddedCollator
from lowtune.data.templates import IGNORE_INDEX
from lowtune.errors import RunStopped
from lowtune.model.attention import set_attention
from lowtune.model.lora import TRAINING_ADAPTER_DIR, save_adapter
from lowtune.train.graphs import BUCKET, GraphedPasses
from lowtune.train.kernels import apply_kernels
from lowtune.train.loss import install_hidden_state_loss
from lowtune.train.metrics import MetricsFile
from lowtune.train.progress import EVAL_EVENT, RichProgressCallback
from lowtune.train.resolve import Resolved
from lowtune.train.resume import STAGING_PREFIX, complete_checkpoints
from lowtune.train.throughput import meter_throughput
from lowtune.train.validate import eval_loss

log = logging.getLogger(__name__)
TENSORBOARD_DIR_NAME = "tensorboard"  # in the run folder


def training_arguments(config: RunConfig, resolved: Resolved, evaluate: bool = False) -> TrainingArguments:
    """Trainer's arguments; autocast as resolved (the adapters themselves stay fp32: peft keeps them so)."""
    train = config.train
    evaluation = {}
    if evaluate:  # at the start (the base model's loss), every eval_steps, and at the end
        evaluation = dict(
            eval_strategy="steps", eval_steps=train.eval_steps or 5 * train.logging_steps, eval_on_start=True
        )
    return TrainingArguments(
        output_dir=config.output_dir,
        # The batch sampler makes the batches; merged micro-batches run as one (train/resolve.py).
        per_device_train_batch_size=(resolved.batching.records or 1) * resolved.batching.merged,
        gradient_accumulation_steps=resolved.batching.passes,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # transformers reads a value below 1 as a share of the steps
        weight_decay=train.weight_decay,
        optim="adamw_torch_fused",  # its update can be skipped on the device (the NaN guard below)
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.epochs or 1,
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
        dataloader_pin_memory=resolved.device != "cpu",
        # with pinned batches, no wait for the GPU at each copy (on the CPU accelerate would warn of no pinning)
        accelerator_config={"non_blocking": resolved.device != "cpu"},
        use_cpu=resolved.device == "cpu",
        bf16=resolved.autocast == "bf16",
        fp16=resolved.autocast == "fp16",
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
        cuda_graphs: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler
        self.checkpoint_files = checkpoint_files
        self.cuda_graphs = cuda_graphs
        self.row_collator = self.data_collator  # itself: the throughput meter later wraps data_collator
        self._graphed: GraphedPasses | None = None
        self._pass_sums: dict[str, torch.Tensor] = {}  # figures the passes since the last log added up (the device's)
        self._unchecked_gradient: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (not finite, norm, step)
        self.run_dir = Path(self.args.output_dir)  # checkpoints are written in a staging folder: the run's own

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter, saved (for pissa and olora) as plain LoRA for the untouched base (`lora.save_adapter`)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_adapter(self.model, Path(output_dir or self.args.output_dir), self.run_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resumes a pissa or olora run from the adapter as trained (on the residual base), not the converted one."""
        trained = Path(resume_from_checkpoint) / TRAINING_ADAPTER_DIR
        super()._load_from_checkpoint(str(trained) if trained.is_dir() else resume_from_checkpoint, model)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        result = super().train(*args, **kwargs)
        self._stop_if_a_gradient_was_not_finite()  # the last step's
        return result

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """With CUDA graphs, the pass replays from its capture (train/graphs.py); the loss is already divided by the
        step's target count, as Trainer's own step expects of a model that takes num_items_in_batch."""
        inputs.pop("real_tokens", None)  # the padded collator's count, for whoever times the step
        if not self.cuda_graphs:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._graph_inputs(inputs, num_items_in_batch)
        if self._graphed is None:
            params = [p for p in model.parameters() if p.requires_grad]
            self._graphed = GraphedPasses(partial(self.pass_outputs, model), params, self.compute_loss_context_manager)
            self._capture_epoch_shapes()
        outputs = self._graphed(inputs)
        loss = outputs.pop("loss")
        self._add_to_log(outputs)
        return loss

    def pass_outputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What one pass computes from a batch: its loss (divided by the step's target count), and any figures that
        the log adds up (none here)."""
        return {"loss": model(**batch).loss}

    def _add_to_log(self, sums: dict[str, torch.Tensor]) -> None:
        """Adds a pass's figures to those of the passes since the last log, on the device: no wait for the GPU."""
        for name, value in sums.items():
            self._pass_sums[name] = self._pass_sums.get(name, 0) + value.detach()

    def _capture_epoch_shapes(self) -> None:
        """Captures a graph for every row shape of this epoch's micro-batches at the first step, so that no later
        step stops for a capture (a later epoch's new shapes are captured when they come)."""
        assert self._graphed is not None
        shapes: dict[tuple[int, ...], list[int]] = {}
        for indices in self.batch_sampler:
            lengths = [len(self.train_dataset[i]["input_ids"]) for i in indices]
            shapes.setdefault(self.row_collator.shape(lengths), indices)
        rows = ", ".join(" x ".join(map(str, shape)) for shape in sorted(shapes))
        what = self.row_collator.shape_fields
        log.info("CUDA graphs: capturing this epoch's %d row shapes (%s: %s)", len(shapes), what, rows)
        for indices in shapes.values():
            self._graphed.capture(self._graph_inputs(self.row_collator([self.train_dataset[i] for i in indices])))

    def _graph_inputs(self, batch: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None) -> dict:
        """A collated batch on the device as the graphs take it: the step's target count a tensor there too (this
        batch's own when Trainer gives none)."""
        batch = self._prepare_inputs(batch)
        batch.pop("real_tokens", None)
        if num_items_in_batch is None:
            num_items_in_batch = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        batch["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, device=self.args.device)
        return batch

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Atomic checkpoints: written under .tmp-checkpoint-N, completed with the run's own files (config, chat
        format, fingerprint), then renamed to checkpoint-N. A process killed while saving leaves only the staging
        folder behind, and every checkpoint-N is whole."""
        self._stop_if_a_gradient_was_not_finite()  # never a checkpoint after a step that was skipped
        run_dir = Path(self._get_output_dir(trial))
        step = self.state.global_step
        staging = run_dir / f"{STAGING_PREFIX}{step}"
        shutil.rmtree(staging, ignore_errors=True)
        with internals.trainer_output_dir(self, str(staging)):  # Trainer writes checkpoint-N inside this folder
            super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every process has written its RNG state into the staging folder
        if not self.args.should_save:
            return
        written, final = staging / f"checkpoint-{step}", run_dir / f"checkpoint-{step}"
        if self.checkpoint_files is not None:
            self.checkpoint_files(written)
        if final.exists():  # resumed from an earlier checkpoint: this step's folder is of the steps trained again
            os.replace(final, staging / "replaced")
        os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        internals.rotate_checkpoints(str(run_dir), self.args.save_total_limit)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """The NaN guard: an optimizer step whose gradient is NaN (or infinite; with fp16 infinities are the loss
        scaler's to skip) is skipped on the GPU, and the run stops at the next step with the last good checkpoint
        named. Reading the flag a step late keeps the host from waiting for the GPU at every step (by then the GPU
        is long past it); the skipped update means nothing bad was applied in between."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._stop_if_a_gradient_was_not_finite()
        norm = torch.as_tensor(grad_norm)
        not_finite = (norm.isnan() if self.args.fp16 else ~norm.isfinite()).float()
        if not self.args.fp16:  # with fp16 the loss scaler sets the same flag, from the gradients themselves
            internals.skip_update_where(self.optimizer, not_finite)
        self._unchecked_gradient = (not_finite, norm, self.state.global_step + 1)
        return grad_norm

    def _stop_if_a_gradient_was_not_finite(self) -> None:
        if self._unchecked_gradient is None:
            return
        not_finite, norm, step = self._unchecked_gradient
        self._unchecked_gradient = None
        if not_finite.item():
            checkpoints = complete_checkpoints(Path(self.args.output_dir))
            last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written"
            raise RunStopped(
                f"the gradient became {norm.item()} at step {step}: training stopped without applying it; {last}.\n"
                "  fix: lower train.learning_rate, keep train.max_grad_norm, or train in bf16 rather than fp16; then "
                "resume with --resume (or start over)"
            )

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        rows = self.eval_dataset if eval_dataset is None else eval_dataset
        per_batch = max(1, len(self.train_dataset) // max(1, len(self.batch_sampler)))  # the training batches' size
        total = (len(rows), sum(len(row["input_ids"]) for row in rows))
        self._eval_progress(0, 0, total)
        result = eval_loss(self.model, rows, self.data_collator, per_batch, partial(self._eval_progress, total=total))
        metrics = {
            f"{metric_key_prefix}_loss": result["eval_loss"],
            f"{metric_key_prefix}_perplexity": result["perplexity"],
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _eval_progress(self, records: int, tokens: int, total: tuple[int, int]) -> None:
        """Tells the callbacks (the progress bar) how far the evaluation is, after each batch and before the first."""
        self.callback_handler.call_event(
            EVAL_EVENT,
            self.args,
            self.state,
            self.control,
            records_done=records,
            records_total=total[0],
            tokens_done=tokens,
            tokens_total=total[1],
        )

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
        internals.keep_batch_sampler(prepared, self.batch_sampler, self.args.world_size)
        return prepared


# The private Trainer methods LowtuneTrainer overrides: if transformers stopped calling one, the override (the atomic
# checkpoint, the NaN guard) would silently never run.
internals.check_overrides(
    LowtuneTrainer,
    Trainer,
    {
        "_save_checkpoint": ("model", "trial"),
        "_get_grad_norm": ("model", "grad_norm"),
        "training_step": ("model", "inputs", "num_items_in_batch"),
        "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    },
)


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
    resolved: Resolved,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, list[int]]],
    eval_rows: list[dict[str, list[int]]] | None = None,
    checkpoint_files: Callable[[Path], None] | None = None,
) -> LowtuneTrainer:
    """A Trainer for `model` (with its LoRA adapters) on the encoded `rows`, as `resolved` chose."""
    batching = resolved.batching
    lengths = [len(row["input_ids"]) for row in rows]
    collator = prepare_model_and_collator(model, resolved, tokenizer)
    sampler = LengthBucketBatchSampler(
        lengths, batching.records or 1, batching.tokens, batching.packed, config.train.seed, merge=batching.merged
    )
    trainer = LowtuneTrainer(
        model=model,
        args=training_arguments(config, resolved, evaluate=bool(eval_rows)),
        train_dataset=rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        processing_class=tokenizer,
        batch_sampler=sampler,
        checkpoint_files=checkpoint_files,
        cuda_graphs=resolved.cuda_graphs,
    )
    return with_callbacks(trainer, config)


def prepare_model_and_collator(
    model: PreTrainedModel, resolved: Resolved, tokenizer: PreTrainedTokenizerBase
) -> PackedCollator | PaddedCollator:
    """Sets the model's attention, loss from hidden states and kernels as resolved; returns the rows' collator."""
    set_attention(model.get_base_model(), resolved.attention)
    install_hidden_state_loss(model.get_base_model(), resolved.loss, resolved.onednn)
    apply_kernels(model, resolved)
    if resolved.batching.packed:
        return PackedCollator(BUCKET if resolved.cuda_graphs else None, tokenizer.pad_token_id or 0)
    return PaddedCollator(tokenizer.pad_token_id)


def with_callbacks(trainer: LowtuneTrainer, config: RunConfig) -> LowtuneTrainer:
    """lowtune's progress bar, final evaluation, Ctrl-C checkpoint, throughput meter, TensorBoard and metrics file."""
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(RichProgressCallback())
    trainer.add_callback(FinalEvaluation())
    trainer.add_callback(GracefulStop())
    meter = meter_throughput(trainer)  # after the callbacks that decide to evaluate, save or stop at a step's end
    if trainer.is_world_process_zero():
        trainer.add_callback(TensorBoardCallback(SummaryWriter(str(Path(config.output_dir) / TENSORBOARD_DIR_NAME))))
        trainer.add_callback(MetricsFile(config.output_dir, meter))
    return trainer
