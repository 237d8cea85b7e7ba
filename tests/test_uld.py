"""ULD: the sorted-probability L1 distance, its truncation, numerics and the fused chunk loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crosskd.losses.lm import IGNORE_INDEX
from crosskd.losses.target import TopKTarget, teacher_topk
from crosskd.vocab.uld import chunked_lm_and_uld, uld_loss_sum, uld_per_position


def randn(*shape: int, seed: int, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def topk_of(teacher_logits: torch.Tensor, k: int) -> TopKTarget:
    return teacher_topk(teacher_logits, k, torch.ones(teacher_logits.shape[-1], dtype=torch.bool))


def test_full_vocabulary_uld_is_the_l1_distance_of_sorted_padded_probabilities():
    """With k = teacher vocabulary there is no tail: ULD is exactly the paper's formula."""
    student_z, teacher_z = randn(6, 13, seed=0, dtype=torch.float64), randn(6, 20, seed=1, dtype=torch.float64)
    student_sorted = F.pad(student_z.softmax(-1).sort(-1, descending=True).values, (0, 7))
    teacher_sorted = teacher_z.softmax(-1).sort(-1, descending=True).values
    expected = (student_sorted - teacher_sorted).abs().sum(-1)
    torch.testing.assert_close(uld_per_position(student_z, topk_of(teacher_z, 20), 1.0), expected)


def test_truncated_uld_compares_top_ranks_and_tail_masses():
    student_z, teacher_z = randn(5, 40, seed=2, dtype=torch.float64), randn(5, 50, seed=3, dtype=torch.float64)
    p_s = student_z.softmax(-1).sort(-1, descending=True).values
    p_t = teacher_z.softmax(-1).sort(-1, descending=True).values
    expected = (p_s[:, :6] - p_t[:, :6]).abs().sum(-1) + (p_s[:, 6:].sum(-1) - p_t[:, 6:].sum(-1)).abs()
    torch.testing.assert_close(uld_per_position(student_z, topk_of(teacher_z, 6), 1.0), expected)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_zero_for_identical_and_positive_otherwise(temperature):
    z = randn(8, 30, seed=4)
    assert torch.allclose(uld_per_position(z, topk_of(z, 5), temperature), torch.zeros(8), atol=1e-6)
    # A permutation of the vocabulary is invisible to ULD: only the sorted values count.
    permuted = z[:, torch.randperm(30, generator=torch.Generator().manual_seed(5))]
    assert torch.allclose(uld_per_position(permuted, topk_of(z, 5), temperature), torch.zeros(8), atol=1e-6)
    other = uld_per_position(randn(8, 30, seed=6), topk_of(z, 5), temperature)
    assert (other > 0).all() and (other <= 2).all()  # an L1 distance between distributions is at most 2


def test_unsorted_cached_topk_gives_the_same_distance():
    student_z, teacher_z = randn(4, 25, seed=7), randn(4, 25, seed=8)
    topk = topk_of(teacher_z, 6)
    shuffled = torch.randperm(6, generator=torch.Generator().manual_seed(9))
    unsorted = TopKTarget(topk.ids[:, shuffled], topk.logp[:, shuffled], topk.tail_logmass)
    torch.testing.assert_close(uld_per_position(student_z, unsorted, 2.0), uld_per_position(student_z, topk, 2.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extreme_half_precision_logits_stay_finite(dtype):
    signs = torch.randint(0, 2, (6, 64), generator=torch.Generator().manual_seed(10)) * 2 - 1
    student_z = (1e4 * signs).to(dtype).requires_grad_()
    topk = topk_of((-1e4 * signs).to(dtype), 8)
    value = uld_per_position(student_z, topk, 2.0)
    assert torch.isfinite(value).all() and (value >= 0).all()
    value.sum().backward()
    assert torch.isfinite(student_z.grad).all()


def test_gradcheck_float64():
    student_z = randn(3, 9, seed=11, dtype=torch.float64).requires_grad_()
    teacher = topk_of(randn(3, 12, seed=12, dtype=torch.float64), 4)
    logp = teacher.logp.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z, logp: uld_per_position(z, TopKTarget(teacher.ids, logp, teacher.tail_logmass), 1.7), (student_z, logp)
    )


def test_fused_uld_equals_unchunked():
    n_rows, hidden_size, vocab_size = 30, 6, 25
    hidden = randn(n_rows, hidden_size, seed=13, dtype=torch.float64, scale=1.0).requires_grad_()
    head = randn(vocab_size, hidden_size, seed=14, dtype=torch.float64, scale=1.0).requires_grad_()
    targets = torch.randint(0, vocab_size, (n_rows,), generator=torch.Generator().manual_seed(15))
    targets[::4] = IGNORE_INDEX
    kd_rows = torch.tensor([29, 4, 0, 17, 8])
    teacher = topk_of(randn(len(kd_rows), 40, seed=16, dtype=torch.float64), 6)
    logits = hidden @ head.T
    expected_kd, expected_count = uld_loss_sum(logits[kd_rows], teacher, 2.0)
    expected_lm = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    expected_grads = torch.autograd.grad(expected_lm + expected_kd, (hidden, head))
    for chunk_size in (1, 7, 100):
        sums = chunked_lm_and_uld(hidden, head, targets, kd_rows, teacher, 2.0, chunk_size=chunk_size)
        assert sums.kd_count == expected_count == 5
        torch.testing.assert_close(sums.kd_sum, expected_kd)
        torch.testing.assert_close(sums.lm_sum, expected_lm)
        for grad, expected_grad in zip(torch.autograd.grad(sums.lm_sum + sums.kd_sum, (hidden, head)), expected_grads):
            torch.testing.assert_close(grad, expected_grad)
