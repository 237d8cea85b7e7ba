"""Model loading, vocabulary facts and MoE router statistics on tiny random models (seconds, no network)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from crosskd.models.loading import ModelFileError, ModelNotFoundError, load_model, load_tokenizer, resolve_spec
from crosskd.models.moe import expert_usage_entropy, is_moe_config, router_logits
from crosskd.models.vocab import VOCAB_FACTS_FILE
from crosskd.testing.tiny_models import (
    STUDENT_VOCAB,
    TEACHER_NAMED_PADDING,
    TEACHER_VOCAB,
    materialize_tiny_pair,
    tiny_llama_student,
    tiny_student_tokenizer,
)
from crosskd.testing.tiny_tokenizers import END_OF_TEXT, byte_level_bpe


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    """`tiny:` specs materialise under $CROSSKD_CACHE: point it at a temporary folder, never the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("crosskd-cache")
        patch.setenv("CROSSKD_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def teacher():
    return load_model("tiny:teacher", "teacher")


@pytest.fixture(scope="module")
def student():
    return load_model("tiny:student", "student")


def test_tiny_spec_and_folder_load_the_same_model(teacher, tiny_cache):
    folder = resolve_spec("tiny:teacher").location
    assert str(tiny_cache) in folder
    by_folder = load_model(folder, "teacher")
    for (name, a), (_, b) in zip(teacher.model.state_dict().items(), by_folder.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert type(by_folder.model).__name__ == "Qwen2MoeForCausalLM"


def test_tiny_pair_is_deterministic_and_seeded(tmp_path):
    tokenizer = tiny_student_tokenizer()
    state_0 = tiny_llama_student(tokenizer, seed=0).state_dict()
    again = tiny_llama_student(tokenizer, seed=0).state_dict()
    other = tiny_llama_student(tokenizer, seed=1).state_dict()
    assert all(torch.equal(state_0[k], again[k]) for k in state_0)
    assert not torch.equal(state_0["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])

    first = materialize_tiny_pair(tmp_path / "a")
    second = materialize_tiny_pair(tmp_path / "b")
    for left, right in zip(first, second):
        assert (left / "model.safetensors").read_bytes() == (right / "model.safetensors").read_bytes()
        assert (left / "tokenizer.json").read_text() == (right / "tokenizer.json").read_text()


def test_student_ties_embeddings_like_smollm2(student):
    model = student.model
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert len(student.tokenizer) == STUDENT_VOCAB == student.vocab.logit_size


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_teacher_is_frozen_in_eval_mode_and_the_chosen_dtype(dtype, torch_dtype):
    loaded = load_model("tiny:teacher", "teacher", dtype=dtype)
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert {p.dtype for p in loaded.model.parameters()} == {torch_dtype}
    assert loaded.compute_dtype == torch_dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_student_is_trainable_with_float32_master_weights(dtype):
    loaded = load_model("tiny:student", "student", dtype=dtype)
    assert loaded.model.training
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.compute_dtype == getattr(torch, dtype)


def test_bad_role_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match="role must be 'teacher' or 'student'"):
        load_model("tiny:student", "assistant")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        load_model("tiny:student", "student", dtype="int8")
    with pytest.raises(ValueError, match="use tiny:teacher or tiny:student"):
        resolve_spec("tiny:professor")


def test_teacher_padded_ids_are_detected_from_names_and_width(teacher):
    base = len(byte_level_bpe(TEACHER_VOCAB))
    vocab = teacher.vocab
    # Named `[PAD<id>]` entries right after the real tokens, then output rows the tokenizer does not know at all.
    assert teacher.tokenizer.convert_ids_to_tokens(base) == f"[PAD{base}]"
    assert len(teacher.tokenizer) == base + TEACHER_NAMED_PADDING < vocab.logit_size
    assert vocab.padded_ids.tolist() == list(range(base, vocab.logit_size))
    assert vocab.evidence["[PAD…] names"] == TEACHER_NAMED_PADDING
    assert vocab.real_token_count == base
    assert vocab.valid_mask[:base].all() and not vocab.valid_mask[base:].any()


def test_padded_ids_never_receive_probability(teacher):
    ids = teacher.tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    logits = teacher.model(input_ids=ids).logits
    probabilities = teacher.vocab.mask_logits(logits).softmax(-1)
    assert probabilities[..., teacher.vocab.padded_ids].sum() == 0
    assert torch.allclose(probabilities.sum(-1), torch.ones(()))
    with pytest.raises(ValueError, match="expected 768"):
        teacher.vocab.mask_logits(logits[..., :100])


def test_gguf_token_types_recorded_in_the_folder_mark_padding(tmp_path):
    _, student_dir = materialize_tiny_pair(tmp_path / "pair")
    folder = tmp_path / "with-record"
    shutil.copytree(student_dir, folder)
    record = {"unused_ids": [290, 299], "control_ids": [5]}
    (folder / VOCAB_FACTS_FILE).write_text(json.dumps(record))

    vocab = load_model(folder, "student").vocab
    assert vocab.padded_ids.tolist() == [290, 299]
    assert vocab.evidence["GGUF unused type"] == 2
    assert 5 in vocab.special_ids and 0 in vocab.special_ids
    assert load_model(student_dir, "student").vocab.padded_ids.numel() == 0


def test_special_and_separator_ids(teacher, student):
    for loaded in (teacher, student):
        assert loaded.vocab.eos_id == loaded.vocab.separator_id == loaded.vocab.pad_id == 0
        assert loaded.tokenizer.convert_ids_to_tokens(0) == END_OF_TEXT


def test_slow_tokenizer_is_a_clear_error(tmp_path):
    ByT5Tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"slow tokenizer without offset mappings"):
        load_tokenizer(tmp_path, role="student")


def test_missing_pad_token_reuses_eos_without_adding_a_token(tmp_path):
    backend = byte_level_bpe(STUDENT_VOCAB).backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == END_OF_TEXT
    assert len(tokenizer) == STUDENT_VOCAB


def test_tokenizer_without_any_special_token_cannot_be_padded(tmp_path):
    backend = byte_level_bpe(STUDENT_VOCAB).backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no pad token and no eos or other special token"):
        load_tokenizer(tmp_path)


def test_unknown_hub_id_says_not_found_locally_and_suggests_setup(monkeypatch):
    # Offline mode fails at once; with the network merely unreachable the hub client retries for about a minute.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"could not find model 'no-such-org/no-such-model' locally.*setup-models"):
        load_model("no-such-org/no-such-model", "student")


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="is a path but not an existing folder or .gguf file"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="is a path but not an existing folder"):
        resolve_spec("./no/such/folder")


def test_gguf_path_resolves_to_its_folder_and_file(tmp_path):
    (tmp_path / "model.Q4.gguf").write_bytes(b"GGUF")
    source = resolve_spec(tmp_path / "model.Q4.gguf")
    assert (source.location, source.gguf_file) == (str(tmp_path), "model.Q4.gguf")
    assert source.from_pretrained_kwargs() == {"gguf_file": "model.Q4.gguf"}


def test_reference_spec_without_setup_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSKD_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Run `crosskd setup-models`"):
        load_model("reference:teacher", "teacher")


def test_tokenizer_larger_than_the_model_is_rejected(tmp_path):
    _, student_dir = materialize_tiny_pair(tmp_path / "pair")
    byte_level_bpe(TEACHER_VOCAB).save_pretrained(student_dir)  # 700 tokens for a 300-logit model
    with pytest.raises(ValueError, match="has 700 tokens but the model only 300 output logits"):
        load_model(student_dir, "student")


def test_moe_detection(teacher, student):
    assert teacher.is_moe and not student.is_moe
    assert is_moe_config(SimpleNamespace(model_type="mixtral"))
    assert is_moe_config(SimpleNamespace(model_type="qwen3_moe"))
    assert is_moe_config(SimpleNamespace(model_type="custom", num_local_experts=8))
    assert not is_moe_config(SimpleNamespace(model_type="llama", num_experts=None))


def test_router_logits_of_a_tiny_qwen2_moe(teacher, student):
    batch = teacher.tokenizer(["for i in range(10):", "x = 1"], padding=True, return_tensors="pt")
    logits = router_logits(teacher.model, batch["input_ids"], batch["attention_mask"])
    config = teacher.model.config
    assert len(logits) == config.num_hidden_layers == 3
    assert all(layer.shape == (batch["input_ids"].numel(), config.num_experts) for layer in logits)
    entropy = expert_usage_entropy(logits, config.num_experts_per_tok, token_mask=batch["attention_mask"])
    assert entropy.shape == (3,) and ((entropy > 0) & (entropy <= 1)).all()
    with pytest.raises(ValueError, match="is not a mixture-of-experts model"):
        router_logits(student.model, batch["input_ids"])


def test_expert_usage_entropy_extremes():
    tokens, experts = 12, 4
    collapsed = torch.zeros(tokens, experts)
    collapsed[:, 2] = 5.0
    assert expert_usage_entropy([collapsed], top_k=1).tolist() == [0.0]
    collapsed[:, 0] = 3.0  # top-2 always {2, 0}: two of four experts used equally -> log 2 / log 4
    assert expert_usage_entropy([collapsed], top_k=2).item() == pytest.approx(0.5)
    round_robin = torch.nn.functional.one_hot(torch.arange(tokens) % experts, experts).float()
    assert expert_usage_entropy([round_robin, collapsed], top_k=1).tolist() == pytest.approx([1.0, 0.0])
    # Masked tokens do not count: keep only tokens routed to expert 1.
    only_expert_1 = torch.arange(tokens) % experts == 1
    assert expert_usage_entropy([round_robin], top_k=1, token_mask=only_expert_1).item() == 0.0
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        expert_usage_entropy([round_robin], top_k=5)


def test_a_missing_relative_path_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("runs/x", "runs/x/student"):  # an existing first folder, or more parts than a hub id has
        with pytest.raises(ModelNotFoundError, match=f"model spec '{spec}' is a path but not an existing folder"):
            resolve_spec(spec)


def test_a_folder_without_config_json_is_named(tmp_path):
    _, student_dir = materialize_tiny_pair(tmp_path / "pair")
    (student_dir / "config.json").unlink()
    with pytest.raises(ModelFileError, match=f"{student_dir} has no config.json, so it is not a Hugging Face model"):
        load_model(student_dir, "student")


def test_a_truncated_safetensors_file_is_named(tmp_path):
    _, student_dir = materialize_tiny_pair(tmp_path / "pair")
    (weights,) = student_dir.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=f"{weights} has .* bytes but its header describes .*: truncated"):
        load_model(student_dir, "student")


def test_a_truncated_gguf_file_is_named(tmp_path):
    damaged = tmp_path / "model.gguf"
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(12))  # a header cut short
    with pytest.raises(ModelFileError, match=f"{damaged} could not be read as GGUF .*truncated or corrupt"):
        load_model(damaged, "student")
