"""The top-k + tail target and the student's atoms: definition, masking, chunking, numerics, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crosskd.losses.divergences import DIVERGENCES, get_divergence
from crosskd.losses.target import (
    MappedTarget,
    StudentGroups,
    TopKTarget,
    select_positions,
    student_atoms,
    target_atoms,
    teacher_topk,
)


def logits(*shape: int, seed: int, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def all_valid(vocab_size: int) -> torch.Tensor:
    return torch.ones(vocab_size, dtype=torch.bool)


def test_topk_is_the_largest_probabilities_and_tail_is_the_rest():
    z = logits(10, 50, seed=0, dtype=torch.float64)
    target = teacher_topk(z, k=7, valid_mask=all_valid(50))
    p = z.softmax(-1)
    top = p.topk(7)
    torch.testing.assert_close(target.ids, top.indices)
    torch.testing.assert_close(target.logp, top.values.log())
    torch.testing.assert_close(target.tail_logmass, (1 - top.values.sum(-1)).log())


def test_padded_ids_never_enter_the_topk_and_get_no_mass():
    vocab_size, padded = 40, torch.tensor([3, 17, 39])
    z = logits(8, vocab_size, seed=1)
    z[:, padded] = 50.0  # the raw top-k would be exactly the padded ids
    valid = all_valid(vocab_size)
    valid[padded] = False
    target = teacher_topk(z, k=5, valid_mask=valid)
    assert not torch.isin(target.ids, padded).any()
    # The mass is renormalised over valid ids only: top-k plus tail is the whole distribution.
    total = torch.cat([target.logp, target.tail_logmass[:, None]], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(8), atol=1e-6, rtol=0)
    expected = z[:, valid].log_softmax(-1).topk(5).values
    torch.testing.assert_close(target.logp, expected)


def test_tail_is_exact_when_topk_holds_almost_all_mass():
    z = torch.tensor([[30.0, 0.0, 0.0, 0.0]])  # rest mass ~ 3 * e^-30: 1 - sum(top-1) is 0 in float32
    target = teacher_topk(z, k=1, valid_mask=all_valid(4))
    assert target.tail_logmass.item() == pytest.approx(math.log(3) - 30, abs=1e-4)


def test_k_equal_to_the_valid_vocabulary_gives_empty_tail_and_finite_gradients():
    z = logits(4, 6, seed=2, dtype=torch.float64).requires_grad_()
    valid = torch.tensor([True, True, False, True, True, True])
    target = teacher_topk(z, k=5, valid_mask=valid)
    assert torch.isneginf(target.tail_logmass).all()
    target_atoms(target, 2.0).exp().mul(torch.arange(6.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_k_outside_the_valid_vocabulary_is_rejected():
    valid = all_valid(10)
    valid[:5] = False
    with pytest.raises(ValueError, match="number of valid teacher ids"):
        teacher_topk(logits(2, 10, seed=3), k=6, valid_mask=valid)
    with pytest.raises(ValueError, match="bool"):
        teacher_topk(logits(2, 10, seed=3), k=2, valid_mask=torch.ones(9, dtype=torch.bool))


def test_chunked_topk_equals_unchunked():
    z = logits(37, 64, seed=4)
    whole = teacher_topk(z, k=9, valid_mask=all_valid(64), chunk_size=1000)
    for chunk_size in (1, 5, 36):
        chunked = teacher_topk(z, k=9, valid_mask=all_valid(64), chunk_size=chunk_size)
        torch.testing.assert_close(chunked.ids, whole.ids)
        torch.testing.assert_close(chunked.logp, whole.logp)
        torch.testing.assert_close(chunked.tail_logmass, whole.tail_logmass)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_topk_never_builds_more_than_one_chunk_of_probabilities(chunk_size):
    n_positions, vocab_size = 256, 2000
    z = logits(n_positions, vocab_size, seed=5, dtype=torch.bfloat16)
    with LargestTensor() as probe:
        teacher_topk(z, k=16, valid_mask=all_valid(vocab_size), chunk_size=chunk_size)
    # One spare column at most (none here); the whole [P, V] float32 tensor would be 32x-4x larger.
    assert probe.largest <= chunk_size * vocab_size


def test_target_atoms_at_temperature_one_are_the_stored_atoms():
    target = teacher_topk(logits(5, 30, seed=6), k=4, valid_mask=all_valid(30))
    expected = torch.cat([target.logp, target.tail_logmass[:, None]], -1)
    torch.testing.assert_close(target_atoms(target, 1.0), expected)
    hot = target_atoms(target, 3.0)
    torch.testing.assert_close(hot, (expected / 3.0).log_softmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        target_atoms(target, 0.0)


def test_student_atoms_are_its_support_probabilities_and_remaining_mass():
    z = logits(6, 25, seed=7, dtype=torch.float64)
    ids = torch.tensor([[0, 5, 9]] * 6)
    mask = torch.tensor([[True, True, False]] * 6)
    atoms = student_atoms(z, ids, mask, temperature=1.0)
    p = z.softmax(-1)
    torch.testing.assert_close(atoms[:, :2], p[:, [0, 5]].log())
    assert torch.isneginf(atoms[:, 2]).all()
    torch.testing.assert_close(atoms[:, 3], (1 - p[:, [0, 5]].sum(-1)).log())
    # At another temperature the same atoms are tempered like the teacher's.
    tempered = student_atoms(z, ids, mask, temperature=2.0)
    torch.testing.assert_close(tempered, (atoms / 2.0).log_softmax(-1))


def test_masked_slot_sharing_an_id_with_a_real_slot_keeps_that_id_out_of_the_tail_once():
    """A padded slot usually carries id 0; id 0 may also be a real support token, or not on the support at all."""
    z = logits(3, 12, seed=8, dtype=torch.float64)
    p = z.softmax(-1)
    ids, mask = torch.tensor([[0, 4, 0]] * 3), torch.tensor([[True, True, False]] * 3)
    padded_with_real_zero = student_atoms(z, ids, mask, 1.0)
    torch.testing.assert_close(padded_with_real_zero[:, 3].exp(), 1 - p[:, [0, 4]].sum(-1))
    padded_only = student_atoms(z, torch.tensor([[4, 0]] * 3), torch.tensor([[True, False]] * 3), 1.0)
    torch.testing.assert_close(padded_only[:, 2].exp(), 1 - p[:, 4])


def test_repeated_support_ids_are_rejected():
    with pytest.raises(ValueError, match="repeat"):
        student_atoms(logits(1, 8, seed=9), torch.tensor([[2, 2]]), torch.ones(1, 2, dtype=torch.bool), 1.0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_identical_teacher_and_student_give_zero_at_every_temperature(name, temperature):
    z = logits(12, 80, seed=10)
    target = teacher_topk(z, k=8, valid_mask=all_valid(80)).as_support()
    student = student_atoms(z, target.ids, target.mask, temperature)
    value = get_divergence(name)(student, target_atoms(target, temperature))
    torch.testing.assert_close(value, torch.zeros(12), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_extreme_half_precision_logits_stay_finite(name, dtype):
    vocab_size = 64
    signs = torch.randint(0, 2, (16, vocab_size), generator=torch.Generator().manual_seed(11)) * 2 - 1
    teacher_z = (1e4 * signs).to(dtype)
    student_z = (-1e4 * signs.roll(3, dims=-1)).to(dtype).requires_grad_()
    target = teacher_topk(teacher_z, k=8, valid_mask=all_valid(vocab_size)).as_support()
    for temperature in (1.0, 2.0):
        value = get_divergence(name)(
            student_atoms(student_z, target.ids, target.mask, temperature), target_atoms(target, temperature)
        )
        assert torch.isfinite(value).all() and (value >= 0).all()
        (grad,) = torch.autograd.grad(value.sum(), student_z)
        assert torch.isfinite(grad).all()


def test_gradcheck_teacher_topk():
    z = logits(3, 9, seed=12, dtype=torch.float64).requires_grad_()
    valid = all_valid(9)
    valid[4] = False

    def atoms(z):
        target = teacher_topk(z, k=3, valid_mask=valid, chunk_size=2)
        return target_atoms(target, 1.5)

    assert torch.autograd.gradcheck(atoms, (z,))


def test_gradcheck_student_atoms_and_target_atoms():
    z = logits(4, 11, seed=13, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[1, 7, 3, 0]] * 4)
    mask = torch.tensor([[True, True, False, True]] * 4)
    # Probabilities rather than log-probabilities: finite differences of a -inf (masked) output are NaN.
    assert torch.autograd.gradcheck(lambda z: student_atoms(z, ids, mask, 2.0).exp(), (z,))

    logp = logits(4, 4, seed=14, dtype=torch.float64).log_softmax(-1).sub(0.3).requires_grad_()
    tail = torch.full((4,), math.log(1 - math.exp(-0.3)), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda logp, tail: target_atoms(MappedTarget(ids, logp, mask, tail), 2.0).exp(), (logp, tail)
    )


def test_select_positions_indexes_every_field():
    target = teacher_topk(logits(6, 20, seed=15), k=3, valid_mask=all_valid(20))
    picked = select_positions(target, torch.tensor([4, 1]))
    assert isinstance(picked, TopKTarget)
    torch.testing.assert_close(picked.ids, target.ids[[4, 1]])
    torch.testing.assert_close(picked.tail_logmass, target.tail_logmass[[4, 1]])
    mapped = select_positions(target.as_support(), slice(2, 4))
    assert isinstance(mapped, MappedTarget) and mapped.mask.shape == (2, 3)


# --- student token groups (mismatch_policy 'merge') ---------------------------------------------------------------

GROUPS_VOCAB = 12
# 5 and 6 pool into 2 (as '\n    ' and '\n        ' into '\n'), 9 into 4.
GROUPS = StudentGroups.from_root_table(torch.tensor([0, 1, 2, 3, 4, 2, 2, 7, 8, 4, 10, 11]))


def test_grouped_atoms_pool_each_roots_members_and_leave_the_tail():
    z = logits(3, GROUPS_VOCAB, seed=21, dtype=torch.float64)
    ids = torch.tensor([[2, 7, 0]] * 3)
    mask = torch.tensor([[True, True, False]] * 3)
    atoms = student_atoms(z, ids, mask, 1.0, GROUPS).exp()
    p = z.softmax(-1)
    torch.testing.assert_close(atoms[:, 0], p[:, [2, 5, 6]].sum(-1))
    torch.testing.assert_close(atoms[:, 1], p[:, 7])
    assert (atoms[:, 2] == 0).all()
    # 4 is not on the support, so its member 9 stays in the tail with it.
    torch.testing.assert_close(atoms[:, 3], 1 - p[:, [2, 5, 6, 7]].sum(-1))
    torch.testing.assert_close(atoms.sum(-1), torch.ones(3, dtype=torch.float64))


def test_grouped_atoms_are_zero_divergence_against_the_grouped_student_and_have_finite_gradients():
    z = logits(4, GROUPS_VOCAB, seed=22, dtype=torch.float64).requires_grad_(True)
    ids, mask = torch.tensor([[2, 4, 7]] * 4), torch.ones(4, 3, dtype=torch.bool)
    student = student_atoms(z, ids, mask, 2.0, GROUPS)
    teacher_logp = student_atoms(z.detach(), ids, mask, 1.0, GROUPS)
    target = MappedTarget(ids, teacher_logp[:, :3], mask, teacher_logp[:, 3])
    kl = get_divergence("forward_kl")(student, target_atoms(target, 2.0))
    torch.testing.assert_close(kl, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    # Members with negligible probability (exp underflows to 0) must not turn the backward into NaN.
    z_far = z.detach().clone()
    z_far[:, [5, 6, 9]] = -1e4
    z_far.requires_grad_(True)
    student_atoms(z_far, ids, mask, 1.0, GROUPS).sum().backward()
    assert torch.isfinite(z_far.grad).all()
    assert torch.autograd.gradcheck(lambda x: student_atoms(x, ids, mask, 1.5, GROUPS).exp(), (z,))


def test_root_of_maps_members_and_passes_unmapped_through():
    ids = torch.tensor([[5, 9, 3, -1]])
    assert GROUPS.root_of(ids).tolist() == [[2, 4, 3, -1]]
