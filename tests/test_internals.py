"""One test per private part of a library that lowtune uses (`lowtune/internals.py`): each fails when the installed
library no longer has it, or no longer behaves as lowtune relies on."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer

from lowtune import internals

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def tiny_model(attention: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, **TINY))
    model.set_attn_implementation(attention)
    return model


# --- transformers -------------------------------------------------------------------------------------------------


def test_the_trainer_methods_lowtune_overrides_are_still_there():
    from lowtune.train.trainer import LowtuneTrainer  # checks them at import

    overridden = {"_save_checkpoint": ("model", "trial"), "_get_grad_norm": ("model", "grad_norm")}
    assert internals.check_overrides(LowtuneTrainer, Trainer, overridden) is LowtuneTrainer

    class Old:
        def _get_grad_norm(self, model):
            return 0

    with pytest.raises(internals.LibraryChanged, match="now takes"):
        internals.check_overrides(LowtuneTrainer, Old, {"_get_grad_norm": ("model", "grad_norm")})
    with pytest.raises(internals.LibraryChanged, match="no longer has"):
        internals.check_overrides(LowtuneTrainer, Old, {"_save_checkpoint": ("model", "trial")})


def test_trainer_saves_its_checkpoint_where_its_output_dir_says():
    assert "self._get_output_dir(trial" in inspect.getsource(Trainer._save_checkpoint)

    class Holder:
        def _get_output_dir(self, trial=None):
            return "real"

    holder = Holder()
    with internals.trainer_output_dir(holder, "/staging"):
        assert holder._get_output_dir(None) == "/staging"
    assert holder._get_output_dir(None) == "real"


def test_rotate_checkpoints_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    internals.rotate_checkpoints(str(tmp_path), 1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-30"]


def test_the_modeling_files_functions_are_the_ones_the_model_calls():
    from transformers.models.qwen2 import modeling_qwen2

    attention = tiny_model().model.layers[0].self_attn
    assert internals.modeling_function(attention, "apply_rotary_pos_emb") is modeling_qwen2.apply_rotary_pos_emb
    with pytest.raises(internals.LibraryChanged):
        internals.modeling_function(attention, "no_such_function")


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_the_attention_function_is_the_configured_one(name):
    from transformers.models.qwen2 import modeling_qwen2

    model = tiny_model(name)
    assert internals.attention_implementation(model) == name
    function = internals.attention_function(model.model.layers[0].self_attn)
    assert (function is modeling_qwen2.eager_attention_forward) == (name == "eager")


def test_checkpointed_layers_run_through_the_wrapped_call():
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []

    def counting(checkpoint, function, *args, **kwargs):
        calls.append(function)
        return checkpoint(function, *args, **kwargs)

    for layer in model.model.layers:
        internals.wrap_checkpoint_call(layer, counting)
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # each decoder layer once in the forward pass


def test_a_model_read_from_gguf_can_be_saved_once_its_quantizer_is_forgotten(tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = tiny_model()
    model.hf_quantizer, model.config.quantization_config = GgufHfQuantizer(GgufConfig()), GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):  # what from_pretrained(gguf_file=...) leaves
        model.save_pretrained(tmp_path / "refused")
    internals.forget_gguf_quantization(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()


def test_a_model_quantized_in_place_is_marked_as_from_pretrained_marks_it():
    from peft.utils import other
    from transformers import BitsAndBytesConfig, modeling_utils, trainer

    assert "self.hf_quantizer" in inspect.getsource(modeling_utils)  # where the libraries read the marks
    for reader in (modeling_utils, trainer, other):
        assert 'getattr(model, "is_loaded_in_4bit"' in inspect.getsource(reader).replace("self,", "model,")
    model = tiny_model()
    internals.mark_quantized(model, BitsAndBytesConfig(load_in_4bit=True))
    assert model.is_quantized and model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    assert model.hf_quantizer.quantization_config.load_in_4bit


def test_model_from_config_builds_in_the_dtype():
    model = internals.model_from_config(Qwen2ForCausalLM, Qwen2Config(vocab_size=100, **TINY), torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


# --- accelerate ---------------------------------------------------------------------------------------------------


def test_accelerate_passes_lowtune_shares_through():
    from accelerate.data_loader import BatchSamplerShard

    from lowtune.data.batching import LengthBucketBatchSampler

    sampler = LengthBucketBatchSampler([5, 9, 3, 7, 4, 8], batch_size=2, num_replicas=2, rank=1)

    class Prepared:
        batch_sampler = BatchSamplerShard(sampler, num_processes=2, process_index=1)

    prepared = Prepared()
    internals.keep_batch_sampler(prepared, sampler, world_size=2)
    assert list(prepared.batch_sampler) == list(sampler)  # every share of this process, none dropped or re-split
    alone = type("Alone", (), {"batch_sampler": sampler})()
    internals.keep_batch_sampler(alone, sampler, world_size=1)
    with pytest.raises(internals.LibraryChanged):
        internals.keep_batch_sampler(type("Odd", (), {"batch_sampler": [[0]]})(), sampler, world_size=2)


# --- bitsandbytes -------------------------------------------------------------------------------------------------


def bnb_model(quantization: str):
    from transformers import BitsAndBytesConfig

    folder = Path(tempfile.mkdtemp())
    tiny_model().save_pretrained(folder)
    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if quantization == "4bit"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    return Qwen2ForCausalLM.from_pretrained(folder, quantization_config=config, device_map={"": "cpu"})


def test_the_4bit_state_and_the_cpu_layout_flag():
    import bitsandbytes as bnb

    layer = bnb_model("4bit").model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert tuple(internals.quant_state(layer.weight).shape) == (32, 32)
    assert internals.quant_state(torch.zeros(2)) is None
    internals.keep_cpu_4bit_layout(layer)
    assert layer.support_avx512bf16_for_cpu is False


def test_the_8bit_row_scales_dequantize_the_weight():
    layer = bnb_model("8bit").model.layers[0].self_attn.q_proj
    scales = internals.int8_row_scales(layer)
    assert scales.shape == (32,)
    dense = layer.weight.data.float() * scales[:, None] / 127
    assert dense.abs().max() == pytest.approx(scales.max().item(), rel=1e-6)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_a_weight_quantizes_in_place(quantization):
    import bitsandbytes as bnb

    weight = torch.randn(32, 64, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(64, 32, bias=False) if quantization == "4bit" else bnb.nn.Linear8bitLt(64, 32)
    parameter = internals.quantized_parameter(weight, quantization, layer)
    expected = bnb.nn.Params4bit if quantization == "4bit" else bnb.nn.Int8Params
    assert isinstance(parameter, expected) and parameter.dtype == (
        torch.uint8 if quantization == "4bit" else torch.int8
    )


# --- peft ---------------------------------------------------------------------------------------------------------


def test_plain_lora_parts_read_peft_s_layer():
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"]))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    parts = internals.plain_lora_parts(q_proj)
    assert parts.a.shape == (4, 32) and parts.b.shape == (32, 4)
    assert (parts.dropout, parts.scale, parts.training) == (0.1, 2.0, q_proj.training)
    assert parts.base is q_proj.base_layer
    assert internals.plain_lora_parts(model.base_model.model.model.layers[0].self_attn.k_proj) is None  # no adapter
    with model.disable_adapter():
        assert internals.plain_lora_parts(q_proj) is None


def test_dora_is_not_a_plain_adapter():
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert internals.plain_lora_parts(model.base_model.model.model.layers[0].self_attn.q_proj) is None


# --- liger-kernel (installed with the dev extra; its patches are applied, never run, on the CPU) ---------------------


def test_liger_patches_the_model_instance(qwen2_modeling_restored):
    model = tiny_model()
    internals.apply_liger(model, rms_norm=True, rope=False, swiglu=True)
    assert model.model.norm.forward.__func__.__module__.startswith("liger_kernel")
    assert model.model.layers[0].mlp.forward.__func__.__module__.startswith("liger_kernel")


def test_liger_swiglu_is_an_autograd_function():
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    assert internals.liger_swiglu() == LigerSiLUMulFunction.apply


# --- torch --------------------------------------------------------------------------------------------------------


def test_onednn_linear_computes_a_linear_layer():
    x, weight, bias = torch.randn(7, 16), torch.randn(12, 16), torch.randn(12)
    torch.testing.assert_close(internals.onednn_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    torch.testing.assert_close(internals.onednn_linear(x, weight.T.contiguous().T), x @ weight.T)  # strided weight


def test_a_fused_adamw_step_is_skipped_on_the_device_where_told():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    for not_finite, expected in ((0.0, 1), (1.0, 1), (0.0, 2)):
        weight.grad = torch.full((3,), float("nan") if not_finite else 1.0)
        before = weight.detach().clone()
        internals.skip_update_where(optimizer, torch.tensor(not_finite))
        optimizer.step()
        assert torch.isfinite(weight).all() and int(optimizer.state[weight]["step"]) == expected
        assert torch.equal(weight.detach(), before) == bool(not_finite)  # skipped, or updated
    with pytest.raises(internals.LibraryChanged, match="not a fused torch one"):
        internals.skip_update_where(torch.optim.AdamW([weight], lr=0.1), torch.tensor(0.0))


def test_in_backward_pass_is_true_only_while_autograd_runs_a_backward_pass():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", internals.in_backward_pass()))
            ctx.save_for_backward(x)  # what a checkpoint's recomputation makes again
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors  # under a checkpoint: recomputed now
            seen.append(("backward", internals.in_backward_pass()))
            return grad * 2

    x = torch.ones(3, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == [("forward", False), ("backward", True)] and not internals.in_backward_pass()
    # and a checkpointed function's recomputation runs inside the backward pass
    torch.utils.checkpoint.checkpoint(Probe.apply, x, use_reentrant=False).sum().backward()
    assert seen[2:] == [("forward", False), ("forward", True), ("backward", True)]
