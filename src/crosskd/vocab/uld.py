"""Universal Logit Distillation (Boizard et al. 2024): compare sorted probability vectors, not tokens.

Teacher and student vocabularies need no mapping: at each aligned position both distributions are sorted by
decreasing probability and compared rank by rank with an L1 distance (the Wasserstein-1 distance between the
sorted vectors, as in the paper). It is a distance of its own, never combined with the divergences.

Top-k truncation and temperature follow the same definition as every other strategy (docs/OBJECTIVE.md):
the teacher's K + 1 atoms from its cached top-k, and the student's own top-K plus its remaining mass, both
tempered over their K + 1 atoms. The two tail atoms are compared with each other rather than sorted into
the ranks, because a tail is the mass of many tokens, not the probability of one. Ranks the student lacks
(a vocabulary smaller than K) are zero, the paper's padding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from crosskd.config import ConfigError
from crosskd.losses.chunking import DEFAULT_CHUNK_ROWS
from crosskd.losses.lm import KDLossSum, LossSums, fused_chunked_losses
from crosskd.losses.target import MappedTarget, TopKTarget, student_atoms, target_atoms
from crosskd.teacher.online import TeacherNeeds
from crosskd.vocab.first_token import FirstTokenRetention
from crosskd.vocab.transfer import VocabularyTransfer, register_transfer


def uld_per_position(student_logits: Tensor, teacher_topk: TopKTarget, temperature: float,
                     normalized: bool = False) -> Tensor:
    """ULD distance at each position: student logits [P, Vs] (log-probabilities if ``normalized``) and the teacher's
    top-k -> [P]."""
    k = teacher_topk.ids.shape[-1]
    student_k = min(k, student_logits.shape[-1])
    # The order at tau = 1 is the order at any tau, and topk returns it sorted.
    student_top_ids = student_logits.topk(student_k, dim=-1).indices
    student_p = student_atoms(student_logits, student_top_ids, torch.ones_like(student_top_ids, dtype=torch.bool),
                              temperature, normalized=normalized).exp()
    teacher_p = target_atoms(teacher_topk, temperature).exp()
    # A cached top-k need not be sorted; sorting K values is cheap.
    teacher_ranks = teacher_p[:, :-1].sort(dim=-1, descending=True).values
    student_ranks = F.pad(student_p[:, :-1], (0, k - student_k))
    tail_gap = (teacher_p[:, -1] - student_p[:, -1]).abs()
    return (teacher_ranks - student_ranks).abs().sum(-1) + tail_gap


def uld_loss_sum(student_logp: Tensor, teacher_topk: TopKTarget, temperature: float) -> tuple[Tensor, int]:
    """(sum of the ULD distance over positions, number of positions) from the student's log-probabilities; fits the
    fused chunk loop as a KD term."""
    return uld_per_position(student_logp, teacher_topk, temperature, normalized=True).sum(), len(student_logp)


def chunked_lm_and_uld(
    hidden: Tensor,
    head_weight: Tensor,
    lm_targets: Tensor,
    kd_rows: Tensor,
    teacher_topk: TopKTarget,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> LossSums:
    """LM cross-entropy plus the ULD distance at ``kd_rows``, one chunk of student logits at a time.

    No temperature**2 factor: that is a convention for KL-type divergences (Hinton et al.); the ULD paper
    uses none, and the term's scale is set by its weight in the config.
    """
    return fused_chunked_losses(hidden, head_weight, lm_targets, kd_rows, teacher_topk, uld_kd_loss(temperature),
                                chunk_size)


def uld_kd_loss(temperature: float) -> KDLossSum:
    """The per-chunk KD sum of the ULD distance at ``temperature``."""
    return functools.partial(uld_loss_sum, temperature=temperature)


@register_transfer
class UniversalLogitDistillation(VocabularyTransfer):
    """ULD: the teacher's sorted top-k against the student's, no vocabulary map. The retention metrics still read
    the teacher through the first-token map (agreement with the mapped teacher)."""

    name = "uld"

    @classmethod
    def check_config(cls, objective) -> None:
        if objective.divergence is not None:
            raise ConfigError(
                "objective.divergence cannot be combined with objective.strategy 'uld': ULD is a distance of its own "
                "(L1 between sorted probability vectors, which need no shared vocabulary); remove objective.divergence"
            )

    @classmethod
    def teacher_needs(cls, objective) -> TeacherNeeds:
        return TeacherNeeds(topk=True)

    def __init__(self, config, teacher, student):
        super().__init__(config, teacher, student)
        self.retention = FirstTokenRetention(student, teacher)

    def kd_target(self, signal, selection, inputs, student_embedding) -> TopKTarget:
        return signal.topk.select(selection.kd_pairs)

    def kd_loss_sum(self, temperature: float, device) -> KDLossSum:
        return uld_kd_loss(temperature)

    def retention_target(self, signal, selection, inputs, student_embedding) -> MappedTarget:
        return self.retention.target(signal, selection)
