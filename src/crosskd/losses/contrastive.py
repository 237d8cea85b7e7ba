"""Contrastive term: InfoNCE between projected student and teacher token states at aligned positions.

Within a micro-batch, the projected student state of aligned pair p must be closer (cosine similarity divided by
the temperature) to the teacher state of the same pair than to the teacher state of every other aligned pair of the
batch. The teacher side is standardised per channel first: on raw or layer-normed states a few massive channels
make every pair of tokens look alike (cosine near 1), and the term would have nothing to contrast.

Memory: one [P, P] float32 similarity matrix per micro-batch (P aligned pairs), e.g. 4 x 256 pairs -> 4 MiB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosskd.losses.calibration import HiddenStateStats
from crosskd.losses.features import AlignedPairs, SummedLoss, standardised_teacher_target, student_features


class ContrastiveMatcher(nn.Module):
    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        *,
        temperature: float = 0.1,
        student_layer: int = -1,
        teacher_layer: int = -1,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.projection = nn.Linear(student_hidden, teacher_hidden)

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        pairs: AlignedPairs,
        stats: HiddenStateStats,
        *,
        student_grad_weight: float,
    ) -> SummedLoss:
        """Cross-entropy of each pair's teacher among all the batch's teacher states, summed over pairs."""
        student = self.projection(
            student_features(student_hidden_states[self.student_layer], pairs, student_grad_weight)
        )
        teacher = standardised_teacher_target(teacher_hidden_states, (self.teacher_layer,), stats, pairs)
        similarity = F.normalize(student, dim=-1) @ F.normalize(teacher, dim=-1).T / self.temperature
        positives = torch.arange(len(pairs), device=similarity.device)
        return SummedLoss(F.cross_entropy(similarity, positives, reduction="sum"), len(pairs))
