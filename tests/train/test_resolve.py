"""The resolve step on faked machines: every choice, its reason, and the settings that cannot apply.

The machines are described, not detected, so these tests give the same answers on every CPU.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from transformers import Qwen2Config

from lowtune.bench.model import QWEN_7B_SHAPE
from lowtune.config import RunConfig
from lowtune.data.pack import padded_length
from lowtune.errors import UserError
from lowtune.machine import Cpu, Gpu, Machine, malloc_return_settings, read_cpu
from lowtune.model.arch import PROJECTIONS, llama
from lowtune.model.checkpointing import Checkpointing
from lowtune.train.graphs import BUCKET
from lowtune.train.memory import GIB, RunShape
from lowtune.train.resolve import resolve_loading, resolve_run

QWEN_7B = Qwen2Config(**QWEN_7B_SHAPE).to_dict()
LENGTHS = [200] * 400  # records of 200 tokens: 81 of them to a batch of 16k
EPYC_AVX2 = Cpu("AMD EPYC 7B13", "AuthenticAMD", frozenset({"sse4_2", "avx", "avx2", "fma"}))
XEON_AMX = Cpu("Intel Xeon Platinum 8480+", "GenuineIntel", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
XEON_AVX512 = Cpu("Intel Xeon Gold 6148", "GenuineIntel", frozenset({"avx2", "avx512f"}))  # no BF16 in AVX512
GPUS = {
    "A100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GIB),
    "T4": Gpu("Tesla T4", (7, 5), 15 * GIB),
    "H100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB),
}


def machine(cpu: Cpu = XEON_AMX, gpu: str | None = None, liger: bool = False, host_gib: float = 100) -> Machine:
    packages = {"bitsandbytes"} | ({"liger_kernel"} if liger else set())
    return Machine(
        cpu=cpu,
        gpu=GPUS[gpu] if gpu else None,
        host_memory_available=int(host_gib * GIB),
        packages=frozenset(packages),
        varlen_attention=gpu is not None,
    )


def config(**sections) -> RunConfig:
    raw = {"model": {"quantization": "4bit"}, "lora": {"target_modules": list(PROJECTIONS)}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return RunConfig.model_validate(raw)


def resolve(run_config: RunConfig | None = None, on: Machine | None = None, model_config=None, lengths=None):
    return resolve_run(run_config or config(), on or machine(), model_config or QWEN_7B, lengths or LENGTHS, "qwen")


# What each machine gets for the same 4-bit run: (precision, autocast, packing, attention, liger parts, loss,
# base weights, oneDNN).
MATRIX = {
    ("AVX2 EPYC", None, False): ("fp32", "none", False, "eager", [], "chunked", "cached", True, False),
    ("AMX Xeon", None, False): ("bf16", "bf16", False, "eager", [], "chunked", "cached", False, False),
    ("AVX512 Xeon", None, False): ("fp32", "none", False, "eager", [], "chunked", "cached", False, False),
    # bf16 GPUs: small micro-batches replay from CUDA graphs, with the masked loss (liger's fused one syncs)
    ("AMX Xeon", "A100", False): ("bf16", "bf16", True, "lowtune_varlen", [], "masked", "per use", False, True),
    ("AMX Xeon", "A100", True): (
        "bf16",
        "bf16",
        True,
        "lowtune_varlen",
        ["rms_norm", "rope", "swiglu"],
        "masked",
        "per use",
        False,
        True,
    ),
    # fp16 scales the loss outside a graph: no graphs, the chunked loss
    ("AVX2 EPYC", "T4", False): ("fp16", "fp16", True, "lowtune_varlen", [], "chunked", "per use", False, False),
    ("AMX Xeon", "H100", True): (
        "bf16",
        "bf16",
        True,
        "lowtune_varlen",
        ["rms_norm", "rope", "swiglu"],
        "masked",
        "per use",
        False,
        True,
    ),
}
CPUS = {"AVX2 EPYC": EPYC_AVX2, "AMX Xeon": XEON_AMX, "AVX512 Xeon": XEON_AVX512}


@pytest.mark.parametrize(("cpu", "gpu", "liger"), list(MATRIX))
def test_the_choices_on_each_machine(cpu, gpu, liger):
    resolved = resolve(on=machine(CPUS[cpu], gpu, liger))
    choices = resolved.choices()
    found = tuple(
        choices[key]
        for key in (
            "precision",
            "autocast",
            "packing",
            "attention",
            "liger",
            "loss",
            "base_weights",
            "onednn",
            "cuda_graphs",
        )
    )
    assert found == MATRIX[(cpu, gpu, liger)]
    assert choices["device"] == ("cpu" if gpu is None else "cuda:0")
    assert choices["fused_lora"] is True and choices["family"] == "llama"
    assert set(resolved.reasons) >= {"precision", "device", "fused_lora", "liger", "loss", "packing", "attention"}


def test_the_reasons_name_what_the_machine_reported():
    reasons = resolve(on=machine(EPYC_AVX2)).reasons
    assert "no native bf16" in reasons["precision"] and "AMD EPYC 7B13 (avx2)" in reasons["precision"]
    assert "SSE" in reasons["onednn"]
    assert "fp32 products only" in resolve(on=machine(XEON_AMX)).reasons["onednn"]  # bf16 there: said, not silent
    assert "T4" in resolve(on=machine(gpu="T4")).reasons["precision"]


def test_a_onednn_cap_below_bf16_means_no_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off the CPU's bf16 instructions: the run is planned as on an AVX2 CPU."""
    capped = Cpu(XEON_AMX.name, XEON_AMX.vendor, XEON_AMX.flags, onednn_cap="AVX2", mkl_cap="SSE4_2")
    resolved = resolve(on=machine(capped))
    assert resolved.loading.precision == "fp32" and resolved.onednn


def test_read_cpu_takes_the_flags_and_vendor_the_cpu_reports(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    amd = read_cpu("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    assert (amd.vendor, amd.name, amd.native_bf16, amd.mkl_fp32_is_slow) == (
        "AuthenticAMD",
        "AMD EPYC 7B13",
        False,
        True,
    )
    arm = read_cpu("processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n")
    assert arm.native_bf16 and not arm.mkl_fp32_is_slow


def test_explicit_bf16_on_a_cpu_without_it_runs_with_a_warning_and_on_an_old_gpu_is_refused():
    resolved = resolve(config(model={"precision": "bf16"}), machine(EPYC_AVX2))
    assert resolved.loading.precision == "bf16"
    assert any("without native bf16" in warning and "30x" in warning for warning in resolved.warnings)
    with pytest.raises(UserError, match="has no bf16"):
        resolve(config(model={"precision": "bf16"}), machine(gpu="T4"))


@pytest.mark.parametrize(
    ("sections", "on", "message"),
    [
        ({"train": {"liger": True}}, machine(), "liger: true cannot apply: liger-kernel's kernels are Triton GPU"),
        ({"train": {"liger": True}}, machine(gpu="A100"), "liger-kernel is not installed"),
        ({"train": {"gradient_checkpointing": "offload"}}, machine(), "offload moves layer inputs"),
        ({"train": {"attention": "lowtune_varlen"}}, machine(), "lowtune_varlen needs CUDA"),
        ({"train": {"fused_lora": True}, "lora": {"target_modules": ["q_proj"]}}, machine(), "all seven projections"),
        ({"model": {"device_map": "balanced"}}, machine(), "this machine has none"),
    ],
)
def test_a_setting_that_cannot_apply_is_an_error(sections, on, message):
    with pytest.raises(UserError, match=message):
        resolve(config(**sections), on)


def test_every_impossible_setting_is_reported_at_once():
    run_config = config(train={"liger": True, "gradient_checkpointing": "offload", "attention": "lowtune_varlen"})
    with pytest.raises(UserError) as raised:
        resolve(run_config)
    assert len(raised.value.problems) == 3


def test_false_turns_a_feature_off_everywhere():
    resolved = resolve(config(train={"liger": False, "fused_lora": False}), machine(gpu="H100", liger=True))
    assert resolved.liger == () and resolved.loss == "chunked" and not resolved.fused_lora
    assert resolved.base_weights == "per use"


def test_an_unknown_family_trains_through_peft_and_says_so():
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "vocab_size": 1000}
    resolved = resolve(on=machine(), model_config=gpt2)
    assert resolved.family is None and not resolved.fused_lora and resolved.plan is None
    assert "'gpt2' is not a family lowtune has a fused path for" in resolved.reasons["fused_lora"]
    with pytest.raises(UserError, match="train.fused_lora: true cannot apply"):
        resolve(config(train={"fused_lora": True}), machine(), gpt2)
    on_gpu = resolve(on=machine(gpu="A100"), model_config=gpt2)
    assert on_gpu.checkpointing == Checkpointing("on") and "no memory plan" in on_gpu.reasons["gradient_checkpointing"]


def test_a_config_without_sizes_is_a_clear_error():
    with pytest.raises(UserError, match="config.json has no hidden_size"):
        resolve(model_config={"model_type": "qwen2", "num_attention_heads": 4})


def test_qwen1_target_names_are_mapped_and_recorded():
    qwen1_converted = QWEN_7B | {"qwen1_seq_length": 8192}
    resolved = resolve(config(lora={"target_modules": ["c_attn", "c_proj", "w1", "w2"]}), model_config=qwen1_converted)
    assert resolved.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj"]
    assert resolved.fused_lora and "c_attn -> q_proj/k_proj/v_proj" in resolved.reasons["lora_targets"]
    long = resolve(model_config=qwen1_converted, lengths=[9000])
    assert any("beyond this Qwen-1 checkpoint's seq_length 8192" in warning for warning in long.warnings)


def test_the_dense_copy_is_left_out_where_the_host_has_no_room():
    assert resolve(on=machine(EPYC_AVX2, host_gib=1)).base_weights == "per use"  # 7B in fp32: 24 GiB


def test_resolve_loading_is_what_chat_and_merge_load_with():
    from lowtune.config import ModelSettings

    loading = resolve_loading(ModelSettings(quantization="4bit"), machine(EPYC_AVX2))
    assert (loading.precision, loading.compute_dtype, loading.device_map) == ("fp32", "fp32", {"": "cpu"})
    assert loading.quant_type == "nf4" and loading.double_quant
    gpu = resolve_loading(ModelSettings(), machine(gpu="H100"))
    assert (gpu.precision, gpu.device_map, gpu.compute_dtype) == ("bf16", {"": 0}, None)


# --- gradient checkpointing by the memory plan --------------------------------------------------------------------


def checkpointing(setting, gpu_gib=80, host_gib=100, gpu="H100"):
    sized = replace(machine(gpu=gpu, host_gib=host_gib), gpu=Gpu("GPU", (9, 0), int(gpu_gib * GIB)))
    run_config = config(train={"tokens_per_batch": 16384, "gradient_checkpointing": setting})
    return resolve(run_config, sized)


@pytest.mark.parametrize(("setting", "expected"), [(True, "on"), (False, "off"), ("offload", "offload")])
def test_a_checkpointing_setting_other_than_auto_is_taken_as_it_is(setting, expected):
    assert checkpointing(setting).checkpointing == Checkpointing(expected)  # every layer


def planned_peak(tokens: int, mode: str, layers: int | None, remake_down: bool = True) -> float:
    """The plan resolve makes for the run in `checkpointing`, with `layers` checkpointed."""
    shape = llama.FAMILY.shape(QWEN_7B)
    run = RunShape(shape, "4bit", "bf16", True, 8, frozenset(PROJECTIONS), tokens, 0.05, True, remake_down=remake_down)
    return run.plan(Checkpointing(mode, layers)).total


def test_auto_on_a_gpu_checkpoints_the_fewest_layers_that_fit():
    assert checkpointing("auto", gpu_gib=1000).checkpointing == Checkpointing("off")  # 7B at 16k needs ~86 GiB
    for gpu_gib, host_gib, mode in ((80, 100, "offload"), (80, 6, "on"), (40, 100, "offload"), (10, 100, "offload")):
        resolved = checkpointing("auto", gpu_gib=gpu_gib, host_gib=host_gib)
        chosen = resolved.checkpointing
        assert chosen.mode == mode  # offload when half the host's free memory holds the layer inputs (4 GiB)
        budget, count, tokens = 0.9 * gpu_gib * GIB, chosen.checkpointed(32), resolved.batching.largest
        assert planned_peak(tokens, mode, count) == resolved.plan.total
        assert resolved.plan.total <= budget or count == 32
        assert planned_peak(tokens, mode, count - 1) > budget  # one layer fewer would not fit
    assert checkpointing("auto", gpu_gib=80).checkpointing.layers < 32 / 2  # an 80 GB GPU recomputes a few layers
    assert checkpointing("auto", gpu_gib=10).checkpointing == Checkpointing("offload")  # a small GPU needs every one
    assert "room in host memory 50.0 GiB" in checkpointing("auto", gpu_gib=80).reasons["gradient_checkpointing"]


def test_down_input_is_kept_only_where_the_plan_fits():
    roomy = checkpointing(False, gpu_gib=1000)
    assert not roomy.remake_down and roomy.choices()["down_input"] == "kept"
    assert roomy.plan.total == planned_peak(roomy.batching.largest, "off", None, remake_down=False)
    assert "budget 900.0 GiB" in roomy.reasons["down_input"]
    tight = checkpointing(False, gpu_gib=80)  # 7B at 16k without checkpointing: ~86 GiB kept, ~75 made again
    assert tight.remake_down and tight.choices()["down_input"] == "made again in the backward pass"
    assert "over the budget 72.0 GiB" in tight.reasons["down_input"]
    assert checkpointing("offload", gpu_gib=1000).remake_down  # memory is what a checkpointed run is short of
    assert resolve().remake_down  # the CPU: host memory is shared


def test_on_the_cpu_auto_checkpointing_is_off():
    assert resolve().checkpointing == Checkpointing("off")


def test_the_log_has_one_line_per_choice(caplog):
    caplog.set_level(logging.INFO, logger="lowtune.train.resolve")
    resolved = resolve(on=machine(EPYC_AVX2))
    resolved.log()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == len(resolved.choices()) + len(resolved.warnings) + 1  # and the plan's peak
    assert any(line.startswith("precision: fp32 (the CPU has no native bf16") for line in lines)
    assert f"planned peak host memory {resolved.plan.total / GIB:.2f} GiB (CPU)" in lines


def test_a_cpu_plan_counts_what_glibcs_heap_keeps_unless_the_user_set_malloc_or_the_libc_is_another():
    short = [20] * 400  # 160 tokens a batch: the 7B shape's activations are blocks under 32 MiB
    glibc = resolve(on=machine(EPYC_AVX2), lengths=short).plan
    assert glibc.retained > 0 and glibc.freed.startswith("glibc's heap keeps 40% of the activations")
    assert glibc.summary()["retained"] == round(glibc.retained / GIB, 3)
    users = resolve(on=replace(machine(EPYC_AVX2), malloc_returns=("MALLOC_MMAP_THRESHOLD_",)), lengths=short).plan
    assert users.retained == 0
    assert users.freed == "assumed returned to the OS at once (MALLOC_MMAP_THRESHOLD_ set by the user)"
    assert glibc.total - users.total == glibc.retained
    musl = resolve(on=replace(machine(EPYC_AVX2), libc=""), lengths=short).plan
    assert musl.retained == 0 and musl.freed.endswith("(not glibc)")
    on_gpu = resolve(on=machine(gpu="H100")).plan
    assert on_gpu.retained == 0 and on_gpu.freed == "" and "freed" not in on_gpu.summary()


def test_only_the_users_mmap_or_trim_threshold_makes_glibc_return_freed_memory():
    environ = {"MALLOC_ARENA_MAX": "2", "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert malloc_return_settings(environ) == ()  # arenas and huge pages: the heap still keeps freed blocks
    environ |= {"MALLOC_TRIM_THRESHOLD_": "1", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}
    assert malloc_return_settings(environ) == ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.mmap_threshold")


# --- merged micro-batches -----------------------------------------------------------------------------------------


def merging(setting="auto", gpu_gib=80, accumulation=2, **train):
    sized = replace(machine(gpu="H100"), gpu=Gpu("GPU", (9, 0), int(gpu_gib * GIB)))
    train = {"batch_size": 8, "gradient_accumulation": accumulation, "merge_micro_batches": setting} | train
    return resolve(config(train={"cuda_graphs": False} | train), sized)  # graphs would not merge (tests below)


def test_a_small_step_runs_as_one_micro_batch_when_the_plan_fits():
    alone, merged = merging(False), merging()
    assert (alone.batching.merged, alone.batching.passes) == (1, 2)
    assert (merged.batching.merged, merged.batching.passes) == (2, 1)
    assert merged.batching.largest == 16 * 200 and alone.batching.largest == 8 * 200  # packed: real tokens only
    assert merged.plan.tokens == 16 * 200
    assert "2 micro-batches run as one" in merged.reasons["batching"]
    assert "train.merge_micro_batches: false" in alone.reasons["batching"]
    assert "run 2 at a time" in merged.batching.describe()


def test_merging_takes_the_largest_divisor_of_the_accumulation_that_needs_no_more_recomputation():
    # 7B 4-bit: ~6 GiB of weights, ~5 MB a token of activations without checkpointing (records of 200 tokens).
    for gpu_gib, accumulation, expected in ((80, 4, 4), (30, 4, 2), (16, 4, 1), (80, 3, 3)):
        resolved = merging(gpu_gib=gpu_gib, accumulation=accumulation)
        assert resolved.batching.merged == expected, gpu_gib
        assert resolved.checkpointing.checkpointed(32) == merging(
            False, gpu_gib, accumulation
        ).checkpointing.checkpointed(32)
    assert "more recomputation" in merging(gpu_gib=16, accumulation=4).reasons["batching"]


def test_merging_padded_batches_or_one_micro_batch_is_left_alone_or_refused():
    padded = merging(packing=False)
    assert padded.batching.merged == 1 and "padded to the step's longest" in padded.reasons["batching"]
    assert merging(True, packing=False).batching.merged == 2  # true: the user's choice, padded or not
    assert merging(accumulation=1).batching.merged == 1
    with pytest.raises(UserError, match="merge_micro_batches: true cannot apply: train.gradient_accumulation is 1"):
        merging(True, accumulation=1)


def test_small_steps_replay_from_cuda_graphs_unmerged_with_the_masked_loss_and_padded_rows():
    graphed = merging("auto", cuda_graphs="auto")
    assert graphed.cuda_graphs and graphed.loss == "masked"
    assert "fused_linear_cross_entropy" not in graphed.liger  # liger's loss counts the labels on the host
    assert graphed.batching.merged == 1 and "CUDA graphs replay" in graphed.reasons["merge_micro_batches"]
    assert graphed.batching.largest == padded_length(8 * 200, BUCKET) == 1664  # the plan counts the padding
    assert "bound by the host" in graphed.reasons["cuda_graphs"]
    large = merging("auto", cuda_graphs="auto", batch_size=None, tokens_per_batch=16384)
    assert not large.cuda_graphs and "keep the GPU busy" in large.reasons["cuda_graphs"]
    assert large.loss == "chunked"  # no liger-kernel on this machine
    off = merging("auto", cuda_graphs=False)
    assert not off.cuda_graphs and off.reasons["cuda_graphs"] == "train.cuda_graphs: false"


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_steps_replay_from_cuda_graphs_with_masked_per_token_log_probs_when_asked(method):
    graphed = merging("auto", cuda_graphs=True, method=method, gradient_accumulation=1)
    assert graphed.cuda_graphs and graphed.loss == "masked" and "every position" in graphed.reasons["loss"]
    auto = merging("auto", cuda_graphs="auto", method=method, gradient_accumulation=1)
    assert not auto.cuda_graphs and "only when asked" in auto.reasons["cuda_graphs"]
    assert auto.loss == "chunked" and "labelled" in auto.reasons["loss"]


def test_cuda_graphs_that_cannot_apply_are_refused_when_asked_for_and_logged_when_auto():
    padded = merging("auto", cuda_graphs="auto", packing=False)
    assert not padded.cuda_graphs and "packed rows" in padded.reasons["cuda_graphs"]
    with pytest.raises(UserError, match="train.cuda_graphs: true cannot apply: they need packed rows"):
        merging("auto", cuda_graphs=True, packing=False)
    with pytest.raises(UserError, match="train.cuda_graphs: true cannot apply: CUDA graphs need CUDA"):
        resolve(config(train={"cuda_graphs": True}), machine(EPYC_AVX2))
    assert "on the CPU" in resolve(config(), machine(EPYC_AVX2)).reasons["cuda_graphs"]
    checkpointed = merging("auto", cuda_graphs=True, gradient_checkpointing=True)
    assert checkpointed.cuda_graphs and checkpointed.checkpointing.mode == "on"
    offloaded = merging("auto", cuda_graphs="auto", gradient_checkpointing="offload")  # the graph copies them too
    assert offloaded.cuda_graphs and offloaded.checkpointing.mode == "offload" and offloaded.batching.merged == 1
