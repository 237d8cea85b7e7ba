"""The student's tail atom from one gather (`gather_with_off_mass`) against the masked log-sum-exp it replaced: the same
values and gradients to float rounding, for plain and grouped supports, including supports that hold almost all, all
but e^-60, or all of the student's mass."""

from __future__ import annotations

import math

import pytest
import torch

from crosskd.losses.divergences import forward_kl
from crosskd.losses.target import (
    MappedTarget,
    StudentGroups,
    gather_with_off_mass,
    logsumexp_or_neginf,
    pooled_with_members,
    row_flat_index,
    student_atoms,
    target_atoms,
    temper_atoms,
)

VOCAB = 300


def reference_student_atoms(logits, support_ids, support_mask, temperature, groups=None):
    """The atoms as computed before (commit f623a5f): a bool [P, V] support indicator, extended to the groups' members,
    and the tail as the log-sum-exp of the masked log-probabilities."""
    logp = logits.log_softmax(-1)
    support_logp = logp.gather(-1, support_ids)
    redirected = support_ids.masked_fill(~support_mask, logp.shape[-1])
    on_support = torch.zeros(len(logp), logp.shape[-1] + 1, dtype=torch.bool).scatter_(-1, redirected, True)
    on_support = on_support[:, :-1]
    if groups is not None:
        support_logp = pooled_with_members(support_logp, groups.member_mass_at(logp, support_ids))
        on_support = on_support.index_copy(1, groups.members, on_support[:, groups.roots])
    support_logp = support_logp.masked_fill(~support_mask, -math.inf)
    return temper_atoms(support_logp, logsumexp_or_neginf(logp.masked_fill(on_support, -math.inf)), temperature)


def make_groups() -> StudentGroups:
    root_table = torch.arange(VOCAB)
    generator = torch.Generator().manual_seed(5)
    members = torch.randperm(VOCAB - 20, generator=generator)[:60] + 20  # ids 0..19 are roots
    root_table[members] = torch.randint(20, (60,), generator=generator)
    return StudentGroups.from_root_table(root_table)


GROUPS = make_groups()


def hard_rows(dtype=torch.float32, groups: StudentGroups | None = None):
    """Logits and a support whose mass ranges from typical to all of it; masked slots carry id 0, which is also a
    real support id in some rows."""
    generator = torch.Generator().manual_seed(3)
    z = 3.0 * torch.randn(8, VOCAB, generator=generator, dtype=dtype)
    non_members = torch.arange(VOCAB) if groups is None else (groups.root_table == torch.arange(VOCAB)).nonzero()[:, 0]
    k = 16
    ids = torch.stack([non_members[torch.randperm(len(non_members), generator=generator)[:k]] for _ in range(8)])
    ids[1, 0] = 0  # rows 1 and 2 have id 0 both as a real slot and as masked padding
    ids[2, 0] = 0
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1:5, -3:] = False
    ids[1:5, -3:] = 0
    on = torch.zeros(8, VOCAB, dtype=torch.bool).scatter_(-1, torch.where(mask, ids, ids[:, :1]), True)
    if groups is not None:
        on = on.index_copy(1, groups.members, on[:, groups.roots])
    # Row 0: typical. Row 3: the support holds all but ~1e-6 of the mass. Row 4: all but ~e^-60 (below the direct
    # sum's floor). Row 5: all but ~1e-3. Row 6: only the support has finite logits, so the tail is -inf.
    z[3] = torch.where(on[3], z[3] + 18.0, z[3])
    z[4] = torch.where(on[4], z[4] + 75.0, z[4])
    z[5] = torch.where(on[5], z[5] + 9.0, z[5])
    z[6] = torch.where(on[6], z[6], -math.inf)
    return z, ids, mask


def full_coverage(dtype=torch.float32):
    """One row whose support is the whole vocabulary: the tail is -inf."""
    z = torch.randn(2, 40, generator=torch.Generator().manual_seed(4), dtype=dtype)
    ids = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    return z, ids, torch.ones_like(ids, dtype=torch.bool)


def loss_and_grad(atoms_fn, z, ids, mask, groups, temperature=2.0):
    z = z.clone().requires_grad_()
    student = atoms_fn(z, ids, mask, temperature, groups)
    teacher_logp = torch.randn(ids.shape, generator=torch.Generator().manual_seed(9)).to(z.dtype).log_softmax(-1)
    target = MappedTarget(ids, teacher_logp - 0.1, mask, torch.full((len(ids),), math.log(1 - math.exp(-0.1)),
                                                                      dtype=z.dtype))
    loss = forward_kl(student, target_atoms(target, temperature))
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return student.detach(), loss.detach(), grad


@pytest.mark.parametrize("grouped", [False, True])
def test_new_tail_equals_the_masked_logsumexp_in_value_and_gradient(grouped):
    groups = GROUPS if grouped else None
    z, ids, mask = hard_rows(groups=groups)
    new_atoms, new_loss, new_grad = loss_and_grad(student_atoms, z, ids, mask, groups)
    old_atoms, old_loss, old_grad = loss_and_grad(reference_student_atoms, z, ids, mask, groups)
    assert torch.isneginf(new_atoms[6, -1]) and torch.isneginf(old_atoms[6, -1])
    # Row 4's tail, below the direct sum's floor, is still finite and right (summed in log space).
    tails = student_atoms(z, ids, mask, 1.0, groups)[:, -1]
    assert -75 < float(tails[4]) < -50
    torch.testing.assert_close(tails, reference_student_atoms(z, ids, mask, 1.0, groups)[:, -1], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(new_atoms, old_atoms, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(new_loss, old_loss, rtol=2e-6, atol=1e-6)
    assert torch.isfinite(new_grad).all()
    torch.testing.assert_close(new_grad, old_grad, rtol=1e-5, atol=1e-7)
    # And both against float64: the new path is no further from it than float rounding.
    _, exact_loss, exact_grad = loss_and_grad(reference_student_atoms, z.double(), ids, mask, groups)
    finite = torch.isfinite(exact_loss)
    torch.testing.assert_close(new_loss.double()[finite], exact_loss[finite], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_grad.double().nan_to_num(), exact_grad.nan_to_num(), rtol=1e-4, atol=1e-6)


def test_support_covering_the_whole_vocabulary_has_a_neginf_tail_and_finite_gradients():
    z, ids, mask = full_coverage()
    new_atoms, new_loss, new_grad = loss_and_grad(student_atoms, z, ids, mask, None)
    old_atoms, old_loss, old_grad = loss_and_grad(reference_student_atoms, z, ids, mask, None)
    assert torch.isneginf(new_atoms[:, -1]).all()
    torch.testing.assert_close(new_atoms, old_atoms)
    assert torch.isfinite(new_grad).all()
    torch.testing.assert_close(new_grad, old_grad)


def test_gradcheck_gather_with_off_mass_on_every_kind_of_row():
    z, ids, mask = hard_rows(torch.float64)
    z = z[[0, 1, 3, 4, 5]].log_softmax(-1).detach()
    ids, mask = ids[[0, 1, 3, 4, 5]], mask[[0, 1, 3, 4, 5]]
    flat = row_flat_index(ids, VOCAB)

    def both(logp):
        gathered, log_off = gather_with_off_mass(logp, flat, mask)
        return gathered, log_off

    assert torch.autograd.gradcheck(both, (z.requires_grad_(),))


def test_off_mass_is_the_sum_off_the_support_and_masked_slots_stay_in_it():
    logp = torch.randn(3, 10, dtype=torch.float64).log_softmax(-1)
    ids = torch.tensor([[0, 4, 0], [1, 2, 3], [5, 0, 9]])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, False, True]])
    gathered, log_off = gather_with_off_mass(logp, row_flat_index(ids, 10), mask)
    torch.testing.assert_close(gathered, logp.gather(-1, ids))
    p = logp.exp()
    expected = torch.stack([1 - p[0, [0, 4]].sum(), 1 - p[1, 1], 1 - p[2, [5, 9]].sum()]).log()
    torch.testing.assert_close(log_off, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_half_precision_logits_are_upcast_and_stay_finite(dtype):
    z, ids, mask = hard_rows(groups=GROUPS)
    z = z[[0, 3, 5]].to(dtype).requires_grad_()
    atoms = student_atoms(z, ids[[0, 3, 5]], mask[[0, 3, 5]], 2.0, GROUPS)
    real = torch.cat([mask[[0, 3, 5]], torch.ones(3, 1, dtype=torch.bool)], dim=-1)
    assert atoms.dtype == torch.float32 and torch.isfinite(atoms[real]).all() and torch.isneginf(atoms[~real]).all()
    (grad,) = torch.autograd.grad(atoms.exp()[:, -1].sum() + atoms[:, 0].sum(), z)
    assert torch.isfinite(grad).all()
    reference = reference_student_atoms(z.float(), ids[[0, 3, 5]], mask[[0, 3, 5]], 2.0, GROUPS)
    torch.testing.assert_close(atoms, reference, rtol=2e-6, atol=1e-6)
