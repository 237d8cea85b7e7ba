"""The vocabulary-transfer registry as an extension point, the position selection, and the Python entry point."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from accelerate.state import AcceleratorState

import crosskd
from crosskd.config import ConfigError
from crosskd.data.collate import IGNORE_INDEX
from crosskd.losses.divergences import DIVERGENCES
from crosskd.losses.selection import select_positions, step_counts
from crosskd.losses.target import TopKTarget
from crosskd.teacher.cache_format import read_index
from crosskd.teacher.online import TeacherNeeds
from crosskd.vocab.first_token import load_or_build_first_token_map, push_topk_through_map
from crosskd.vocab.transfer import TRANSFERS, DivergenceTransfer
from trainer_helpers import log_records, objective_and_first_batch, run_training, tiny_config


class SameEndTopOne(DivergenceTransfer):
    """A toy transfer: the teacher's most likely token as a one-hot target through the first-token map, on the pairs
    where both next tokens end at the same byte."""

    name = "same-end-top-one"

    @classmethod
    def teacher_needs(cls, objective) -> TeacherNeeds:
        return TeacherNeeds(topk=True)

    def __init__(self, config, teacher, student):
        super().__init__(config, teacher, student)
        self.teacher_to_student = load_or_build_first_token_map(
            student.tokenizer, teacher.tokenizer, teacher.vocab.valid_mask, student.vocab.logit_size).teacher_to_student

    def kd_pairs(self, batch) -> torch.Tensor:
        return batch.pair_student_next_bytes == batch.pair_teacher_next_bytes

    def kd_target(self, signal, selection, inputs, student_embedding):
        topk = signal.topk.select(selection.kd_pairs)
        top_one = TopKTarget(topk.ids[:, :1], torch.zeros_like(topk.logp[:, :1]),
                             torch.full_like(topk.tail_logmass, -math.inf))
        return push_topk_through_map(top_one, self.teacher_to_student)


@pytest.fixture
def toy_transfer(monkeypatch):
    monkeypatch.setitem(TRANSFERS, SameEndTopOne.name, SameEndTopOne)
    return SameEndTopOne


def test_a_transfer_defined_here_is_selected_by_the_config_and_trains_end_to_end(tmp_path, toy_transfer):
    config = tiny_config(tmp_path, f"objective.strategy={toy_transfer.name}", "training.max_steps=3",
                         "schedule.kd_warmup_start=1.0")
    objective, batch = objective_and_first_batch(config)
    selection = objective.select(batch)
    same_end = batch.pair_student_next_bytes == batch.pair_teacher_next_bytes
    assert 0 < int(selection.counts()["kd"]) == int(same_end.sum()) < len(same_end)
    result = run_training(config)
    kd = [record["loss/kd"] for record in log_records(config.output.run_dir)]
    assert len(kd) == 3 and all(math.isfinite(value) and value > 0 for value in kd)
    assert result.student_dir.is_dir() and math.isfinite(result.best_bpb)


@pytest.mark.parametrize(("overrides", "computed", "not_computed"), [
    ((), "topk", "final_hidden"),
    (("objective.strategy=uld", "objective.divergence=null"), "topk", "final_hidden"),
    (("objective.strategy=student-projection",), "topk", "final_hidden"),
    (("objective.strategy=projector",), "final_hidden", "topk"),
    (("objective.strategy=projector", "objective.projector_features=topk_embeddings"), "topk", "final_hidden"),
    (("objective.strategy=chunk-likelihood", "objective.kd_alpha=0"), "observed_logprobs", "topk"),
    (("objective.mismatch_policy=chain-rule",), "observed_logprobs", "final_hidden"),
])
def test_the_online_teacher_computes_only_what_the_transfer_declares(tmp_path, overrides, computed, not_computed):
    objective, batch = objective_and_first_batch(tiny_config(tmp_path, *overrides))
    signal = objective.teacher_signal(batch, weights={"attention": 0.0})
    assert getattr(signal, computed) is not None and getattr(signal, not_computed) is None


def test_a_transfer_defined_here_trains_from_a_teacher_cache_of_what_it_declares(tmp_path, toy_transfer):
    config = tiny_config(tmp_path, f"objective.strategy={toy_transfer.name}", "training.max_steps=2",
                         "teacher.source=cache", f"teacher.cache_dir={tmp_path / 'cache'}")
    AcceleratorState._reset_state(reset_partial_state=True)
    summary = crosskd.cache_teacher(config, progress=False)
    assert summary.positions > 0 and read_index(summary.cache_dir)["layout"]["signal"] == "topk"
    run_training(config)
    assert all(math.isfinite(record["loss/kd"]) for record in log_records(config.output.run_dir))


def test_an_unregistered_strategy_is_refused_with_the_registered_names(tmp_path):
    with pytest.raises(ConfigError, match="objective.strategy is 'same-end-top-one', which is not one of first-token"):
        tiny_config(tmp_path, "objective.strategy=same-end-top-one")


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_every_registered_divergence_is_accepted_and_trains(tmp_path, divergence):
    config = tiny_config(tmp_path, f"objective.divergence={divergence}", "training.max_steps=2",
                         "schedule.kd_warmup_start=1.0")
    run_training(config)
    records = log_records(config.output.run_dir)
    assert len(records) == 2 and all(math.isfinite(r["loss/kd"]) and math.isfinite(r["total"]) for r in records)


def test_a_loss_mask_removes_positions_from_every_term_and_from_the_counts(tmp_path):
    objective, batch = objective_and_first_batch(tiny_config(tmp_path, "objective.mismatch_policy=exclude"))
    kd_pairs = objective.transfer.kd_pairs(batch)
    unmasked = select_positions(batch, kd_pairs)
    trained = torch.zeros_like(batch.student_input_ids, dtype=torch.bool)
    trained[:, batch.student_input_ids.shape[1] // 2:] = True  # the second half of every window: a "response"
    masked = select_positions(dataclasses.replace(batch, student_loss_mask=trained), kd_pairs)

    in_response = trained[batch.pair_batch, batch.pair_student_pos]
    assert torch.equal(masked.kd_pairs, kd_pairs & in_response)
    assert torch.equal(masked.lm_targets, unmasked.lm_targets.masked_fill(~trained.reshape(-1), IGNORE_INDEX))
    assert (masked.feature_pairs.student_pos >= batch.student_input_ids.shape[1] // 2).all()
    counts, unmasked_counts = step_counts([masked]), step_counts([unmasked])
    for key in ("lm", "kd", "features"):
        assert 0 < counts[key] < unmasked_counts[key], key
    assert counts["kd"] == int((kd_pairs & in_response).sum())
    assert torch.equal(masked.kd_rows, unmasked.kd_rows[in_response[kd_pairs]])


def test_without_a_loss_mask_the_selection_keeps_every_target_and_the_transfers_pairs(tmp_path):
    objective, batch = objective_and_first_batch(tiny_config(tmp_path, "objective.mismatch_policy=exclude"))
    selection = objective.select(batch)
    assert torch.equal(selection.lm_targets, batch.student_targets.reshape(-1))
    assert torch.equal(selection.kd_pairs, batch.pair_student_next_bytes <= batch.pair_teacher_next_bytes)
    assert ((selection.feature_pairs.student_pos > 0) & (selection.feature_pairs.teacher_pos > 0)).all()


def test_the_python_entry_point_takes_a_mapping_with_overrides_and_returns_the_result(tmp_path):
    config = tiny_config(tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)
    result = crosskd.distill(config.to_dict(), overrides=["training.max_steps=2"])
    assert isinstance(result, crosskd.TrainResult) and result.steps == 2
    assert result.student_dir.is_dir() and result.run_dir == tmp_path / "run"
    assert all(math.isfinite(value) for value in (result.initial_bpb, result.best_bpb, result.teacher_bpb))
    assert (result.nonfinite_skipped, result.overflow_skipped) == (0, 0)
    assert crosskd.load_config(config, ["training.max_steps=7"]).training.max_steps == 7
