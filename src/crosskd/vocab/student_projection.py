"""The `student-projection` strategy: carry the student's distribution into the teacher's vocabulary and compare there.

The other transfers move the teacher's top-k onto the student's vocabulary. This one goes the other way (X-Token's
P-KL): a sparse matrix S [student logit size x teacher logit size] sends each student token's probability to the
teacher token the teacher would emit at the same byte, the first token of the teacher's own tokenisation of the
student token's bytes. The student's projected mass on a teacher id t is sum_s p_S(s) S[s, t]; the KD term compares it
with the teacher's top-k plus one tail atom, on the teacher's support.

Every student row of S has one non-zero, of weight 1, or none (ids without text), so S is stored as one teacher id per
student id (`student_to_teacher`); the projection sums, per teacher top-k id, the student ids that map to it, through
that table sorted by teacher id (a CSR of S's transpose). docs/VOCAB.md states the rule and its numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from crosskd.data.encoding import token_bytes_table
from crosskd.losses.chunking import upcast
from crosskd.losses.divergences import Divergence
from crosskd.losses.lm import KDLossSum
from crosskd.losses.target import MappedTarget, TopKTarget, gather_with_off_mass, target_atoms, temper_atoms
from crosskd.teacher.online import TeacherNeeds
from crosskd.vocab.first_token import (
    UNMAPPED,
    FirstTokenRetention,
    load_or_build_table,
    first_token_map_key,
    first_token_map_path,
    first_tokens,
    tail_logmass_with,
)
from crosskd.vocab.transfer import DivergenceTransfer, register_transfer

# Bump when the projection rules change, so tables cached by an older rule are rebuilt rather than silently reused.
PROJECTION_ALGORITHM_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# The matrix S


def build_student_projection_table(student_tokenizer, teacher_tokenizer, teacher_valid_mask: np.ndarray,
                                   student_logit_size: int) -> np.ndarray:
    """int64 [student logit size]: for each student id, the teacher id its row of S puts weight 1 on, the first token
    of the teacher's mid-text tokenisation of its bytes (the token itself when that tokenisation is one token: an
    exact match); UNMAPPED (an empty row) for ids without bytes (special, padded) and where that first token is no
    real teacher token (a padded id, one without bytes, or none: the teacher cannot emit the student token's first
    byte)."""
    table = np.full(student_logit_size, UNMAPPED, dtype=np.int64)
    student_bytes = token_bytes_table(student_tokenizer)
    teacher_bytes = token_bytes_table(teacher_tokenizer)
    with_bytes = [i for i, token in enumerate(student_bytes) if token is not None and i < student_logit_size]
    first_teacher = first_tokens(teacher_tokenizer, [student_bytes[i] for i in with_bytes])
    for student_id, teacher_id in zip(with_bytes, first_teacher):
        is_real = (teacher_id != UNMAPPED and teacher_id < len(teacher_valid_mask) and teacher_valid_mask[teacher_id]
                   and teacher_bytes[teacher_id] is not None)
        if is_real:
            table[student_id] = teacher_id
    return table


@dataclass(frozen=True)
class StudentProjection:
    """S as a table and as a CSR of its transpose.

    student_to_teacher: int64 [Vs] the teacher id of each student id's row (UNMAPPED: an empty row).
    students_by_teacher: int64 [M] the mapped student ids, sorted by their teacher id.
    first_student: int64 [Vt] where teacher id t's student ids start in `students_by_teacher`.
    student_count: int64 [Vt] how many student ids map to teacher id t (0: t is outside S's image, no student mass
    can reach it).
    """

    student_to_teacher: Tensor
    students_by_teacher: Tensor
    first_student: Tensor
    student_count: Tensor
    key: str

    @classmethod
    def from_table(cls, student_to_teacher: Tensor, teacher_logit_size: int, key: str) -> StudentProjection:
        mapped = (student_to_teacher != UNMAPPED).nonzero().squeeze(-1)
        teachers = student_to_teacher[mapped]
        order = teachers.argsort(stable=True)
        student_count = torch.bincount(teachers, minlength=teacher_logit_size)
        first_student = student_count.cumsum(0) - student_count
        return cls(student_to_teacher, mapped[order], first_student, student_count, key)

    def to(self, device) -> StudentProjection:
        if self.student_count.device == torch.device(device):
            return self
        return StudentProjection(self.student_to_teacher.to(device), self.students_by_teacher.to(device),
                                 self.first_student.to(device), self.student_count.to(device), self.key)


def load_or_build_student_projection(student_tokenizer, teacher_tokenizer, teacher_valid_mask: Tensor,
                                     student_logit_size: int, cache_dir=None) -> StudentProjection:
    """S for this tokenizer pair, read from the crosskd cache or built once and written there (keyed like the
    first-token map, plus the student's logit size: the table has one row per student logit id)."""
    rules = f"student-projection-v{PROJECTION_ALGORITHM_VERSION}\n{student_logit_size}"
    key = first_token_map_key(student_tokenizer, teacher_tokenizer, teacher_valid_mask, rules=rules)
    table = load_or_build_table(
        first_token_map_path(key, cache_dir, kind="student_projection"),
        lambda: build_student_projection_table(student_tokenizer, teacher_tokenizer, teacher_valid_mask.numpy(),
                                               student_logit_size),
    )
    return StudentProjection.from_table(torch.from_numpy(table).long(), len(teacher_valid_mask), key)


# ---------------------------------------------------------------------------------------------------------------------
# The target and the student's projected atoms


def teacher_support_target(topk: TopKTarget, projection: StudentProjection) -> MappedTarget:
    """The teacher's top-k as a target on its own vocabulary: `ids` are teacher ids, the slots no student token
    projects onto (outside S's image) are masked and their mass joins the tail atom, as the first-token push does
    with unmapped ids: the student can put no mass there, and a forward KL against an atom it cannot reach would be
    infinite."""
    reachable = projection.student_count.to(topk.ids.device)[topk.ids] > 0
    return MappedTarget(ids=topk.ids, logp=upcast(topk.logp), mask=reachable,
                        tail_logmass=tail_logmass_with(topk, ~reachable))


def projected_student_atoms(student_logits: Tensor, target: MappedTarget, projection: StudentProjection,
                            temperature: float, normalized: bool = False) -> Tensor:
    """The student's K + 1 atoms at ``temperature`` in the teacher's vocabulary: [P, Vs] logits (float32
    log-probabilities if ``normalized``) and a `teacher_support_target` -> [P, K + 1].

    Atom k is log sum_s p_S(s) S[s, ids_k], a log-sum-exp over the student ids that map to teacher id ids_k
    (gathered through the CSR, a few per id: no [P, Vt] matrix); the tail atom is the log of the student's mass on
    every other student id, summed directly (not 1 minus the support), so it stays exact and finite when the support
    holds nearly all the mass. Both at tau = 1, then tempered like the teacher's atoms (`temper_atoms`).
    """
    logp = student_logits if normalized else upcast(student_logits).log_softmax(-1)
    rows, k = target.ids.shape
    counts = projection.student_count[target.ids].masked_fill(~target.mask, 0).flatten()
    # One entry per (slot, student id mapping to the slot's teacher id), grouped by slot.
    slot = torch.repeat_interleave(torch.arange(rows * k, device=logp.device), counts)
    slot_start = counts.cumsum(0) - counts
    rank_in_slot = torch.arange(len(slot), device=logp.device) - slot_start[slot]
    students = projection.students_by_teacher[projection.first_student[target.ids].flatten()[slot] + rank_in_slot]
    row = slot // k
    # The entries and the mass off them in one gather (one [P, Vs] gradient buffer, no [P, Vs] indicator); every
    # gathered entry is on the support.
    member_logp, tail_logmass = gather_with_off_mass(logp, row * logp.shape[-1] + students,
                                                     torch.ones_like(students, dtype=torch.bool))
    # Log-sum-exp per slot, shifted by the slot's largest member (detached: the shift cancels in value and gradient).
    shift = member_logp.new_zeros(rows * k).scatter_reduce(0, slot, member_logp.detach(), "amax", include_self=False)
    sums = member_logp.new_zeros(rows * k).index_add(0, slot, (member_logp - shift[slot]).exp())
    has_members = counts > 0
    # Empty slots take log(1) before they are masked: a log(0) there would put 0 * inf = NaN into the backward.
    support_logp = (sums.masked_fill(~has_members, 1.0).log() + shift).masked_fill(~has_members, -math.inf)
    return temper_atoms(support_logp.view(rows, k), tail_logmass, temperature)


def projection_loss_sum(student_logp: Tensor, target: MappedTarget, projection: StudentProjection,
                        divergence: Divergence, temperature: float) -> tuple[Tensor, int]:
    """One chunk's KD sum: ``divergence`` between the student's projected atoms and the teacher's, at
    ``temperature``, from the student's float32 log-probabilities; (sum over positions, number of positions)."""
    student = projected_student_atoms(student_logp, target, projection, temperature, normalized=True)
    return divergence(student, target_atoms(target, temperature)).sum(), len(student_logp)


@register_transfer
class StudentProjectionTransfer(DivergenceTransfer):
    """The student's distribution projected through S onto the teacher's top-k support (forward KL by default,
    `objective.divergence`; temperature on both sides' atoms and the τ² factor of `objective.scale_by_t2` as for
    first-token). The retention metrics read the teacher through the plain first-token map, as ULD's do."""

    name = "student-projection"

    @classmethod
    def teacher_needs(cls, objective) -> TeacherNeeds:
        return TeacherNeeds(topk=True)

    def __init__(self, config, teacher, student):
        super().__init__(config, teacher, student)
        self.projection = load_or_build_student_projection(student.tokenizer, teacher.tokenizer,
                                                           teacher.vocab.valid_mask, student.vocab.logit_size)
        self.retention = FirstTokenRetention(student, teacher)

    def kd_target(self, signal, selection, inputs, student_embedding) -> MappedTarget:
        topk = signal.topk.select(selection.kd_pairs)
        self.projection = self.projection.to(topk.ids.device)
        return teacher_support_target(topk, self.projection)

    def kd_loss_sum(self, temperature: float, device) -> KDLossSum:
        self.projection = self.projection.to(device)
        return functools.partial(projection_loss_sum, projection=self.projection,
                                 divergence=self.divergence, temperature=temperature)

    def retention_target(self, signal, selection, inputs, student_embedding) -> MappedTarget:
        return self.retention.target(signal, selection)
