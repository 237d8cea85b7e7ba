"""Attention term: student and teacher attention maps compared on the positions both models share.

For each selected student layer and its mapped teacher layer (the layerwise depth map), the head-averaged attention
is restricted to aligned query and key positions (the selection's feature pairs: window position 0 excluded), and to
keys that are causal in both models; each row is renormalised over those keys and KL(teacher row || student row) is
taken per row. The loss is summed over aligned query rows (averaged over the selected layers) with the number of rows
as its count.

Position 0 is left out because it is the attention sink: key 0 takes 20-68% of the head-averaged attention in both
models, so with it the term would mostly compare how much each model parks on the sink.

There is no head here: the schedule weight enters through ``scale_gradient`` like every auxiliary term, and the loop
skips the term (and does not request attentions) while its weight is 0.

Memory: Hugging Face returns attentions only from the eager implementation and then for *every* layer:
L * B * heads * N^2 * 4 bytes per model in float32 (the student's are kept for backward). Per micro-batch of B
windows, student (L_s, h_s, N) and teacher (L_t, h_t, M):  4 * B * (L_s * h_s * N^2 + L_t * h_t * M^2) bytes.
The aligned sub-matrices this module builds are small next to that (n^2 per row and layer, n aligned pairs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from crosskd.losses.features import AlignedPairs, SummedLoss, scale_gradient
from crosskd.losses.layerwise import mapped_teacher_layer


def attention_layer_pairs(
    student_layers: Sequence[int], num_student_layers: int, num_teacher_layers: int
) -> tuple[tuple[int, int], ...]:
    """(student, teacher) indices into the ``attentions`` tuples; ``attentions[k]`` belongs to block k + 1."""
    return tuple(
        (layer, mapped_teacher_layer(layer + 1, num_student_layers, num_teacher_layers) - 1) for layer in student_layers
    )


def _aligned_rows(attention: Tensor, positions: Tensor, keys_allowed: Tensor) -> Tensor:
    """One window's [heads, N, N] attention -> head-averaged [n, n] over aligned positions, rows renormalised."""
    restricted = attention[:, positions[:, None], positions[None, :]].float().mean(dim=0) * keys_allowed
    return restricted / restricted.sum(dim=-1, keepdim=True)


def _row_kl(teacher: Tensor, student: Tensor, keys_allowed: Tensor) -> Tensor:
    """KL(teacher || student) per row [n]; disallowed keys are 0 in both and contribute exactly 0."""
    # Outside the allowed keys the student is set to 1 so that neither the value nor the gradient sees 0 * log 0.
    student = torch.where(keys_allowed, student, torch.ones_like(student))
    return (torch.xlogy(teacher, teacher) - torch.xlogy(teacher, student)).sum(dim=-1)


def attention_alignment_loss(
    student_attentions: Sequence[Tensor],
    teacher_attentions: Sequence[Tensor],
    pairs: AlignedPairs,
    layer_pairs: Sequence[tuple[int, int]],
    *,
    student_grad_weight: float,
) -> SummedLoss:
    total = torch.zeros((), device=pairs.batch.device)
    for row in pairs.batch.unique().tolist():
        in_row = pairs.batch == row
        student_pos, teacher_pos = pairs.student_pos[in_row], pairs.teacher_pos[in_row]
        # Causal in both models; the alignment is monotone, so this only drops keys after the query.
        keys_allowed = (student_pos[None, :] <= student_pos[:, None]) & (teacher_pos[None, :] <= teacher_pos[:, None])
        for student_layer, teacher_layer in layer_pairs:
            with torch.no_grad():
                teacher = _aligned_rows(teacher_attentions[teacher_layer][row], teacher_pos, keys_allowed)
            student = _aligned_rows(
                scale_gradient(student_attentions[student_layer][row], student_grad_weight), student_pos, keys_allowed
            )
            total = total + _row_kl(teacher, student, keys_allowed).sum() / len(layer_pairs)
    return SummedLoss(total, len(pairs))
