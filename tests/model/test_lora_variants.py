"""LoRA variants (lora.variant) and starts (lora.init): each trains, the impossible ones are refused, and pissa and
olora adapters are saved as plain LoRA that gives the trained model's outputs on the untouched base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lowtune.config import load_config
from lowtune.errors import UserError
from lowtune.infer.session import ChatModel
from lowtune.model.checkpointing import Checkpointing
from lowtune.model.lora import INITIAL_ADAPTER_DIR, TRAINING_ADAPTER_DIR, attach_lora, save_adapter
from lowtune.recipe import run
from tests.conftest import MEMORISE, tiny_config, write_jsonl

OFF = Checkpointing("off")
VARIANTS = [
    ("dora", "default", "none"),
    ("dora", "default", "4bit"),
    ("rslora", "default", "none"),
    ("lora", "pissa", "none"),
    ("lora", "olora", "none"),
    ("rslora", "pissa", "none"),
    ("lora", "loftq", "4bit"),
]


def variant_config(tmp_path, model, variant, init, quantization="none", **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    settings = [f"lora.variant={variant}", f"lora.init={init}", f"model.quantization={quantization}"]
    return tiny_config(model, data, tmp_path / "run", settings, **train)


@pytest.mark.parametrize(("variant", "init", "quantization"), VARIANTS)
def test_each_variant_and_init_learns(tmp_path, tiny_qwen2, variant, init, quantization):
    output = run(variant_config(tmp_path, tiny_qwen2, variant, init, quantization, max_steps=12, learning_rate=1e-2))
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["last_logged_loss"] < 0.6 * summary["first_logged_loss"]
    choices = yaml.safe_load((output / "resolved.yaml").read_text())["choices"]
    assert choices["lora_variant"] == f"{variant}, init {init}"
    assert choices["fused_lora"] is (variant != "dora")  # the fused groups compute plain LoRA and rsLoRA only
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["use_dora"] is (variant == "dora") and saved["use_rslora"] is (variant == "rslora")
    assert saved["r"] == (16 if init in ("pissa", "olora") else 8)  # converted to plain LoRA for the original base


def test_loftq_starts_with_less_quantization_error(tiny_qwen2):
    """LoftQ's A and B make up for part of each layer's 4-bit error: Q(W) + s B A is nearer W than Q(W) is."""
    from lowtune.machine import this_machine
    from lowtune.model.fast_lora import dense_weight
    from lowtune.model.load import load_weights
    from lowtune.train.resolve import resolve_loading

    config = load_config(None, [f"model.path={tiny_qwen2}", "model.precision=fp32", "model.quantization=4bit"])
    config.lora.init = "loftq"
    model = attach_lora(
        load_weights(config.model, resolve_loading(config.model, this_machine())), config.lora, "all-linear", OFF
    )
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).model.layers[1].mlp.down_proj
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    quantized = dense_weight(layer.base_layer, torch.float32)
    start = quantized + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (start - original.weight).norm() < 0.95 * (quantized - original.weight).norm()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["lora.init=pissa", "model.quantization=4bit"], "lora.init pissa moves"),
        (["lora.init=olora", "model.quantization=8bit"], "a 8bit base cannot hold that residual"),
        (["lora.init=loftq"], "lora.init loftq makes up for the 4-bit quantization error"),
        (["lora.init=loftq", "model.quantization=8bit"], "this base is 8bit"),
        (["lora.variant=dora", "lora.init=pissa"], "DoRA takes its magnitudes"),
        (["lora.variant=dora", "model.quantization=8bit"], "finds no row scales"),
        (["lora.variant=qlora"], "lora.variant"),
        (["lora.init=pissa", "train.init_adapter=runs/sft"], "both say how the adapters start"),
    ],
)
def test_impossible_combinations_are_refused_with_the_reason(settings, message):
    with pytest.raises(UserError, match=message):
        load_config(None, settings)


def test_fused_lora_true_with_dora_is_refused(tmp_path, tiny_qwen2):
    config = variant_config(tmp_path, tiny_qwen2, "dora", "default", max_steps=1)
    config.train.fused_lora = True
    with pytest.raises(UserError, match="train.fused_lora: true cannot apply: lora.variant dora"):
        run(config)


def trained_pissa(tmp_path, model_folder, init="pissa"):
    """A pissa (or olora) model whose adapters moved away from their start, as training moves them."""
    from lowtune.machine import this_machine
    from lowtune.model.load import load_weights
    from lowtune.train.resolve import resolve_loading

    config = load_config(None, [f"model.path={model_folder}", "model.precision=fp32", f"lora.init={init}"])
    base = load_weights(config.model, resolve_loading(config.model, this_machine()))
    model = attach_lora(base, config.lora, "all-linear", OFF, run_dir=tmp_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_saved_pissa_adapter_gives_the_trained_outputs_on_the_original_base(tmp_path, tiny_qwen2, init):
    from peft import PeftModel

    model = trained_pissa(tmp_path, tiny_qwen2, init).eval()
    ids = torch.randint(0, 5000, (2, 12))
    trained = model(input_ids=ids).logits
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    save_adapter(model, folder, tmp_path)
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(input_ids=ids).logits, trained)  # the conversion left the model as it was
    assert (tmp_path / INITIAL_ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (folder / TRAINING_ADAPTER_DIR / "adapter_model.safetensors").is_file()
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(original, folder)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)(input_ids=ids).logits
    assert (plain - trained).abs().max() > 1e-2  # the adapter does change the outputs


def logged_losses(folder):
    return [e["loss"] for e in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def test_a_pissa_run_resumes_as_if_uninterrupted_and_reloads_in_chat(tmp_path, tiny_qwen2):
    """Its checkpoints hold the converted adapter (for chat) and the adapter as trained, which resuming loads."""
    config = variant_config(tmp_path, tiny_qwen2, "lora", "pissa", max_steps=6, save_steps=3)
    config.lora.dropout = 0.1  # dropout draws random numbers: resuming must restore the generator too
    config.train.save_total_limit = None
    output = run(config)
    uninterrupted = logged_losses(output)
    ids = torch.randint(0, 5000, (1, 10))
    trained = ChatModel.from_adapter(output).model(input_ids=ids).logits
    assert (output / "checkpoint-3" / TRAINING_ADAPTER_DIR / "adapter_model.safetensors").is_file()
    shutil.rmtree(output / "checkpoint-6")  # as if the run had stopped after step 3
    run(config, resume="latest")
    assert logged_losses(output) == pytest.approx(uninterrupted, rel=1e-5)
    torch.testing.assert_close(ChatModel.from_adapter(output).model(input_ids=ids).logits, trained)
