"""Attach peft LoRA adapters to a loaded model, with targets checked against the model's real layers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from lowtune.config import BASE_CHANGING_INITS, LoraSettings
from lowtune.errors import UserError
from lowtune.model.checkpointing import Checkpointing, enable_checkpointing

log = logging.getLogger(__name__)


# peft's init_lora_weights for each lora.init (pissa: the exact SVD, not the randomised one, so that a resumed run
# starts from the same residual base)
PEFT_INITS = {"default": True, "pissa": "pissa", "olora": "olora", "loftq": True}
INITIAL_ADAPTER_DIR = "initial_adapter"  # in the run folder: pissa's or olora's starting A and B
TRAINING_ADAPTER_DIR = "training_adapter"  # in a checkpoint: the adapter as trained (on the residual base), to resume


def attach_lora(
    model: PreTrainedModel,
    settings: LoraSettings,
    targets: list[str] | str,
    checkpointing: Checkpointing,
    run_dir: Path | None = None,
) -> PeftModel:
    """Wraps `model` with trainable LoRA adapters on `targets` (the resolved `lora.target_modules`, in the loaded
    model's names), started as `settings.init` says; the base stays frozen (and quantized, if it was).

    pissa and olora subtract their starting product from the base weights: that start is kept in `run_dir`
    (INITIAL_ADAPTER_DIR) so that saved adapters apply to the untouched base (`save_adapter`). loftq sets A and B
    from the unquantized weights in the model's safetensors files.
    """
    _check_targets(model, targets)
    enable_checkpointing(model, checkpointing)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_dora=settings.variant == "dora",
        use_rslora=settings.variant == "rslora",
        init_lora_weights=PEFT_INITS[settings.init],
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # peft's message when a regex or name matches no layer
        if "target" not in str(error).lower():
            raise
        raise UserError.one(
            f"lora.target_modules {targets!r} matches no layer of this model",
            fix="linear layers here: " + ", ".join(linear_module_names(model)),
        ) from None
    if settings.init == "loftq":
        _loftq(peft_model)
    if settings.init in BASE_CHANGING_INITS:
        _keep_initial_adapter(peft_model, _run_dir_for(settings, run_dir))
    return peft_model


def changes_base(model: PeftModel) -> bool:
    """Whether the adapter started by moving part of the base weights into itself (pissa, olora)."""
    return model.peft_config["default"].init_lora_weights in BASE_CHANGING_INITS


def save_adapter(model: PeftModel, folder: Path, run_dir: Path) -> None:
    """The adapter in `folder` as plain LoRA for the untouched base: for pissa and olora, the trained A and B with
    their starting ones appended (rank 2r, peft's conversion: W + s (B A - B0 A0) = W_res + s B A), and the adapter
    as trained moved to TRAINING_ADAPTER_DIR, which resuming loads. Other adapters are saved as they are already."""
    if not changes_base(model):
        return
    trained = folder / TRAINING_ADAPTER_DIR
    trained.mkdir(exist_ok=True)
    for name in (ADAPTER_CONFIG_FILE_NAME, ADAPTER_WEIGHTS_FILE_NAME):
        os.replace(folder / name, trained / name)
    model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(run_dir / INITIAL_ADAPTER_DIR))
    rank = 2 * model.peft_config["default"].r
    log.info("adapter saved as plain LoRA of rank %d for the original base in %s", rank, folder)


def _run_dir_for(settings: LoraSettings, run_dir: Path | None) -> Path:
    if run_dir is None:
        raise ValueError(f"lora.init {settings.init} keeps its starting adapter in the run folder: give run_dir")
    return run_dir


def _keep_initial_adapter(model: PeftModel, run_dir: Path) -> None:
    """Saves the starting A and B (peft's conversion reads them back as an adapter whose init must not run again)."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(str(run_dir / INITIAL_ADAPTER_DIR))
    finally:
        config.init_lora_weights = init


def _loftq(model: PeftModel) -> None:
    """peft's LoftQ for a loaded 4-bit model: A and B that make up for each layer's quantization error, from the
    unquantized weights of the model folder's safetensors files."""
    from peft import replace_lora_weights_loftq

    folder = Path(model.get_base_model().config._name_or_path)
    if not any(folder.glob("*.safetensors")):
        raise UserError.one(
            "lora.init loftq reads the model's unquantized weights from its safetensors files, and this folder has "
            "none (a Qwen-1 checkpoint is converted when loaded)",
            folder,
            fix="set lora.init: default, or save the model with safetensors",
        )
    replace_lora_weights_loftq(model, model_path=str(folder))
    # peft makes B A the residual's best rank-r part, ignoring the scale s that the forward multiplies it by (right
    # only for alpha = r; with s = 2 the start is as far from W as Q(W) was): B / s makes s B A that part.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.div_(module.scaling["default"])


ADAPTER_CONFIG_FILE_NAME, MODEL_CARD_FILE_NAME = "adapter_config.json", "README.md"  # what peft writes
ADAPTER_WEIGHTS_FILE_NAME = "adapter_model.safetensors"


def load_adapter_weights(model: PeftModel, folder: Path) -> None:
    """Sets the adapters of `model` to those saved in `folder` (train.init_adapter: the run starts from them); the
    two must have the same LoRA shape (preflight compares the lora settings first)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    loaded = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
    missing = [key for key in loaded.missing_keys if "lora_" in key]
    if missing or loaded.unexpected_keys:
        raise UserError.one(
            f"the adapter does not fit this model's LoRA layers ({len(missing)} missing, "
            f"{len(loaded.unexpected_keys)} unexpected weights)",
            folder,
            fix="give train.init_adapter a run trained on the same base with the same lora settings",
        )


def name_base_portably(folder: Path, reference: str) -> None:
    """Rewrites the base that a saved adapter names (adapter_config.json's base_model_name_or_path, and peft's model
    card) as `reference` (`model.default.portable_reference`) instead of this machine's folder. Done on the saved
    files: peft saving with a hub id would look the id up on the hub to compare vocabularies."""
    config_file = folder / ADAPTER_CONFIG_FILE_NAME
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    local = config.get("base_model_name_or_path")
    if not local or local == reference:
        return
    config_file.write_text(
        json.dumps(config | {"base_model_name_or_path": reference}, indent=2, sort_keys=True) + "\n", "utf-8"
    )
    card = folder / MODEL_CARD_FILE_NAME
    if card.is_file():
        card.write_text(card.read_text(encoding="utf-8").replace(local, reference), encoding="utf-8")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers (what `target_modules` lists may name)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    return sorted(names)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear8bitLt", "Linear4bit"}


def _check_targets(model: PreTrainedModel, targets: list[str] | str) -> None:
    if isinstance(targets, str):
        return  # all-linear or a regex: peft reports a regex that matches nothing
    available = linear_module_names(model)
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise UserError.one(
            f"lora.target_modules: no linear layer named {', '.join(unknown)} in this model",
            fix="linear layers here: " + ", ".join(available) + " (or all-linear)",
        )
