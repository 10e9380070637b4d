"""lowtune export gguf: one file that llama.cpp itself (llama-cpp-python, built from source) and an independent
reader (transformers' GGUF loader) load back as the model that lowtune chat answers with, carrying the run's
tokenizer, chat template and end of turn."""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp
import pytest
import torch
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowtune.config import load_config
from lowtune.data.read import Message, read_records, resolve_data_path
from lowtune.errors import UserError
from lowtune.export.gguf import export_gguf
from lowtune.export.merge import chat_template, merged_chat_model
from tests.conftest import MEMORISE
from tests.export.conftest import GREEDY, PROMPTS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(folder / f"run-{kind}.gguf", kind, adapter=tiny_run) for kind in ("f16", "q8_0")}


def read_back(path: Path, config=None):
    """transformers' own GGUF reader (config: the model's, for what that reader does not take from the file)."""
    extra = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **extra)


def greedy(model, ids: list[int], stop: list[int]) -> list[int]:
    prompt = torch.tensor([ids])
    output = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20, eos_token_id=stop
    )
    return output[0, len(ids) :].tolist()


def fields(path: Path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def test_the_f16_export_answers_as_base_plus_adapter(exports, adapter_model):
    model, chat_format = read_back(exports["f16"]), adapter_model.chat_format
    answers = {record["instruction"]: record["output"] for record in MEMORISE}
    for prompt in PROMPTS:
        ids = chat_format.encode_prompt([Message("user", prompt)])
        new_ids = greedy(model, ids, chat_format.stop_token_ids)
        assert new_ids == adapter_model.generate_ids(ids, GREEDY), prompt
        if prompt in answers:
            assert adapter_model.tokenizer.decode(new_ids, skip_special_tokens=True) == answers[prompt]


def test_the_q8_0_export_picks_the_same_next_token_nine_times_in_ten(exports, adapter_model):
    """Along base + adapter's greedy answers, the q8_0 model's most likely next token is theirs (teacher-forced, so
    one different token does not count against every token after it)."""
    model, chat_format = read_back(exports["q8_0"]), adapter_model.chat_format
    same = total = 0
    for prompt in PROMPTS:
        ids = chat_format.encode_prompt([Message("user", prompt)])
        answer = adapter_model.generate_ids(ids, GREEDY)
        with torch.no_grad():
            logits = model(torch.tensor([ids + answer])).logits[0, len(ids) - 1 : -1]
        same += int((logits.argmax(-1) == torch.tensor(answer)).sum())
        total += len(answer)
    assert same / total >= 0.9
    stored = {(len(t.shape), t.tensor_type) for t in gguf.GGUFReader(exports["q8_0"]).tensors}
    assert stored == {(2, gguf.GGMLQuantizationType.Q8_0), (1, gguf.GGMLQuantizationType.F32)}  # norms, biases


def test_the_file_carries_the_tokenizer_chat_template_and_end_of_turn(exports, adapter_model):
    written, tokenizer, chat_format = fields(exports["f16"]), adapter_model.tokenizer, adapter_model.chat_format
    assert written["general.architecture"] == "qwen2" and written["tokenizer.ggml.pre"] == "qwen2"
    assert written["tokenizer.chat_template"] == chat_template(chat_format)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert written["tokenizer.ggml.eos_token_id"] == written["tokenizer.ggml.eot_token_id"] == end_of_turn
    tokens, types = written["tokenizer.ggml.tokens"], written["tokenizer.ggml.token_type"]
    assert len(tokens) == written["qwen2.vocab_size"] == 151936  # every embedding row, padding rows unused
    assert tokens[end_of_turn] == "<|im_end|>" and types[end_of_turn] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED
    # An independent reader of the tokens and merges gives lowtune's ids.
    read = AutoTokenizer.from_pretrained(exports["f16"].parent, gguf_file=exports["f16"].name)
    for text in PROMPTS + ["价格是 1234.5 元，\n\n  OK?"]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert read(text, add_special_tokens=False)["input_ids"] == expected, text


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen3"])
def test_a_model_folder_of_each_family_reads_back_with_its_logits(family, request, tmp_path):
    folder = request.getfixturevalue(family)
    out = export_gguf(tmp_path / "model.gguf", "f16", model=folder)
    expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = expected.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    arch = fields(out)["general.architecture"]
    assert fields(out)[f"{arch}.attention.key_length"] == head_dim
    # transformers' reader takes the head size as hidden / heads, not from the file (the tiny Qwen3's is larger)
    reader_config = config if head_dim != config.hidden_size // config.num_attention_heads else None
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, written = expected(ids).logits, read_back(out, reader_config)(ids).logits
    # f16 weights: the same function up to their rounding (a wrong Llama query/key order would not be close).
    torch.testing.assert_close(written, reference, rtol=0, atol=0.02 * reference.abs().max().item())
    assert (written.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_what_cannot_be_written_is_refused_with_the_way_to_get_it(tiny_run, tmp_path):
    with pytest.raises(UserError, match="llama-quantize") as refused:
        export_gguf(tmp_path / "m.gguf", "q4_k_m", adapter=tiny_run)
    assert "--type f16" in str(refused.value)
    with pytest.raises(UserError, match="exactly one of --adapter"):
        export_gguf(tmp_path / "m.gguf", "f16")
    (tmp_path / "there.gguf").write_bytes(b"kept")
    with pytest.raises(UserError, match="the output file exists"):
        export_gguf(tmp_path / "there.gguf", "f16", adapter=tiny_run)
    assert (tmp_path / "there.gguf").read_bytes() == b"kept"


def llama_cpp_model(path: Path, **options) -> llama_cpp.Llama:
    """llama.cpp's model of `path`, without its extra CPU buffer types (weights repacked for a kernel): on CPUs with
    AMX, llama-cpp-python 0.3.36 built natively repacks q8_0 weights for AMX, whose matrix product segfaults
    (llama.cpp issue 20824); what is tested here is lowtune's file, not that kernel. Llama() takes no such option,
    so its default model parameters are replaced while it loads."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(str(path), n_ctx=1024, verbose=False, **options)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def llama_cpp_greedy(model: llama_cpp.Llama, ids: list[int], stop: list[int], limit: int = 20) -> list[int]:
    new: list[int] = []
    for token in model.generate(ids, temp=0.0, top_k=1, reset=True):
        new.append(token)
        if token in stop or len(new) == limit:
            return new
    return new


def test_llama_cpp_tokenizes_the_bundled_data_as_lowtune_does(exports, adapter_model):
    model, tokenizer = llama_cpp_model(exports["f16"]), adapter_model.tokenizer
    records = [record for _, record in read_records(resolve_data_path("builtin:huanhuan"))][:200]
    for text in [part for record in records for part in (record["instruction"], record["output"])] + PROMPTS:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert model.tokenize(text.encode(), add_bos=False, special=False) == expected, text


def test_llama_cpp_renders_the_file_s_chat_template_as_lowtune_s_chat_format(exports, adapter_model):
    model, chat_format = llama_cpp_model(exports["f16"]), adapter_model.chat_format
    render = Jinja2ChatFormatter(fields(exports["f16"])["tokenizer.chat_template"], eos_token="", bos_token="")
    for conversation in (
        [Message("user", "你是谁？")],  # the trained system prompt is added, as lowtune chat adds it
        [
            Message("system", "You are terse."),
            Message("user", "Hi"),
            Message("assistant", "Hello."),
            Message("user", "Who are you?"),
        ],
    ):
        prompt = render(messages=[{"role": m.role, "content": m.content} for m in conversation]).prompt
        assert model.tokenize(prompt.encode(), add_bos=False, special=True) == chat_format.encode_prompt(conversation)


def test_llama_cpp_answers_as_base_plus_adapter(exports, adapter_model):
    model, chat_format = llama_cpp_model(exports["f16"]), adapter_model.chat_format
    for prompt in PROMPTS:
        ids = chat_format.encode_prompt([Message("user", prompt)])
        assert llama_cpp_greedy(model, ids, chat_format.stop_token_ids) == adapter_model.generate_ids(ids, GREEDY)


@pytest.fixture(scope="module")
def smollm_run(tmp_path_factory) -> Path:
    """The main job on the embedded SmolLM2 (4-bit QLoRA), cut to a few steps."""
    from lowtune.recipe import run

    out = tmp_path_factory.mktemp("smol")
    overrides = ["train.max_steps=3", "data.val_size=0", "train.eval_steps=null", "train.save_steps=0"]
    return run(load_config(REPO / "examples" / "huanhuan-qlora.yaml", [*overrides, f"output_dir={out}"]))


def test_the_embedded_smollm2_after_training_answers_in_llama_cpp_as_in_transformers(smollm_run, tmp_path):
    merged = merged_chat_model(smollm_run, "fp32")  # what both exports hold, before their rounding
    chat_format = merged.chat_format
    records = [record for _, record in read_records(resolve_data_path("builtin:huanhuan"))][-20:]
    prompts = [chat_format.encode_prompt([Message("user", record["instruction"])]) for record in records]
    answers = [merged.generate_ids(ids, GREEDY) for ids in prompts]
    f16 = llama_cpp_model(export_gguf(tmp_path / "smol-f16.gguf", "f16", adapter=smollm_run))
    for ids, answer in zip(prompts, answers, strict=True):
        assert llama_cpp_greedy(f16, ids, chat_format.stop_token_ids) == answer
    q8 = llama_cpp_model(export_gguf(tmp_path / "smol-q8_0.gguf", "q8_0", adapter=smollm_run), logits_all=True)
    same = total = 0
    for ids, answer in zip(prompts, answers, strict=True):  # teacher-forced along the transformers answer
        q8.reset()
        q8.eval(ids + answer)
        picked = q8.scores[len(ids) - 1 : len(ids) + len(answer) - 1].argmax(-1)
        same += int((picked == answer).sum())
        total += len(answer)
    assert same / total >= 0.9
