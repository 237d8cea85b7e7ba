"""Layerwise term: every student block output matched to the proportionally deep teacher block output.

Student ``hidden_states[i]`` for i = 1..L_s maps to teacher ``hidden_states[j]`` with
j = round-half-up(i * L_t / L_s), at least 1 (block outputs only: index 0 is the embedding). This works for deeper
and shallower students alike; a student deeper than the teacher maps several layers to one teacher layer.

Final-norm quirk: the last ``hidden_states`` entry is after the final norm, all others are raw residual streams.
The map always pairs the student's last entry with the teacher's last (i = L_s gives j = L_t), so that pair is
post-norm on both sides. Any other pair that lands on a post-norm entry (a student at least twice as deep as the
teacher maps some pre-norm layers to j = L_t) is made comparable by construction: every mapped pair has its own
projection and the teacher side is standardised with that layer's own statistics, so no scale is shared between a
normed and an unnormed state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from crosskd.losses.calibration import HiddenStateStats
from crosskd.losses.features import (
    AlignedPairs,
    SummedLoss,
    mse_per_position,
    standardised_teacher_target,
    student_features,
)


def mapped_teacher_layer(student_layer: int, num_student_layers: int, num_teacher_layers: int) -> int:
    """Teacher block j = round-half-up(i * L_t / L_s) for student block i (both 1-based), at least 1."""
    if not 1 <= student_layer <= num_student_layers:
        raise ValueError(f"student block {student_layer} is outside 1..{num_student_layers}")
    # Integer arithmetic: floor(i * L_t / L_s + 1/2) without floating-point ties going the wrong way.
    return max(1, (2 * student_layer * num_teacher_layers + num_student_layers) // (2 * num_student_layers))


def layer_mapping(num_student_layers: int, num_teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """(student ``hidden_states`` index, teacher ``hidden_states`` index) for every student block."""
    return tuple(
        (i, mapped_teacher_layer(i, num_student_layers, num_teacher_layers)) for i in range(1, num_student_layers + 1)
    )


class LayerwiseMatcher(nn.Module):
    def __init__(self, student_hidden: int, teacher_hidden: int, num_student_layers: int, num_teacher_layers: int):
        super().__init__()
        self.mapping = layer_mapping(num_student_layers, num_teacher_layers)
        self.projections = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in self.mapping)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """The ``hidden_states`` indices the calibration pass must cover."""
        return tuple(sorted({teacher for _, teacher in self.mapping}))

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        pairs: AlignedPairs,
        stats: HiddenStateStats,
        *,
        student_grad_weight: float,
    ) -> SummedLoss:
        """MSE averaged over channels and over mapped layers, summed over `pairs` (the selection's feature pairs)."""
        errors = [
            mse_per_position(
                projection(student_features(student_hidden_states[student], pairs, student_grad_weight)),
                standardised_teacher_target(teacher_hidden_states, (teacher,), stats, pairs),
            )
            for projection, (student, teacher) in zip(self.projections, self.mapping, strict=True)
        ]
        # Averaged over layers so the term's scale does not grow with the student's depth.
        per_position = torch.stack(errors).mean(dim=0)
        return SummedLoss(per_position.sum(), len(pairs))
