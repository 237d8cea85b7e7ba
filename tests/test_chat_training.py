"""Conversational runs on the tiny pair: responses-only training and evaluation, the teacher cache's fingerprint, a
bad row stopping the run before its first step."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from crosskd.api import cache_teacher
from crosskd.cli import main
from crosskd.data.chat import ChatDataError
from crosskd.data.collate import IGNORE_INDEX
from crosskd.data.corpus import TrainingCorpus
from crosskd.evaluate import responses_bits_per_byte
from crosskd.models.loading import load_model
from crosskd.report.model_card import write_model_card
from crosskd.teacher.cache import TeacherCacheError
from crosskd.teacher.cache_format import chat_fingerprint, fingerprint_difference
from crosskd.testing.tiny_tokenizers import STUDENT_CHAT_TEMPLATE, with_chat_template
from test_teacher_cache import open_run_cache
from trainer_helpers import log_records, objective_and_first_batch, run_training, tiny_config

ANSWERS = ("def add(a, b):\n    return a + b\n", "Use sorted(items, key=len).", "The fox runs away.",
           "x = {'key': [1, 2, 3]}", "for path in sorted(paths):\n    print(path)\n", "Straße and 日本語.")


def _row(number: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {number}: what next?"},
                         {"role": "assistant", "content": ANSWERS[number % len(ANSWERS)]},
                         {"role": "user", "content": "And then?"},
                         {"role": "assistant", "content": ANSWERS[(number + 1) % len(ANSWERS)]}]}


def write_chat_corpus(folder, rows: int = 8, bad_row: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_row(number)) for number in range(rows)]
    if bad_row is not None:
        lines.insert(3, bad_row)
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "heldout.jsonl").write_text("\n".join(json.dumps(_row(number)) for number in (100, 101)) + "\n")
    return folder


def chat_config(tmp_path, *overrides, corpus=None):
    corpus = corpus or write_chat_corpus(tmp_path / "chat")
    return tiny_config(tmp_path, "data.format=messages", "data.heldout_documents=[heldout.jsonl]",
                       "data.window_tokens=128", "training.max_steps=2", *overrides, corpus=corpus)


@pytest.fixture(scope="module")
def tiny_pair():
    return load_model("tiny:teacher", "teacher"), load_model("tiny:student", "student")


def test_a_conversational_run_trains_and_evaluates_on_the_responses(tmp_path):
    config = chat_config(tmp_path)
    result = run_training(config)
    assert math.isfinite(result.teacher_bpb) and math.isfinite(result.initial_bpb)
    (start,) = log_records(config.output.run_dir, "start")
    assert start["bpb"] == result.initial_bpb
    assert start["perplexity"] > 1 and start["teacher_perplexity"] > 1  # the untouched student's and the teacher's
    train_records = log_records(config.output.run_dir)
    assert len(train_records) == 2 and all(record["loss/kd"] > 0 for record in train_records)
    write_model_card(result.student_dir, result.run_dir)
    card = (result.student_dir / "README.md").read_text()
    assert "`messages` conversations of at most 128 student tokens" in card and "on the responses only" in card
    samples = log_records(config.output.run_dir, "sample")
    assert [sample["conversation"] for sample in samples] == [f"heldout.jsonl:{line}" for line in (1, 2)]
    assert samples[0]["request"] == "Question 100: what next?" and isinstance(samples[0]["reply"], str)


def test_generate_chat_replies_through_the_students_template(capsys, monkeypatch):
    import crosskd.evaluate as evaluate

    rendered = []
    original = evaluate.ChatRenderer.prompt_ids
    monkeypatch.setattr(evaluate.ChatRenderer, "prompt_ids",
                        lambda self, messages: rendered.append(self.render(self.with_system_prompt(messages), True))
                        or original(self, messages))
    assert main(["generate", "tiny:student", "What is 2 + 2?", "--chat", "--max-new-tokens", "4"]) == 0
    assert rendered == ["<|system|>\nYou are a tiny student.<|endoftext|>\n<|user|>\nWhat is 2 + 2?<|endoftext|>\n"
                        "<|assistant|>\n"]
    assert main(["generate", "tiny:student", "Hi", "--chat", "--system", "Be brief.", "--max-new-tokens", "2"]) == 0
    assert rendered[-1].startswith("<|system|>\nBe brief.<|endoftext|>")


def test_the_lm_and_kd_terms_count_only_response_positions(tmp_path):
    objective, batch = objective_and_first_batch(chat_config(tmp_path))
    selection = objective.select(batch)
    trained = batch.student_loss_mask & (batch.student_targets != IGNORE_INDEX)
    assert 0 < int(selection.counts()["lm"]) == int(trained.sum()) < int((batch.student_targets != IGNORE_INDEX).sum())
    assert batch.student_loss_mask[batch.pair_batch, batch.pair_student_pos].all()


def test_responses_only_bpb_scores_the_assistant_bytes_of_each_models_rendering(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    config = chat_config(tmp_path, "data.window_tokens=512")  # whole conversations
    corpus = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    heldout = [json.loads(line) for line in (tmp_path / "chat" / "heldout.jsonl").read_text().splitlines()]
    response_bytes = sum(len(turn["content"].encode()) for row in heldout for turn in row["messages"]
                         if turn["role"] == "assistant")
    for side, model in (("student", student.model), ("teacher", teacher.model)):
        sequences = corpus.heldout_sequences(side)
        result = responses_bits_per_byte(model, sequences)
        assert result.scored_bytes == response_bytes  # the same bytes for both models
        nll = 0.0
        with torch.no_grad():
            for sequence in sequences:
                ids = torch.from_numpy(sequence.ids).unsqueeze(0)
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
                nll -= float(picked[torch.from_numpy(sequence.scored[:-1])].sum())
        assert math.isclose(result.bits_per_byte, nll / math.log(2) / response_bytes, rel_tol=1e-5)


@pytest.fixture(scope="module")
def written_cache(tmp_path_factory):
    """A conversational run's teacher cache, written once: (its config, the corpus, the cache override)."""
    folder = tmp_path_factory.mktemp("chat-cache")
    corpus = write_chat_corpus(folder / "chat")
    cache = f"teacher.cache_dir={folder / 'cache'}"
    written = chat_config(folder / "writer", cache, corpus=corpus)
    cache_teacher(written, progress=False)
    return written, corpus, cache


@pytest.mark.parametrize(("overrides", "field"), [
    (["data.chat.system_prompt=Be brief."], "data.chat.system_prompt differs"),
    (["data.chat.train_on_prompts=true"], "data.chat.train_on_prompts differs"),
    ([f"data.chat.student_template={json.dumps(STUDENT_CHAT_TEMPLATE.replace('tiny student', 'student'))}"],
     "data.chat.student_template differs"),
])
def test_a_cache_made_for_another_rendering_is_refused_naming_the_field(written_cache, tmp_path, tiny_pair,
                                                                        overrides, field):
    teacher, student = tiny_pair
    written, corpus, cache = written_cache
    open_run_cache(written, teacher, student.tokenizer)  # the run it was written for reads it
    with pytest.raises(TeacherCacheError, match=field):
        open_run_cache(chat_config(tmp_path / "reader", cache, *overrides, corpus=corpus), teacher, student.tokenizer)


def test_a_bad_row_stops_the_run_before_its_first_step(tmp_path):
    corpus = write_chat_corpus(tmp_path / "chat", bad_row=json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    config = chat_config(tmp_path, corpus=corpus)
    with pytest.raises(ChatDataError, match=r"train.jsonl:4: the conversation has no assistant turn"):
        run_training(config)
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_the_fingerprint_covers_each_models_own_template(written_cache, tiny_pair):
    teacher, student = tiny_pair
    written, _, _ = written_cache
    retemplated = with_chat_template(student.tokenizer, STUDENT_CHAT_TEMPLATE.replace("tiny student", "student"))
    before = chat_fingerprint(written, teacher.tokenizer, student.tokenizer)
    after = chat_fingerprint(written, teacher.tokenizer, retemplated)
    assert fingerprint_difference(before, after).startswith("student_chat_template differs")
    assert chat_fingerprint(tiny_config_of_text(written), teacher.tokenizer, student.tokenizer) == {}


def tiny_config_of_text(config):
    """The same run on plain text: its fingerprint has no conversational fields (older caches still match)."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, format="text"))


def test_the_projector_prefit_learns_only_from_the_pairs_the_mask_trains(tmp_path):
    objective, batch = objective_and_first_batch(tiny_config(tmp_path, "objective.strategy=projector",
                                                             "objective.divergence=null"))
    transfer = objective.transfer
    everything = transfer._prefit_pairs([batch], objective.teacher_source.signal, objective.student_model)
    half = torch.zeros_like(batch.student_input_ids, dtype=torch.bool)
    half[:, : half.shape[1] // 2] = True
    masked = dataclasses.replace(batch, student_loss_mask=half)
    kept = transfer._prefit_pairs([masked], objective.teacher_source.signal, objective.student_model)
    trained = half[batch.pair_batch, batch.pair_student_pos]
    assert 0 < len(kept.target_ids) == int(trained.sum()) < len(everything.target_ids)
    assert torch.equal(kept.target_ids, everything.target_ids[trained])
    assert torch.equal(kept.teacher_features, everything.teacher_features[trained])


@pytest.mark.parametrize("overrides", [
    ["router.enabled=true", "router.num_experts=2", "router.top_k=1", "router.layerwise_alpha=0.1",
     "router.attention_alpha=0.1"],
    ["objective.strategy=projector", "objective.divergence=null", "objective.projector_prefit_steps=5"],
    ["data.chat.train_on_prompts=true"],
])
def test_feature_terms_the_projector_and_prompt_training_run_on_conversations(tmp_path, overrides):
    config = chat_config(tmp_path, "training.max_steps=1", *overrides)
    run_training(config)
    (record,) = log_records(config.output.run_dir)
    terms = [key for key in record if key.startswith("loss/")]
    assert len(terms) >= 2 and all(math.isfinite(record[key]) for key in terms)
