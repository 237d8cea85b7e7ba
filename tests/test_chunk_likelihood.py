"""The `chunk-likelihood` transfer: chunks between shared token boundaries, per-chunk losses (zero at equal likelihoods,
gradcheck, finite from half-precision inputs), the student's likelihoods read from the fused chunk loop across its
row-chunk boundaries, config rules, training online and from a cache, and the cache's refusal."""

from __future__ import annotations

import math

import pytest
import torch

from crosskd.api import cache_teacher
from crosskd.config import ConfigError
from crosskd.data.collate import IGNORE_INDEX, DualBatch
from crosskd.losses.likelihood import (
    CHUNK_LOSSES,
    binary_likelihood_kl,
    likelihood_chunks,
    squared_likelihood_difference,
)
from crosskd.losses.lm import fused_chunked_losses
from crosskd.losses.selection import step_counts
from crosskd.teacher.cache import TeacherCacheError
from crosskd.teacher.online import OnlineTeacher
from crosskd.vocab.transfer import transfer_class
from trainer_helpers import log_records, objective_and_first_batch, run_training, tiny_config, write_corpus

STRATEGY = "objective.strategy=chunk-likelihood"


def hand_built_batch(loss_mask: torch.Tensor | None = None) -> DualBatch:
    """Row 0: pairs (0, 0), (2, 1), (3, 3): chunks student positions {0, 1} / teacher {0}, then student {2} / teacher
    {1, 2}. Row 1: one pair only, so no shared boundary closes a chunk."""
    student = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    teacher = torch.tensor([[1, 2, 3, 4, 0], [1, 2, 3, 4, 0]])
    return DualBatch(
        student_input_ids=student, student_targets=torch.full_like(student, IGNORE_INDEX),
        student_attention_mask=torch.ones_like(student), teacher_input_ids=teacher,
        teacher_attention_mask=torch.ones_like(teacher), pair_batch=torch.tensor([0, 0, 0, 1]),
        pair_student_pos=torch.tensor([0, 2, 3, 1]), pair_teacher_pos=torch.tensor([0, 1, 3, 2]),
        pair_student_next_bytes=torch.ones(4, dtype=torch.long),
        pair_teacher_next_bytes=torch.ones(4, dtype=torch.long),
        text_bytes=torch.tensor([5, 5]), student_loss_mask=loss_mask,
    )


def test_chunks_run_between_consecutive_pairs_of_a_row_and_rows_without_two_pairs_have_none():
    chunks = likelihood_chunks(hand_built_batch())
    assert chunks.count == 2
    assert chunks.student_rows.tolist() == [0, 1, 2] and chunks.student_chunk.tolist() == [0, 0, 1]
    assert chunks.teacher_rows.tolist() == [0, 1, 2] and chunks.teacher_chunk.tolist() == [0, 1, 1]
    student_logp = torch.tensor([-1.0, -2.0, -4.0] + [-100.0] * 7)
    assert chunks.student(student_logp).tolist() == [-3.0, -4.0]
    teacher_logp = torch.tensor([[-0.5, -1.5, -2.5, -9.0, 0.0], [-9.0] * 5])
    assert chunks.teacher(teacher_logp).tolist() == [-0.5, -4.0]


def test_a_chunk_with_a_masked_out_position_is_left_out_whole():
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = False  # inside the first chunk
    chunks = likelihood_chunks(hand_built_batch(mask), mask)
    assert chunks.count == 1
    assert chunks.student_rows.tolist() == [2] and chunks.teacher_rows.tolist() == [1, 2]


def test_no_chunks_give_a_zero_loss_with_a_zero_gradient():
    single_pairs = hand_built_batch()
    single_pairs = DualBatch(**{**vars(single_pairs), "pair_batch": torch.tensor([0, 1]),
                                "pair_student_pos": torch.tensor([0, 1]), "pair_teacher_pos": torch.tensor([0, 2]),
                                "pair_student_next_bytes": torch.ones(2, dtype=torch.long),
                                "pair_teacher_next_bytes": torch.ones(2, dtype=torch.long)})
    chunks = likelihood_chunks(single_pairs)
    assert chunks.count == 0
    student_logp = torch.randn(10, requires_grad=True)
    for loss in CHUNK_LOSSES.values():
        value = loss(chunks.student(student_logp), chunks.teacher(torch.zeros(2, 5)), 100.0).sum()
        value.backward()
        assert value.item() == 0.0 and torch.equal(student_logp.grad, torch.zeros(10))
        student_logp.grad = None


@pytest.mark.parametrize("loss", sorted(CHUNK_LOSSES))
def test_equal_likelihoods_give_zero_and_others_a_positive_loss(loss):
    loglik = torch.tensor([-0.01, -1.0, -30.0, -900.0], dtype=torch.float64)
    assert torch.equal(CHUNK_LOSSES[loss](loglik, loglik, 100.0), torch.zeros(4, dtype=torch.float64))
    assert (CHUNK_LOSSES[loss](loglik - 0.5, loglik, 100.0) > 0).all()


def test_the_binary_loss_is_tokenkits_binary_cross_entropy_less_the_teachers_binary_entropy():
    student, teacher, temperature = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([-2.0],
                                                                                             dtype=torch.float64), 4.0
    p, q = (student / temperature).exp(), (teacher / temperature).exp()
    cross_entropy = -(q * p.log() + (1 - q) * (1 - p).log())
    entropy = -(q * q.log() + (1 - q) * (1 - q).log())
    torch.testing.assert_close(binary_likelihood_kl(student, teacher, temperature), cross_entropy - entropy)


@pytest.mark.parametrize("loss", sorted(CHUNK_LOSSES))
def test_the_per_chunk_losses_pass_gradcheck(loss):
    student = torch.tensor([-0.2, -3.0, -40.0], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([-0.5, -1.0, -45.0], dtype=torch.float64)
    for temperature in (1.0, 100.0):
        assert torch.autograd.gradcheck(lambda s: CHUNK_LOSSES[loss](s, teacher, temperature), (student,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_likelihoods_stay_finite_and_are_compared_in_float32(dtype):
    student = torch.tensor([-1e-3, -0.7, -20.0, -3000.0])
    teacher = torch.tensor([-2e-3, -0.5, -25.0, -2900.0])
    for loss in (binary_likelihood_kl, squared_likelihood_difference):
        value = loss(student.to(dtype).requires_grad_(), teacher.to(dtype), 100.0)
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        torch.testing.assert_close(value, loss(student.to(dtype).float(), teacher.to(dtype).float(), 100.0))
        value.sum().backward()


def test_the_fused_loop_returns_each_rows_target_log_probability_across_its_chunks():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 4, generator=generator, requires_grad=True)
    head = torch.randn(11, 4, generator=generator)
    targets = torch.randint(0, 11, (9,), generator=generator)
    targets[[2, 8]] = IGNORE_INDEX
    no_kd = torch.empty(0, dtype=torch.long)
    sums = fused_chunked_losses(hidden, head, targets, no_kd, None, None, chunk_size=2, keep_token_logp=True)
    direct = (hidden @ head.T).log_softmax(-1).gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1)
    expected = direct.masked_fill(targets == IGNORE_INDEX, 0.0)
    torch.testing.assert_close(sums.lm_token_logp, expected)
    torch.testing.assert_close(-sums.lm_token_logp.sum(), sums.lm_sum)
    assert fused_chunked_losses(hidden, head, targets, no_kd, None, None, chunk_size=2).lm_token_logp is None
    (grad,) = torch.autograd.grad(sums.lm_token_logp[0], hidden)
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


# --- on the tiny pair -------------------------------------------------------------------------------------------------


def chunk_term(config):
    objective, batch = objective_and_first_batch(config, batch_size=3)
    selection = objective.select(batch)
    signal = objective.teacher_signal(batch, {"attention": 0.0})
    outputs = objective.student_model(**objective.student_inputs(batch, {"attention": 0.0}))
    terms = objective(batch, selection, outputs.hidden_states, None, signal, {"kd": 1.0, "attention": 0.0}, 1.0)
    return terms, selection, signal, batch, objective, outputs


def test_the_student_likelihoods_are_those_of_its_full_logits_whatever_the_row_chunks(tmp_path):
    # chunk_size 3: most text chunks of two or more student tokens cross a row-chunk boundary of the fused loop.
    terms, selection, signal, batch, objective, outputs = chunk_term(
        tiny_config(tmp_path, STRATEGY, "objective.chunk_likelihood_loss=squared", "objective.chunk_size=3"))
    chunks = selection.chunks
    crossing = sum(int(chunks.student_chunk[rows].unique().numel() > 1)
                   for rows in torch.arange(len(chunks.student_rows)).split(3))
    assert crossing > 0
    hidden = outputs.hidden_states[-1].reshape(-1, outputs.hidden_states[-1].shape[-1])
    logp = objective.student_model.get_output_embeddings()(hidden).float().log_softmax(-1)
    targets = selection.lm_targets
    student = chunks.student(logp.gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1))
    expected = (student - chunks.teacher(signal.observed_logprobs)).square().sum()
    torch.testing.assert_close(terms["chunk_likelihood"].value, expected, rtol=1e-5, atol=1e-4)
    assert terms["chunk_likelihood"].count_key == "chunks" and int(selection.counts()["chunks"]) == chunks.count > 0


def test_the_chunk_term_is_normalised_by_the_chunk_count_of_the_whole_step(tmp_path):
    # Two micro-batches of one window give the same step value as one micro-batch of both (gradient accumulation).
    objective, batch = objective_and_first_batch(tiny_config(tmp_path, STRATEGY), batch_size=2)
    halves = [DualBatch(**{**vars(batch), **window}) for window in split_windows(batch)]
    weights = {"kd": 1.0, "attention": 0.0}

    def step_value(batches):
        selections = [objective.select(micro_batch) for micro_batch in batches]
        counts = step_counts(selections)
        value = 0.0
        for micro_batch, selection in zip(batches, selections):
            signal = objective.teacher_signal(micro_batch, weights)
            outputs = objective.student_model(**objective.student_inputs(micro_batch, weights))
            terms = objective(micro_batch, selection, outputs.hidden_states, None, signal, weights, 1.0)
            value += objective.combine({"chunk_likelihood": terms["chunk_likelihood"]}, counts, weights,
                                       len(batches), 1).weighted["chunk_likelihood"]
        return value, int(counts["chunks"])

    (whole, whole_count), (accumulated, accumulated_count) = step_value([batch]), step_value(halves)
    assert whole_count == accumulated_count > 0
    assert math.isclose(whole, accumulated, rel_tol=1e-5)


def split_windows(batch: DualBatch) -> list[dict]:
    """The fields of each window of `batch` as a batch of its own (its teacher row cut to its real tokens)."""
    windows = []
    for row in range(len(batch.student_input_ids)):
        pairs = batch.pair_batch == row
        width = int(batch.teacher_attention_mask[row].sum())
        windows.append({
            **{name: getattr(batch, name)[row:row + 1] for name in
               ("student_input_ids", "student_targets", "student_attention_mask", "text_bytes")},
            "teacher_input_ids": batch.teacher_input_ids[row:row + 1, :width],
            "teacher_attention_mask": batch.teacher_attention_mask[row:row + 1, :width],
            "pair_batch": torch.zeros(int(pairs.sum()), dtype=torch.long),
            **{name: getattr(batch, name)[pairs] for name in
               ("pair_student_pos", "pair_teacher_pos", "pair_student_next_bytes", "pair_teacher_next_bytes")},
        })
    return windows


def test_identical_teacher_and_student_give_zero_loss(tmp_path):
    for loss in sorted(CHUNK_LOSSES):
        terms, *_ = chunk_term(tiny_config(tmp_path, STRATEGY, "models.teacher=tiny:student",
                                           f"objective.chunk_likelihood_loss={loss}"))
        assert abs(terms["chunk_likelihood"].value.item()) < 1e-4


def test_the_teacher_needs_and_the_config_rules(tmp_path):
    hybrid = tiny_config(tmp_path, STRATEGY).objective
    alone = tiny_config(tmp_path, STRATEGY, "objective.kd_alpha=0").objective
    assert transfer_class(hybrid).teacher_needs(hybrid).parts == ("topk", "observed_logprobs")
    assert transfer_class(alone).teacher_needs(alone).parts == ("observed_logprobs",)
    tiny_config(tmp_path, STRATEGY, "objective.mismatch_policy=exclude")  # first-token's options are its own too
    for overrides, message in [
        (["objective.chunk_likelihood_temperature=2"], "chunk_likelihood_temperature 2.0 applies only to the "
                                                       "chunk-likelihood strategy"),
        (["objective.chunk_likelihood_loss=squared"], "chunk_likelihood_loss 'squared' applies only to the "
                                                      "chunk-likelihood strategy"),
        ([STRATEGY, "objective.chunk_likelihood_temperature=0"], "must be positive"),
        ([STRATEGY, "objective.chunk_likelihood_weight=-1"], "must be 0 or more"),
        ([STRATEGY, "objective.chunk_likelihood_loss=mse"], "chunk_likelihood_loss"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, *overrides)


STEPS = 3


@pytest.mark.parametrize("alone", [False, True], ids=["with-first-token", "alone"])
def test_chunk_likelihood_trains_online_and_from_a_cache_with_the_same_losses(tmp_path, monkeypatch, alone):
    common = (STRATEGY, f"training.max_steps={STEPS}", *(["objective.kd_alpha=0"] if alone else []))
    online = tiny_config(tmp_path / "online", *common)
    cached = tiny_config(tmp_path / "cached", *common, f"teacher.cache_dir={tmp_path / 'cache'}",
                         "teacher.source=cache")
    run_training(online, debug=True)
    summary = cache_teacher(cached, progress=False)
    assert summary.bytes_per_position < (8 if alone else 1000)  # alone: only 4 bytes per teacher token
    monkeypatch.setattr(OnlineTeacher, "signal", lambda *a, **k: pytest.fail("the online teacher ran"))
    run_training(cached)
    online_logs, cached_logs = log_records(online.output.run_dir), log_records(cached.output.run_dir)
    assert len(online_logs) == len(cached_logs) == STEPS
    for exact, from_cache in zip(online_logs, cached_logs):
        assert exact["loss/chunk_likelihood"] > 0 and math.isfinite(exact["total"])
        assert math.isclose(from_cache["loss/chunk_likelihood"], exact["loss/chunk_likelihood"], rel_tol=1e-4)
        assert math.isclose(from_cache["loss/kd"], exact["loss/kd"], rel_tol=1e-3)
        assert (exact["loss/kd"] == 0) == alone
    (evaluation,) = log_records(online.output.run_dir, "eval")
    assert ("top1_agreement" in evaluation) != alone  # no token-level target alone: no retention metrics


def test_a_cache_without_the_observed_logprobs_is_refused(tmp_path):
    cache, corpus = tmp_path / "cache", write_corpus(tmp_path / "corpus")
    cache_teacher(tiny_config(tmp_path / "first-token", "training.max_steps=1", f"teacher.cache_dir={cache}",
                              corpus=corpus), progress=False)
    with pytest.raises(TeacherCacheError, match="the cache lacks observed_logprobs.*crosskd cache-teacher"):
        run_training(tiny_config(tmp_path / "chunks", STRATEGY, "training.max_steps=1", f"teacher.cache_dir={cache}",
                                 "teacher.source=cache", corpus=corpus))
