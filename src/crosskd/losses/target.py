"""The distillation target: the teacher's top-k plus one tail atom, and the student's matching atoms.

The definition (docs/OBJECTIVE.md has the full text and the reasons):

1. The teacher's log-probabilities are computed at tau = 1 with invalid ids (padding rows of the embedding,
   special tokens the caller excludes) masked out *before* the softmax, so they get no probability and can
   never enter the top-k. The top-k ids, their log-probabilities and the log of the remaining mass
   ``log m`` are the target; this is what a cache stores.
2. Any temperature is applied afterwards to the K + 1 atoms: ``log_softmax([logp, log m] / tau)``.
3. The student is reduced to the same atoms the same way: its tau = 1 log-probabilities at the support ids
   plus the log of its own remaining mass, then ``log_softmax(atoms / tau)``. Identical models therefore
   give identical atoms, hence zero divergence, at every temperature.

The support lives in the student's vocabulary. When teacher and student share a tokenizer the teacher's
top-k is the support directly (:meth:`TopKTarget.as_support`); otherwise a vocabulary-transfer strategy
maps it to a :class:`MappedTarget`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from crosskd.losses.chunking import DEFAULT_CHUNK_ROWS, chunk_slices, upcast

DEFAULT_TOP_K = 256


@dataclass(frozen=True)
class MappedTarget:
    """A teacher distribution on a support of student ids, plus a tail atom.

    ids: int64 [P, K'] student ids (teacher ids for `student-projection`, which compares in the teacher's
    vocabulary); unique among the slots where ``mask`` is True.
    logp: float [P, K'] teacher log-probabilities (tau = 1) of those ids; ignored where ``mask`` is False.
    mask: bool [P, K'] which slots are real; False slots (padding after merging duplicates) are no atom.
    tail_logmass: float [P] log of the teacher mass outside the support; -inf if there is none.
    """

    ids: Tensor
    logp: Tensor
    mask: Tensor
    tail_logmass: Tensor

    def select(self, index: Tensor | slice) -> MappedTarget:
        """The target at the positions ``index``."""
        return select_positions(self, index)


@dataclass(frozen=True)
class TopKTarget:
    """The teacher's top-k at tau = 1 in the teacher's own vocabulary.

    ids: int64 [P, K] teacher ids, by decreasing probability.
    logp: float32 [P, K] their log-probabilities at tau = 1.
    tail_logmass: float32 [P] log of the mass outside the top-k; -inf if there is none.
    """

    ids: Tensor
    logp: Tensor
    tail_logmass: Tensor

    def select(self, index: Tensor | slice) -> TopKTarget:
        """The target at the positions ``index``."""
        return select_positions(self, index)

    @staticmethod
    def concatenate(parts: list[TopKTarget]) -> TopKTarget:
        """The positions of several top-k targets (chunks of one batch, in order) as one target."""
        return TopKTarget(*(torch.cat(field) for field in zip(*((t.ids, t.logp, t.tail_logmass) for t in parts))))

    def as_support(self) -> MappedTarget:
        """The same target as a support for a student that shares the teacher's vocabulary."""
        return MappedTarget(self.ids, self.logp, torch.ones_like(self.ids, dtype=torch.bool), self.tail_logmass)


Target = TypeVar("Target", TopKTarget, MappedTarget)


def select_positions(target: Target, index: Tensor | slice) -> Target:
    """The target restricted to the positions ``index`` (every field is indexed along its first dim)."""
    return dataclasses.replace(
        target, **{field.name: getattr(target, field.name)[index] for field in dataclasses.fields(target)}
    )


def logsumexp_or_neginf(x: Tensor) -> Tensor:
    """logsumexp over the last dim, -inf for rows that are all -inf, with a finite gradient everywhere.

    Plain logsumexp already returns -inf for such rows, but its backward computes exp(-inf - (-inf)) = NaN, so when
    there are any, they are masked first. Rows like that are rare (a support covering the whole vocabulary), and
    checking the result first spares two passes over [P, V] in the common case.
    """
    result = x.logsumexp(-1)
    empty_rows = torch.isneginf(result)
    if not empty_rows.any():
        return result
    empty_rows = empty_rows.unsqueeze(-1)
    return x.masked_fill(empty_rows, 0.0).logsumexp(-1).masked_fill(empty_rows.squeeze(-1), -math.inf)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, accurate at both ends (-inf at x = 0).

    Each branch reads its input clamped to the side where it is used: torch.where's backward multiplies the unused
    branch's gradient by 0, and an infinite gradient there (log1p(-e^x) at x = 0) would make that NaN.
    """
    near_zero = x > -math.log(2)
    return torch.where(near_zero, torch.log(-torch.expm1(x.clamp_min(-math.log(2)))),
                       torch.log1p(-torch.exp(x.clamp_max(-math.log(2)))))


def _masked_logits(logits: Tensor, invalid: Tensor) -> tuple[Tensor, Tensor]:
    """float32 logits [P, V] with the padded ids at -inf, and their log-normaliser [P]: what both the top-k and the
    observed-token log-probability subtract from, computed once per chunk."""
    masked = upcast(logits).masked_fill(invalid, -math.inf)
    return masked, masked.logsumexp(-1)


def _topk_of_chunk(masked: Tensor, log_normaliser: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    # The top-k of the logits is the top-k of the log-probabilities, so no [P, V] log_softmax is written: only the
    # normaliser (a reduction) is subtracted from the k kept values.
    top_logits, top_ids = masked.topk(k, dim=-1)
    # Summing the rest in log space keeps log m exact when the top-k holds almost all the mass,
    # where log(1 - sum(top-k)) would cancel catastrophically.
    rest = logsumexp_or_neginf(masked.scatter(-1, top_ids, -math.inf))
    return top_ids, top_logits - log_normaliser.unsqueeze(-1), rest - log_normaliser


def _invalid_ids(vocab_size: int, k: int, valid_mask: Tensor, device) -> Tensor:
    """The padded ids as a bool [V] on `device`, after checking the mask and k against the vocabulary."""
    if valid_mask.shape != (vocab_size,) or valid_mask.dtype != torch.bool:
        raise ValueError(f"valid_mask must be bool [{vocab_size}], got {valid_mask.dtype} {list(valid_mask.shape)}")
    n_valid = int(valid_mask.sum())
    if not 1 <= k <= n_valid:
        raise ValueError(f"k={k} must be between 1 and the number of valid teacher ids ({n_valid})")
    return ~valid_mask.to(device)


def teacher_topk(
    teacher_logits: Tensor, k: int, valid_mask: Tensor, chunk_size: int = DEFAULT_CHUNK_ROWS
) -> TopKTarget:
    """The teacher's top-k target from logits [P, V], one chunk of positions at a time.

    ``valid_mask`` (bool [V]) says which teacher ids are real tokens; the others are masked before the
    softmax. Differentiable, although the teacher is normally run without gradients.
    """
    invalid = _invalid_ids(teacher_logits.shape[-1], k, valid_mask, teacher_logits.device)
    row_chunks = list(chunk_slices(len(teacher_logits), chunk_size)) or [slice(0, 0)]
    return TopKTarget.concatenate([TopKTarget(*_topk_of_chunk(*_masked_logits(teacher_logits[rows], invalid), k))
                                   for rows in row_chunks])


def observed_logp_and_topk(teacher_logits: Tensor, next_ids: Tensor, valid_mask: Tensor, k: int,
                           topk_rows: Tensor | None) -> tuple[Tensor, TopKTarget | None]:
    """From one chunk of logits [P, V]: log p(next_ids) at tau = 1 (float32 [P], a gather less the normaliser, no
    [P, V] log_softmax written) and, when `topk_rows` are given, the top-k target of those rows, with padded ids
    masked out of the normaliser once for both."""
    invalid = _invalid_ids(teacher_logits.shape[-1], k, valid_mask, teacher_logits.device)
    masked, log_normaliser = _masked_logits(teacher_logits, invalid)
    observed = masked.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - log_normaliser
    if topk_rows is None:
        return observed, None
    return observed, TopKTarget(*_topk_of_chunk(masked[topk_rows], log_normaliser[topk_rows], k))


def temper_atoms(support_logp: Tensor, tail_logmass: Tensor, temperature: float) -> Tensor:
    """log_softmax([support_logp, tail_logmass] / temperature): [P, K] and [P] -> [P, K + 1]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.cat([support_logp, tail_logmass.unsqueeze(-1)], dim=-1).div(temperature).log_softmax(-1)


def target_atoms(target: TopKTarget | MappedTarget, temperature: float) -> Tensor:
    """The teacher's K + 1 atoms at ``temperature`` (log-probabilities; masked slots are -inf)."""
    logp = upcast(target.logp)
    if isinstance(target, MappedTarget):
        logp = logp.masked_fill(~target.mask, -math.inf)
    return temper_atoms(logp, upcast(target.tail_logmass), temperature)


def _require_unique_support(support_ids: Tensor, support_mask: Tensor) -> None:
    # A repeated id would be counted twice and the atoms would no longer sum to 1.
    ordered = support_ids.masked_fill(~support_mask, -1).sort(-1).values
    if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
        raise ValueError("support ids repeat within a position; merge duplicates (scatter-add) before distilling")


#: Below this off-support mass (e^-50) the direct sum of probabilities is not trusted: terms below float32's smallest
#: normal number (1.2e-38) may be flushed to 0, at most V * 1.2e-38 ~ 6e-34 in all, which relative to e^-50 ~ 2e-22 is
#: 3e-12, far below float rounding; rows under it (a support holding all but e^-50 of the mass, or all of it) are
#: summed in log space instead.
_DIRECT_SUM_FLOOR = -50.0


#: Rows of exp(logp) materialised at a time when summing the mass off the support: a few MB, which the allocator
#: reuses from block to block, where one [P, V] buffer per chunk would be fresh memory (page faults on the CPU).
_OFF_MASS_BLOCK_ROWS = 32


def _off_support_log_mass(logp: Tensor, on_index: Tensor) -> Tensor:
    """log of each row's probability outside the flat entries `on_index` of logp [P, V] (no gradient)."""
    vocab_size = logp.shape[-1]
    on_index = on_index.sort().values
    starts = torch.arange(0, len(logp) + _OFF_MASS_BLOCK_ROWS, _OFF_MASS_BLOCK_ROWS, device=logp.device)
    bounds = torch.searchsorted(on_index, starts.clamp_max(len(logp)) * vocab_size).tolist()
    log_mass = logp.new_empty(len(logp))
    for block, start in enumerate(range(0, len(logp), _OFF_MASS_BLOCK_ROWS)):
        rows = slice(start, start + _OFF_MASS_BLOCK_ROWS)
        mass = logp[rows].exp()
        mass.view(-1).index_fill_(0, on_index[bounds[block]:bounds[block + 1]] - start * vocab_size, 0.0)
        log_mass[rows] = mass.sum(-1).log()
    low = log_mass < _DIRECT_SUM_FLOOR
    if low.any():
        rows = low.nonzero().squeeze(-1)
        off = torch.ones_like(logp, dtype=torch.bool)
        off.view(-1).index_fill_(0, on_index, False)
        log_mass[rows] = logsumexp_or_neginf(logp[rows].masked_fill(~off[rows], -math.inf))
    return log_mass


class _GatherWithOffMass(torch.autograd.Function):
    """(logp.view(-1)[flat_index], log of each row's mass off the support) with one [P, V] gradient buffer."""

    @staticmethod
    def forward(ctx, logp: Tensor, flat_index: Tensor, on_index: Tensor):
        gathered = logp.reshape(-1)[flat_index]
        log_off = _off_support_log_mass(logp, on_index)
        ctx.save_for_backward(logp, flat_index, on_index, log_off)
        return gathered, log_off

    @staticmethod
    def backward(ctx, grad_gathered: Tensor | None, grad_log_off: Tensor | None):
        logp, flat_index, on_index, log_off = ctx.saved_tensors
        if grad_log_off is None:
            grad = torch.zeros_like(logp)
        else:
            # d log(sum_off p_j) / d logp_j = p_j / off mass, off the support only: exp(logp) times one factor per
            # row where the mass was summed directly (at least e^-50, so the factor stays finite), exp(logp - log
            # mass) in the rare rows below. A row with no mass off the support (its tail is -inf) gets none, as
            # logsumexp_or_neginf gives it.
            direct = log_off >= _DIRECT_SUM_FLOOR
            factor = (grad_log_off * torch.exp(-log_off)).masked_fill(~direct, 0.0)
            grad = logp.exp().mul_(factor.unsqueeze(-1))
            low = ~direct & ~torch.isneginf(log_off)
            if low.any():
                rows = low.nonzero().squeeze(-1)
                grad[rows] = (logp[rows] - log_off[rows].unsqueeze(-1)).exp() * grad_log_off[rows].unsqueeze(-1)
            # Assigned, not multiplied: p_j / off mass may overflow to inf on the support.
            grad.view(-1).index_fill_(0, on_index, 0.0)
        if grad_gathered is not None:
            grad.view(-1).index_add_(0, flat_index.reshape(-1), grad_gathered.reshape(-1))
        return grad, None, None


def gather_with_off_mass(logp: Tensor, flat_index: Tensor, on_support: Tensor) -> tuple[Tensor, Tensor]:
    """The entries ``flat_index`` (any shape, into logp [P, V] flattened row-major) of the float log-probabilities
    ``logp``, and the log of each row's probability outside the entries where ``on_support`` (bool, flat_index's shape;
    other entries are only read): [P], -inf where nothing is left.

    The mass outside the support is summed directly, p_j over the off-support entries (with the support's entries set
    to 0 in a copy of exp(logp), no [P, V] indicator), never as 1 minus the support, so it stays exact when the support
    holds nearly all the mass; rows where it is below e^-50 are summed in log space like `logsumexp_or_neginf`. The
    backward writes both gradients into one [P, V] buffer (no per-gather zeros and adds)."""
    logp = logp.contiguous()
    on_index = flat_index[on_support]
    return _GatherWithOffMass.apply(logp, flat_index, on_index)


def row_flat_index(columns: Tensor, vocab_size: int) -> Tensor:
    """int64 [P, C] column ids -> the same entries as flat indices into a row-major [P, vocab_size] tensor."""
    rows = torch.arange(len(columns), device=columns.device).unsqueeze(-1)
    return rows * vocab_size + columns


@dataclass(frozen=True)
class StudentGroups:
    """Student tokens pooled into one atom with another student token (the group's root).

    root_table: int64 [V] each student id's root (itself for a root); members: int64 [M] the ids whose root is
    another token; roots: int64 [M] their roots (never members themselves). A group is an event both tokenisers can
    express: see `crosskd.vocab.first_token.build_group_roots`. A root's atom holds the probability of the root and
    of all its members; members are never on a support. `member_slot` [M] numbers each member's root among the
    distinct roots, and `root_slot` [V] gives every id its root number (the spare last number for ids that are no
    root), so the per-chunk pooling is an index_add and a gather.
    """

    root_table: Tensor
    members: Tensor
    roots: Tensor
    member_slot: Tensor
    root_slot: Tensor
    spare_slot: int  # the number of distinct roots: the slot of ids that are no root

    @classmethod
    def from_root_table(cls, root_table: Tensor) -> StudentGroups:
        members = (root_table != torch.arange(len(root_table), device=root_table.device)).nonzero().squeeze(-1)
        roots = root_table[members]
        distinct_roots, member_slot = roots.unique(return_inverse=True)
        root_slot = torch.full_like(root_table, len(distinct_roots))
        root_slot[distinct_roots] = torch.arange(len(distinct_roots), device=root_table.device)
        return cls(root_table, members, roots, member_slot, root_slot, len(distinct_roots))

    def to(self, device) -> StudentGroups:
        return StudentGroups(*(field.to(device) for field in (self.root_table, self.members, self.roots,
                                                               self.member_slot, self.root_slot)), self.spare_slot)

    def root_of(self, ids: Tensor) -> Tensor:
        """Each id's group root; negative ids (unmapped) pass through."""
        return torch.where(ids >= 0, self.root_table.to(ids.device)[ids.clamp_min(0)], ids)

    def member_mass_at(self, logp: Tensor, support_ids: Tensor, excluded_ids: Tensor | None = None) -> Tensor:
        """The probability the members of each support id's group carry: [P, V] log-probabilities and [P, K] ids
        -> [P, K] (0 where a support id has no members). `excluded_ids` [P]: one id per position whose mass is left
        out (the observed member of the chain-rule split)."""
        member_probs = logp[:, self.members].exp()
        if excluded_ids is not None:
            member_probs = member_probs.masked_fill(self.members == excluded_ids.unsqueeze(-1), 0.0)
        root_probs = member_probs.new_zeros(len(logp), self.spare_slot + 1).index_add_(1, self.member_slot,
                                                                                      member_probs)
        # Support ids that are no root read the spare last column, which stays 0.
        return root_probs.gather(-1, self.root_slot[support_ids])

    def member_mass_from(self, member_logp: Tensor, member_rows: Tensor, member_index: Tensor,
                         support_ids: Tensor) -> Tensor:
        """`member_mass_at` from the log-probabilities [n] of some (position `member_rows`, member `member_index`
        into `members`) pairs, already gathered: those of the members whose root is on the position's support
        (`members_on_support`) are all that is read."""
        root_probs = member_logp.new_zeros(len(support_ids), self.spare_slot + 1)
        root_probs.index_put_((member_rows, self.member_slot[member_index]), member_logp.exp(), accumulate=True)
        # Support ids that are no root read the spare last column, which stays 0.
        return root_probs.gather(-1, self.root_slot[support_ids])

    def members_on_support(self, support_ids: Tensor, support_mask: Tensor) -> Tensor:
        """bool [P, M]: which members' roots are on each position's support (masked slots are no support)."""
        slots = self.root_slot[support_ids].masked_fill(~support_mask, self.spare_slot)
        root_on = torch.zeros(len(support_ids), self.spare_slot + 1, dtype=torch.bool, device=support_ids.device)
        root_on.scatter_(-1, slots, True)[:, self.spare_slot] = False
        return root_on[:, self.member_slot]


def pooled_with_members(root_logp: Tensor, member_mass: Tensor) -> Tensor:
    """log(p_root + member mass): a group's pooled log-probability from its root's and its members' probability."""
    # Only where there is member mass: log(0) would put 0 * inf = NaN into the backward of logaddexp.
    has_members = member_mass > 0
    pooled = torch.logaddexp(root_logp, member_mass.clamp_min(torch.finfo(root_logp.dtype).tiny).log())
    return torch.where(has_members, pooled, root_logp)


def support_atoms(student_logits: Tensor, target: MappedTarget, temperature: float,
                  groups: StudentGroups | None = None, normalized: bool = False) -> tuple[Tensor, Tensor]:
    """(student atoms, teacher atoms) on the target's support at ``temperature``: what a divergence compares."""
    return (student_atoms(student_logits, target.ids, target.mask, temperature, groups, normalized),
            target_atoms(target, temperature))


def student_atoms(student_logits: Tensor, support_ids: Tensor, support_mask: Tensor, temperature: float,
                  groups: StudentGroups | None = None, normalized: bool = False) -> Tensor:
    """The student's K' + 1 atoms at ``temperature`` on a support of student ids: [P, Vs] -> [P, K' + 1].

    Its tau = 1 log-probabilities over the full vocabulary, gathered at the support (masked slots -inf),
    plus the log of the mass outside the support, then tempered exactly like the teacher's atoms. With ``groups``,
    a support id's atom also holds the probability of its group's members (and they leave the tail).
    ``normalized``: the caller passes float32 log-probabilities already (the fused LM + KD chunk shares them).
    Works on whatever positions it is given: callers pass one chunk of logits.
    """
    _require_unique_support(support_ids, support_mask)
    logp = student_logits if normalized else upcast(student_logits).log_softmax(-1)
    rows, k = support_ids.shape
    # One gather reads every entry the atoms need (the support ids, and with groups the members of support roots), and
    # returns the off-support mass with it, so the backward writes one [P, V] gradient.
    flat_index, on_support = row_flat_index(support_ids, logp.shape[-1]).flatten(), support_mask.flatten()
    if groups is not None:
        # Only the members whose root is on the support: the others' mass stays in the tail and is never read.
        member_rows, member_index = groups.members_on_support(support_ids, support_mask).nonzero(as_tuple=True)
        flat_index = torch.cat([flat_index, member_rows * logp.shape[-1] + groups.members[member_index]])
        on_support = torch.cat([on_support, torch.ones_like(member_rows, dtype=torch.bool)])
    gathered, tail_logmass = gather_with_off_mass(logp, flat_index, on_support)
    support_logp = gathered[:rows * k].view(rows, k)
    if groups is not None:
        member_mass = groups.member_mass_from(gathered[rows * k:], member_rows, member_index, support_ids)
        support_logp = pooled_with_members(support_logp, member_mass)
    support_logp = support_logp.masked_fill(~support_mask, -math.inf)
    return temper_atoms(support_logp, tail_logmass, temperature)
