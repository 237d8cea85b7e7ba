"""The `student-projection` transfer: the matrix S (tiny tokenizers), the projected atoms and their numerics, the
fused chunk loop, the on-disk cache, and tiny training runs online and from a teacher cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState

import crosskd
from crosskd.config import ConfigError
from crosskd.data.collate import IGNORE_INDEX
from crosskd.data.encoding import token_bytes_table
from crosskd.losses.divergences import forward_kl
from crosskd.losses.lm import fused_chunked_losses
from crosskd.losses.target import TopKTarget, target_atoms, teacher_topk
from crosskd.teacher.cache_format import read_index
from crosskd.testing.tiny_tokenizers import byte_level_bpe, sentencepiece_like
from crosskd.vocab import student_projection
from crosskd.vocab.first_token import UNMAPPED
from crosskd.vocab.student_projection import (
    StudentProjection,
    StudentProjectionTransfer,
    build_student_projection_table,
    load_or_build_student_projection,
    projected_student_atoms,
    projection_loss_sum,
    teacher_support_target,
)
from trainer_helpers import log_records, objective_and_first_batch, run_training, tiny_config

PADDED = 5  # logit ids beyond the tokenizer, on both sides
STUDENT, TEACHER = byte_level_bpe(300), sentencepiece_like(420)  # a byte-level student, a SentencePiece teacher


def _valid_mask(tokenizer) -> torch.Tensor:
    mask = torch.ones(len(tokenizer) + PADDED, dtype=torch.bool)
    mask[len(tokenizer):] = False
    return mask


def _projection(student=STUDENT, teacher=TEACHER) -> StudentProjection:
    table = build_student_projection_table(student, teacher, _valid_mask(teacher).numpy(), len(student) + PADDED)
    return StudentProjection.from_table(torch.from_numpy(table), len(teacher) + PADDED, key="test")


def _dense(projection: StudentProjection) -> torch.Tensor:
    """S as a dense float64 matrix [student logit size, teacher logit size] (tests only: the code never builds it)."""
    table = projection.student_to_teacher
    dense = torch.zeros(len(table), len(projection.student_count), dtype=torch.float64)
    mapped = table != UNMAPPED
    dense[mapped.nonzero().squeeze(-1), table[mapped]] = 1.0
    return dense


def randn(*shape: int, seed: int, dtype=torch.float64, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _target(teacher_logits: torch.Tensor, k: int, projection: StudentProjection):
    valid = torch.zeros(teacher_logits.shape[-1], dtype=torch.bool)
    valid[: len(TEACHER)] = True
    return teacher_support_target(teacher_topk(teacher_logits, k, valid), projection)


# ---------------------------------------------------------------------------------------------------------------------
# The matrix S


def test_rows_of_hand_checked_tokens():
    projection = _projection()
    student_id = STUDENT.convert_tokens_to_ids
    teacher_of = {token: int(projection.student_to_teacher[student_id(token)]) for token in ("ĊĠĠĠ", "is", "Ġin")}
    # '\n   ' is the SentencePiece teacher's '\n' then three '▁': its mass goes to '\n' (not the byte token <0x0A>,
    # which spells the same byte but is not what the teacher emits for text).
    assert TEACHER.convert_ids_to_tokens(teacher_of["ĊĠĠĠ"]) == "\n"
    assert teacher_of["ĊĠĠĠ"] != TEACHER.convert_tokens_to_ids("<0x0A>")
    assert TEACHER.convert_ids_to_tokens(teacher_of["is"]) == "i"  # the teacher has no 'is': 'i' + 's'
    assert TEACHER.convert_ids_to_tokens(teacher_of["Ġin"]) == "▁in"  # an exact match, spelled differently
    dense = _dense(projection)
    for teacher_id in teacher_of.values():
        assert dense[:, teacher_id].sum() >= 1


def test_rows_sum_to_one_over_real_teacher_ids_and_padded_or_special_ids_get_nothing():
    projection = _projection()
    dense = _dense(projection)
    student_bytes, teacher_bytes = token_bytes_table(STUDENT), token_bytes_table(TEACHER)
    with_text = torch.tensor([i < len(STUDENT) and student_bytes[i] is not None for i in range(len(dense))])
    assert torch.equal(dense.sum(1), with_text.double())  # one 1 per student token with text, empty rows otherwise
    assert (dense.count_nonzero(1) <= 1).all()
    assert dense[:, len(TEACHER):].sum() == 0  # padded teacher ids never get mass
    assert dense[:, TEACHER.convert_tokens_to_ids("<|endoftext|>")].sum() == 0
    for student_id, teacher_id in enumerate(projection.student_to_teacher.tolist()):
        if teacher_id != UNMAPPED:  # the teacher token is where the student token's bytes begin
            assert student_bytes[student_id].startswith(teacher_bytes[teacher_id])


def test_the_csr_lists_each_teacher_ids_students():
    projection = _projection()
    dense = _dense(projection)
    for teacher_id in range(len(projection.student_count)):
        start, count = int(projection.first_student[teacher_id]), int(projection.student_count[teacher_id])
        students = projection.students_by_teacher[start:start + count]
        assert torch.equal(students.sort().values, dense[:, teacher_id].nonzero().squeeze(-1))


def test_the_same_tokenizer_gives_the_identity_on_real_ids():
    tokenizer = byte_level_bpe(300)
    table = _projection(tokenizer, tokenizer).student_to_teacher
    text_ids = [i for i, raw in enumerate(token_bytes_table(tokenizer)) if raw is not None]
    assert torch.equal(table[text_ids], torch.tensor(text_ids))
    assert (table[len(tokenizer):] == UNMAPPED).all() and table[tokenizer.convert_tokens_to_ids("<|endoftext|>")] == -1


def test_the_table_is_cached_and_reused_and_its_key_follows_the_pair(tmp_path, monkeypatch):
    built = load_or_build_student_projection(STUDENT, TEACHER, _valid_mask(TEACHER), len(STUDENT), cache_dir=tmp_path)
    monkeypatch.setattr(student_projection, "build_student_projection_table",
                        lambda *args: pytest.fail("the cached table was rebuilt"))
    reused = load_or_build_student_projection(STUDENT, TEACHER, _valid_mask(TEACHER), len(STUDENT), cache_dir=tmp_path)
    assert reused.key == built.key and torch.equal(reused.student_to_teacher, built.student_to_teacher)
    monkeypatch.undo()
    wider = load_or_build_student_projection(STUDENT, TEACHER, _valid_mask(TEACHER), len(STUDENT) + 3,
                                             cache_dir=tmp_path)
    other = load_or_build_student_projection(STUDENT, byte_level_bpe(500), _valid_mask(byte_level_bpe(500)),
                                             len(STUDENT), cache_dir=tmp_path)
    assert len({built.key, wider.key, other.key}) == 3 and len(wider.student_to_teacher) == len(STUDENT) + 3
    assert len(list((tmp_path / "vocab").glob("student_projection-*.npy"))) == 3


# ---------------------------------------------------------------------------------------------------------------------
# The target and the projected atoms


def test_teacher_ids_outside_the_image_of_s_join_the_tail_atom():
    projection = _projection()
    unreachable = int((projection.student_count[: len(TEACHER)] == 0).nonzero()[0])
    reachable = int((projection.student_count > 0).nonzero()[0])
    probs = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    topk = TopKTarget(torch.tensor([[reachable, unreachable]]), probs.log(), torch.tensor([0.3]).double().log())
    target = teacher_support_target(topk, projection)
    assert target.mask.tolist() == [[True, False]]
    torch.testing.assert_close(target.tail_logmass.exp(), torch.tensor([0.5], dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_projected_atoms_equal_the_dense_product_p_s_times_s(temperature):
    projection = _projection()
    student_logits = randn(7, len(STUDENT) + PADDED, seed=0)
    target = _target(randn(7, len(TEACHER) + PADDED, seed=1), 40, projection)
    assert (~target.mask).any() and target.mask.any()  # both kinds of slot are exercised
    projected = student_logits.softmax(-1) @ _dense(projection)  # [P, teacher logit size]
    support = projected.gather(-1, target.ids).masked_fill(~target.mask, 0.0)
    expected = torch.cat([support, 1 - support.sum(-1, keepdim=True)], -1).log()
    expected = (expected / temperature).log_softmax(-1)
    atoms = projected_student_atoms(student_logits, target, projection, temperature)
    torch.testing.assert_close(atoms, expected)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_identical_teacher_and_student_give_zero_kd(temperature):
    tokenizer = byte_level_bpe(300)
    projection = _projection(tokenizer, tokenizer)
    logits = randn(9, len(tokenizer) + PADDED, seed=2)
    valid = _valid_mask(tokenizer)
    logits = logits.masked_fill(~valid, -math.inf)  # the padded ids: no mass on either side
    target = teacher_support_target(teacher_topk(logits, 16, valid), projection)
    kd, count = projection_loss_sum(logits.log_softmax(-1), target, projection, forward_kl, temperature)
    assert count == 9 and abs(float(kd)) < 1e-10
    other, _ = projection_loss_sum(randn(9, len(tokenizer) + PADDED, seed=3).log_softmax(-1), target, projection,
                                   forward_kl, temperature)
    assert other > 0.1


def test_gradcheck_of_the_per_chunk_loss():
    projection = _projection()
    student_logits = randn(4, len(STUDENT) + PADDED, seed=4).requires_grad_()
    target = _target(randn(4, len(TEACHER) + PADDED, seed=5), 12, projection)
    assert torch.autograd.gradcheck(
        lambda z: projection_loss_sum(z.log_softmax(-1), target, projection, forward_kl, 1.7)[0], (student_logits,)
    )


def test_the_tail_atom_stays_finite_when_the_support_holds_all_but_a_rounding_of_the_mass():
    projection = _projection()
    target = _target(randn(3, len(TEACHER) + PADDED, seed=6), 30, projection)
    on_support = torch.zeros(3, len(STUDENT) + PADDED, dtype=torch.bool)
    for row in range(3):
        for teacher_id in target.ids[row][target.mask[row]].tolist():
            on_support[row, projection.student_to_teacher == teacher_id] = True
    student_logits = torch.zeros(3, len(STUDENT) + PADDED).masked_fill(on_support, 40.0).requires_grad_()
    logp = student_logits.log_softmax(-1)
    exact_tail = student_logits.detach().double().log_softmax(-1).masked_fill(on_support, -math.inf).logsumexp(-1)
    # In float32 the support's mass rounds to 1, so a tail taken as log(1 - support mass) is rounding noise (or
    # log 0, or the log of a negative number), not the true ~e^-40.
    support_mass = logp.exp().masked_fill(~on_support, 0).sum(-1)
    assert not ((torch.log1p(-support_mass) - exact_tail).abs() < 1.0).any()
    atoms = projected_student_atoms(logp, target, projection, 1.0, normalized=True)
    torch.testing.assert_close(atoms[:, -1].double(), exact_tail, rtol=0, atol=1e-3)
    kd, _ = projection_loss_sum(logp, target, projection, forward_kl, 1.0)
    kd.backward()
    assert torch.isfinite(kd) and torch.isfinite(student_logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extreme_half_precision_logits_stay_finite(dtype):
    projection = _projection()
    signs = torch.randint(0, 2, (6, len(STUDENT) + PADDED), generator=torch.Generator().manual_seed(7)) * 2 - 1
    student_logits = (1e4 * signs).to(dtype).requires_grad_()
    teacher_logits = torch.full((6, len(TEACHER) + PADDED), -1e4).to(dtype)
    teacher_logits[:, :: 3] = 1e4
    target = _target(teacher_logits, 10, projection)
    atoms = projected_student_atoms(student_logits, target, projection, 2.0)
    kd = forward_kl(atoms, target_atoms(target, 2.0))
    assert not torch.isnan(atoms).any() and not torch.isnan(kd).any()
    kd[torch.isfinite(kd)].sum().backward()
    assert torch.isfinite(student_logits.grad).all()


def test_fused_chunks_equal_the_unchunked_loss_and_gradients():
    projection = _projection()
    n_rows, hidden_size, vocab_size = 30, 6, len(STUDENT) + PADDED
    hidden = randn(n_rows, hidden_size, seed=8, scale=1.0).requires_grad_()
    head = randn(vocab_size, hidden_size, seed=9, scale=1.0).requires_grad_()
    targets = torch.randint(0, vocab_size, (n_rows,), generator=torch.Generator().manual_seed(10))
    targets[::4] = IGNORE_INDEX
    kd_rows = torch.tensor([29, 4, 0, 17, 8])
    target = _target(randn(len(kd_rows), len(TEACHER) + PADDED, seed=11), 16, projection)
    logp = (hidden @ head.T).log_softmax(-1)
    expected_kd, _ = projection_loss_sum(logp[kd_rows], target, projection, forward_kl, 2.0)
    expected_lm = F.nll_loss(logp, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    expected_grads = torch.autograd.grad(expected_lm + expected_kd, (hidden, head))
    kd_loss_sum = lambda chunk_logp, chunk_target: projection_loss_sum(  # noqa: E731
        chunk_logp, chunk_target, projection, forward_kl, 2.0)
    for chunk_size in (1, 7, 100):
        sums = fused_chunked_losses(hidden, head, targets, kd_rows, target, kd_loss_sum, chunk_size)
        assert sums.kd_count == 5
        torch.testing.assert_close(sums.kd_sum, expected_kd)
        torch.testing.assert_close(sums.lm_sum, expected_lm)
        for grad, expected_grad in zip(torch.autograd.grad(sums.lm_sum + sums.kd_sum, (hidden, head)), expected_grads):
            torch.testing.assert_close(grad, expected_grad)


# ---------------------------------------------------------------------------------------------------------------------
# The transfer in a run


def test_the_strategy_is_registered_and_refuses_options_of_other_strategies(tmp_path):
    config = tiny_config(tmp_path, "objective.strategy=student-projection")
    assert StudentProjectionTransfer.teacher_needs(config.objective).parts == ("topk",)
    with pytest.raises(ConfigError, match="mismatch_policy 'exclude' applies only to the first-token strategy"):
        tiny_config(tmp_path, "objective.strategy=student-projection", "objective.mismatch_policy=exclude")
    with pytest.raises(ConfigError, match="objective.divergence is 'forward-kl'.*did you mean 'forward_kl'"):
        tiny_config(tmp_path, "objective.strategy=student-projection", "objective.divergence=forward-kl")


def test_the_runs_target_is_the_teachers_top_k_with_unreachable_ids_moved_to_the_tail(tmp_path):
    config = tiny_config(tmp_path, "objective.strategy=student-projection")
    objective, batch = objective_and_first_batch(config)
    selection = objective.select(batch)
    signal = objective.teacher_signal(batch, weights={"attention": 0.0})
    target = objective.transfer.kd_target(signal, selection, None, None)
    assert torch.equal(target.ids, signal.topk.ids) and target.ids.shape[-1] == config.objective.kd_top_k
    reachable = objective.transfer.projection.student_count[target.ids] > 0
    assert torch.equal(target.mask, reachable) and 0 < reachable.float().mean() < 1
    kept_mass = target.logp.exp().masked_fill(~target.mask, 0).sum(-1)
    torch.testing.assert_close(kept_mass + target.tail_logmass.exp(), torch.ones(len(kept_mass)))


def test_trains_from_a_teacher_cache_as_online(tmp_path):
    overrides = ("objective.strategy=student-projection", "training.max_steps=2", "schedule.kd_warmup_start=1.0")
    online = tiny_config(tmp_path / "online", *overrides)
    run_training(online)
    cached = tiny_config(tmp_path / "cached", *overrides, "teacher.source=cache",
                         f"teacher.cache_dir={tmp_path / 'cache'}")
    AcceleratorState._reset_state(reset_partial_state=True)
    summary = crosskd.cache_teacher(cached, progress=False)
    assert summary.positions > 0 and read_index(summary.cache_dir)["layout"]["signal"] == "topk"
    run_training(cached)
    online_kd = [record["loss/kd"] for record in log_records(online.output.run_dir)]
    cached_kd = [record["loss/kd"] for record in log_records(cached.output.run_dir)]
    assert len(online_kd) == 2 and all(math.isfinite(value) and value > 0 for value in online_kd)
    # The cache stores the log-probabilities in fp16: the same KD up to that rounding.
    assert cached_kd == pytest.approx(online_kd, rel=1e-2)
