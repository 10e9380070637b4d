"""Model loading: precisions, quantizations, summaries, and the settings FSDP needs."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowtune.config import ModelSettings
from lowtune.errors import UserError
from lowtune.machine import this_machine
from lowtune.model.load import Loading, load_weights
from lowtune.model.summary import summary_table
from lowtune.recipe import load_model
from lowtune.train.resolve import resolve_loading


@pytest.mark.parametrize(
    ("precision", "quantization", "linear_type"),
    [
        ("fp32", None, "Linear"),
        ("bf16", None, "Linear"),
        ("bf16", "8bit", "Linear8bitLt"),
        ("bf16", "4bit", "Linear4bit"),
    ],
)
def test_load_model_api(tiny_qwen2, precision, quantization, linear_type):
    model, tokenizer = load_model(tiny_qwen2, precision=precision, quantization=quantization)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == linear_type
    assert model.model.embed_tokens.weight.dtype == Loading(precision).dtype
    assert tokenizer.pad_token_id is not None
    rendered = str(summary_table(model).columns[1]._cells)
    assert "cpu 100.0%" in rendered and ("4bit" in rendered) == (quantization == "4bit")


def test_fsdp_stores_4bit_weights_in_the_model_dtype_and_places_nothing():
    from dataclasses import replace

    fsdp = replace(this_machine(), fsdp=True, packages=frozenset({"bitsandbytes"}))
    loading = resolve_loading(ModelSettings(quantization="4bit", precision="bf16"), fsdp)
    assert loading.device_map is None and loading.bitsandbytes_config().bnb_4bit_quant_storage == torch.bfloat16
    plain = resolve_loading(ModelSettings(quantization="4bit", precision="bf16"), replace(fsdp, fsdp=False))
    assert plain.bitsandbytes_config().bnb_4bit_quant_storage == torch.uint8


def test_a_4bit_model_on_the_cpu_keeps_the_layout_training_needs(tiny_qwen2):
    settings = ModelSettings(path=str(tiny_qwen2), precision="fp32", quantization="4bit")
    model = load_weights(settings, Loading("fp32", "4bit", device_map={"": "cpu"}))
    assert model.model.layers[0].mlp.up_proj.support_avx512bf16_for_cpu is False


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)


def test_a_bin_file_with_pickled_code_is_refused_cleanly(tmp_path, tiny_qwen2):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen2, folder)
    state = dict(load_file(folder / "model.safetensors"), surprise=RunsCode())
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="refused: the file holds pickled objects"):
        load_weights(ModelSettings(path=str(folder), precision="fp32"), Loading("fp32", device_map={"": "cpu"}))
    assert not (tmp_path / "ran").exists()
