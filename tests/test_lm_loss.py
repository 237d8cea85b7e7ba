"""Chunked LM cross-entropy and the fused LM + KD loss: equal to the unchunked maths, bounded memory, numerics."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from crosskd.losses.divergences import DIVERGENCES, get_divergence
from torch.utils.checkpoint import checkpoint

from crosskd.losses import lm
from crosskd.losses.lm import IGNORE_INDEX, chunked_cross_entropy, chunked_lm_and_kd
from crosskd.losses.target import MappedTarget, StudentGroups, support_atoms, teacher_topk


def randn(*shape: int, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def problem(n_rows=40, hidden_size=8, vocab_size=30, k=5, dtype=torch.float32, seed=0):
    """Student hidden states and head, LM targets with ignored rows, KD rows and a target with masked slots."""
    hidden = randn(n_rows, hidden_size, seed=seed, dtype=dtype).requires_grad_()
    head = randn(vocab_size, hidden_size, seed=seed + 1, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab_size, (n_rows,), generator=torch.Generator().manual_seed(seed + 2))
    targets[::3] = IGNORE_INDEX
    kd_rows = torch.tensor([n_rows - 1, 2, 3, 7, 11, 12, 25, 0])  # unsorted, some with ignored LM targets
    teacher_logits = randn(len(kd_rows), vocab_size, seed=seed + 3, scale=3.0)
    topk = teacher_topk(teacher_logits, k, torch.ones(vocab_size, dtype=torch.bool))
    mask = torch.ones_like(topk.ids, dtype=torch.bool)
    mask[::2, -1] = False  # slots emptied by merging duplicates
    target = MappedTarget(topk.ids, topk.logp.to(dtype), mask, topk.tail_logmass.to(dtype))
    return hidden, head, targets, kd_rows, target


def reference_sums(hidden, head, targets, kd_rows, target, temperature, divergence):
    """The same losses from the whole [N, V] logits at once."""
    logits = hidden @ head.T
    lm = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    student, teacher = support_atoms(logits[kd_rows], target, temperature)
    return lm, divergence(student, teacher).sum()


def test_chunked_cross_entropy_equals_unchunked_with_gradients():
    hidden, head, targets, *_ = problem(dtype=torch.float64)
    expected = F.cross_entropy(hidden @ head.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    expected_grads = torch.autograd.grad(expected, (hidden, head))
    for chunk_size in (1, 7, 1000):
        total, count = chunked_cross_entropy(hidden, head, targets, chunk_size=chunk_size)
        assert count == int((targets != IGNORE_INDEX).sum())
        torch.testing.assert_close(total, expected)
        for grad, expected_grad in zip(torch.autograd.grad(total, (hidden, head)), expected_grads):
            torch.testing.assert_close(grad, expected_grad)


def test_all_masked_batch_gives_zero_without_nan():
    hidden, head, targets, *_ = problem()
    total, count = chunked_cross_entropy(hidden, head, torch.full_like(targets, IGNORE_INDEX))
    assert count == 0 and total.item() == 0.0
    total.backward()
    assert hidden.grad is not None and not hidden.grad.any()


@pytest.mark.parametrize("kept_logit_bytes", [0, 2**30], ids=["recomputed", "kept"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_loss_equals_unchunked(name, kept_logit_bytes):
    hidden, head, targets, kd_rows, target = problem(dtype=torch.float64)
    divergence = get_divergence(name)
    temperature = 2.0
    lm_expected, kd_expected = reference_sums(hidden, head, targets, kd_rows, target, temperature, divergence)
    expected_grads = torch.autograd.grad(lm_expected + kd_expected, (hidden, head))
    for chunk_size in (1, 6, 1000):
        sums = chunked_lm_and_kd(hidden, head, targets, kd_rows, target, temperature, divergence,
                                 chunk_size=chunk_size, scale_by_t2=False, kept_logit_bytes=kept_logit_bytes)
        assert (sums.lm_count, sums.kd_count) == (int((targets != IGNORE_INDEX).sum()), len(kd_rows))
        torch.testing.assert_close(sums.lm_sum, lm_expected)
        torch.testing.assert_close(sums.kd_sum, kd_expected)
        grads = torch.autograd.grad(sums.lm_sum + sums.kd_sum, (hidden, head))
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_and_recomputed_chunks_give_identical_values_and_gradients(dtype):
    hidden, head, targets, kd_rows, target = problem(n_rows=60, vocab_size=30, dtype=dtype)
    # merge's groups: ids 20..23 pool into their roots 3 and 4, and leave the support.
    root_table = torch.arange(30)
    root_table[20:22], root_table[22:24] = 3, 4
    groups = StudentGroups.from_root_table(root_table)
    is_member = (target.ids >= 20) & (target.ids < 24)  # members are never on a support: their slots are masked
    target = MappedTarget(target.ids, target.logp, target.mask & ~is_member, target.tail_logmass)
    results = []
    for kept_logit_bytes in (0, 2**30):
        sums = chunked_lm_and_kd(hidden, head, targets, kd_rows, target, 2.0, "forward_kl", chunk_size=16,
                                 student_groups=groups, kept_logit_bytes=kept_logit_bytes)
        grads = torch.autograd.grad(sums.lm_sum + sums.kd_sum, (hidden, head))
        results.append((sums.lm_sum, sums.kd_sum, *grads))
    (lm_recomputed, kd_recomputed, hidden_grad_recomputed, head_grad_recomputed), kept = results
    assert torch.equal(lm_recomputed, kept[0]) and torch.equal(kd_recomputed, kept[1])
    assert torch.equal(hidden_grad_recomputed, kept[2])
    if dtype == torch.float32:
        assert torch.equal(head_grad_recomputed, kept[3])
    else:
        # A recomputed chunk rounds its head gradient to bf16 before the chunks' contributions are summed; the kept
        # chunks share one float32 head copy, so theirs is summed in float32 and rounded once: no further from exact.
        hidden64, head64 = (x.detach().double().requires_grad_() for x in (hidden, head))
        sums = chunked_lm_and_kd(hidden64, head64, targets, kd_rows, target, 2.0, "forward_kl", chunk_size=16,
                                 student_groups=groups)
        exact = torch.autograd.grad(sums.lm_sum + sums.kd_sum, head64)[0]
        error = {name: (grad.double() - exact).abs().max() for name, grad in
                 (("recomputed", head_grad_recomputed), ("kept", kept[3]))}
        assert error["kept"] <= error["recomputed"]


def test_the_byte_budget_decides_which_chunks_are_recomputed(monkeypatch):
    recomputed = []

    def counting_checkpoint(function, *arguments, **kwargs):
        recomputed.append(len(arguments[0]))  # the chunk's hidden rows
        return checkpoint(function, *arguments, **kwargs)

    monkeypatch.setattr(lm, "checkpoint", counting_checkpoint)
    hidden, head, targets, kd_rows, target = problem(n_rows=40, vocab_size=30)
    targets = torch.zeros_like(targets)  # every row is an LM row: chunks of 16, 16 and 8 rows
    chunk_bytes = 16 * 30 * 4
    for budget, expected in ((0, [16, 16, 8]), (chunk_bytes, [16, 8]), (2 * chunk_bytes + 8 * 30 * 4 - 1, [8]),
                             (2 * chunk_bytes + 8 * 30 * 4, [])):
        recomputed.clear()
        chunked_lm_and_kd(hidden, head, targets, kd_rows, target, 1.0, "forward_kl", chunk_size=16,
                          kept_logit_bytes=budget)
        assert recomputed == expected, budget
    # A 16-bit head's float32 copy, shared by the kept chunks, is paid from the budget first.
    head_copy_bytes = head.numel() * 4
    assert lm.kept_chunks([16, 16, 8], 30, head_copy_bytes + chunk_bytes, head_copy_bytes) == 1
    recomputed.clear()
    chunked_lm_and_kd(hidden, head.detach().bfloat16().requires_grad_(), targets, kd_rows, target, 1.0, "forward_kl",
                      chunk_size=16, kept_logit_bytes=chunk_bytes)
    assert recomputed == [16, 16, 8]


def test_temperature_squared_factor_is_optional():
    hidden, head, targets, kd_rows, target = problem()
    scaled = chunked_lm_and_kd(hidden, head, targets, kd_rows, target, 3.0, "forward_kl")
    raw = chunked_lm_and_kd(hidden, head, targets, kd_rows, target, 3.0, "forward_kl", scale_by_t2=False)
    torch.testing.assert_close(scaled.kd_sum, 9.0 * raw.kd_sum)
    torch.testing.assert_close(scaled.lm_sum, raw.lm_sum)


def test_kd_only_batch_and_mismatched_target_length():
    hidden, head, targets, kd_rows, target = problem()
    sums = chunked_lm_and_kd(hidden, head, torch.full_like(targets, IGNORE_INDEX), kd_rows, target, 1.0, "reverse_kl")
    assert sums.lm_count == 0 and sums.lm_sum.item() == 0.0 and sums.kd_sum.item() > 0
    with pytest.raises(ValueError, match="positions"):
        chunked_lm_and_kd(hidden, head, targets, kd_rows[:-1], target, 1.0, "forward_kl")


def test_gradcheck_fused_loss_float64():
    hidden, head, targets, kd_rows, target = problem(n_rows=9, hidden_size=3, vocab_size=7, k=3, dtype=torch.float64)
    kd_rows = torch.tensor([8, 1, 4])
    target = target.select(slice(0, 3))
    logp = target.logp.detach().requires_grad_()

    def fused(hidden, head, logp):
        with_logp = MappedTarget(target.ids, logp, target.mask, target.tail_logmass)
        sums = chunked_lm_and_kd(hidden, head, targets, kd_rows, with_logp, 1.5,
                                 get_divergence("generalized_jsd", beta=0.3), chunk_size=2)
        return sums.lm_sum + sums.kd_sum

    assert torch.autograd.gradcheck(fused, (hidden, head, logp))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_extreme_logits_stay_finite(dtype):
    hidden, head, targets, kd_rows, target = problem()
    # Hidden states and head that give logits of about +-1e4, stored in half precision.
    hidden = (torch.sign(hidden.detach()) * 100).to(dtype).requires_grad_()
    head = (torch.sign(head.detach()) * 12.5).to(dtype).requires_grad_()
    sums = chunked_lm_and_kd(hidden, head, targets, kd_rows, target, 2.0, "forward_kl")
    assert sums.lm_sum.dtype == torch.float32
    assert torch.isfinite(sums.lm_sum) and torch.isfinite(sums.kd_sum)
    (sums.lm_sum + sums.kd_sum).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.grad).all()


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes held by tensors that operators allocate while the mode is active (forward and backward).

    A storage is counted from the operator that creates it until it is freed (its Python object is preserved
    by torch for as long as the storage lives, so a weakref finaliser fires exactly on release).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self._seen and storage.nbytes():
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def peak_bytes_of_loss_and_backward(chunk_size: int, kept_logit_bytes: int = 0) -> int:
    n_rows, hidden_size, vocab_size = 1024, 16, 2048
    hidden = randn(n_rows, hidden_size, seed=20).requires_grad_()
    head = randn(vocab_size, hidden_size, seed=21).requires_grad_()
    targets = torch.randint(0, vocab_size, (n_rows,), generator=torch.Generator().manual_seed(22))
    kd_rows = torch.arange(0, n_rows, 2)
    topk = teacher_topk(randn(len(kd_rows), vocab_size, seed=23), 16, torch.ones(vocab_size, dtype=torch.bool))
    with PeakLiveBytes() as probe:
        sums = chunked_lm_and_kd(hidden, head, targets, kd_rows, topk.as_support(), 2.0, "forward_kl",
                                 chunk_size=chunk_size, kept_logit_bytes=kept_logit_bytes)
        (sums.lm_sum + sums.kd_sum).backward()
    return probe.peak


def test_peak_memory_is_bounded_by_the_chunk_not_the_batch():
    full_logits_bytes = 1024 * 2048 * 4
    chunk_logits_bytes = 64 * 2048 * 4
    # The probe sees the whole-batch logits when they exist (so the bound below can fail) ...
    assert peak_bytes_of_loss_and_backward(chunk_size=1024) > full_logits_bytes
    # ... and with chunks of 64 rows only a few [64, V] float32 buffers (log-softmax, the KD term's off-support copy,
    # their gradients) plus the small hidden/head gradients are alive at once, in forward and in backward: measured
    # ~6.3 (the KD rows come first, so a chunk is all KD rows), against 16 for the whole batch.
    assert peak_bytes_of_loss_and_backward(chunk_size=64) < 8 * chunk_logits_bytes
    # Chunks kept for the backward add their own buffer each, and no more.
    kept_peak = peak_bytes_of_loss_and_backward(chunk_size=64, kept_logit_bytes=4 * chunk_logits_bytes)
    assert 3.5 * chunk_logits_bytes < kept_peak - peak_bytes_of_loss_and_backward(chunk_size=64) < 5 * chunk_logits_bytes
