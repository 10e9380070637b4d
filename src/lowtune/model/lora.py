"""Attach peft LoRA adapters to a loaded model, with targets checked against the model's real layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from lowtune.config import LoraSettings
from lowtune.errors import UserError
from lowtune.model.checkpointing import Checkpointing, enable_checkpointing


def attach_lora(
    model: PreTrainedModel, settings: LoraSettings, targets: list[str] | str, checkpointing: Checkpointing
) -> PeftModel:
    """Wraps `model` with trainable LoRA adapters on `targets` (the resolved `lora.target_modules`, in the loaded
    model's names); the base stays frozen (and quantized, if it was)."""
    _check_targets(model, targets)
    enable_checkpointing(model, checkpointing)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # peft's message when a regex or name matches no layer
        if "target" not in str(error).lower():
            raise
        raise UserError.one(
            f"lora.target_modules {targets!r} matches no layer of this model",
            fix="linear layers here: " + ", ".join(linear_module_names(model)),
        ) from None


ADAPTER_CONFIG_FILE_NAME, MODEL_CARD_FILE_NAME = "adapter_config.json", "README.md"  # what peft writes


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
