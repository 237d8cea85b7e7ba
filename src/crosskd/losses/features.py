"""Helpers shared by the hidden-state and attention terms (router, layerwise, contrastive, attention).

Conventions every term follows:

* Aligned positions arrive as the flat pair tensors of docs/ARCHITECTURE.md, "The contracts between stages"
  (``AlignedPairs``).
* Window position 0 is left out: the terms receive the feature pairs of the micro-batch's position selection
  (``crosskd.losses.selection``, which applies ``AlignedPairs.without_window_start``). It is the attention sink:
  there, two of Qwen's 896 channels carry 98% of the hidden-state energy and key 0 takes 20-68% of head-averaged
  attention, so a term that kept it would mostly fit that one outlier position.
* Teacher targets are standardised per channel with calibration statistics (``crosskd.losses.calibration``) and
  never carry gradient.
* A term returns ``SummedLoss(sum, count)``: the loss summed over aligned positions and the number of positions, so
  the trainer can divide by the count of the whole accumulated batch.
* Auxiliary heads see the student's states through ``scale_gradient``: the head trains at full strength, the
  student receives ``weight`` times the gradient (the schedule's weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from crosskd.losses.calibration import HiddenStateStats


class AlignedPairs(NamedTuple):
    """Flat aligned pairs [P]: row in the batch, student position, teacher position."""

    batch: Tensor
    student_pos: Tensor
    teacher_pos: Tensor

    def without_window_start(self) -> AlignedPairs:
        """The pairs whose student and teacher positions are both past window position 0 (the attention sink)."""
        return self.where((self.student_pos > 0) & (self.teacher_pos > 0))

    def where(self, keep: Tensor) -> AlignedPairs:
        """The pairs where the bool [P] `keep` holds."""
        return AlignedPairs(self.batch[keep], self.student_pos[keep], self.teacher_pos[keep])

    def __len__(self) -> int:
        return self.batch.numel()


@dataclass(frozen=True)
class SummedLoss:
    """A loss summed over ``count`` aligned positions; the trainer divides by the accumulated count."""

    sum: Tensor
    count: int

    def mean(self) -> Tensor:
        """Per-position mean, for logging one micro-batch; 0 when nothing was aligned."""
        return self.sum / max(self.count, 1)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.weight, None


def scale_gradient(x: Tensor, weight: float) -> Tensor:
    """Identity forward; backward multiplies the gradient by ``weight``.

    Put between the student's state and an auxiliary head: the head's loss trains the head at full strength while
    the student receives ``weight`` x the gradient. With weight 0 the state is detached outright, so the backward
    pass does not even enter the student.
    """
    if weight < 0:
        raise ValueError(f"gradient weight must be >= 0, got {weight}")
    if weight == 0:
        return x.detach()
    return _ScaleGradient.apply(x, float(weight))


def gather_student(states: Tensor, pairs: AlignedPairs) -> Tensor:
    """[B, N, H] -> [P, H] float32 at the pairs' student positions."""
    return states[pairs.batch, pairs.student_pos].float()


def gather_teacher(states: Tensor, pairs: AlignedPairs) -> Tensor:
    """[B, M, H] -> [P, H] float32 at the pairs' teacher positions."""
    return states[pairs.batch, pairs.teacher_pos].float()


def student_features(states: Tensor, pairs: AlignedPairs, grad_weight: float) -> Tensor:
    """[B, N, H_s] -> [P, H_s]: what an auxiliary head reads from the student.

    The gradient back into the student is scaled by ``grad_weight``. A parameter-free layer norm follows, so a head's
    input has the same scale whichever student layer it reads (residual streams grow with depth) and the loss starts
    at a known size.
    """
    gathered = scale_gradient(gather_student(states, pairs), grad_weight)
    return torch.nn.functional.layer_norm(gathered, gathered.shape[-1:])


def resolve_layer(index: int, hidden_states: Sequence[Tensor]) -> int:
    """A (possibly negative) index into a ``hidden_states`` tuple as a non-negative one."""
    if not -len(hidden_states) <= index < len(hidden_states):
        raise IndexError(f"layer {index} out of range for {len(hidden_states)} hidden states")
    return index % len(hidden_states)


@torch.no_grad()
def standardised_teacher_target(
    teacher_hidden_states: Sequence[Tensor], layers: Sequence[int], stats: HiddenStateStats, pairs: AlignedPairs
) -> Tensor:
    """[P, H_t]: the mean over ``layers`` of each layer's per-channel standardised state, at aligned positions.

    Each layer is standardised with its own statistics *before* averaging. That is how the final-norm quirk is
    handled: the last ``hidden_states`` entry is after the final norm while the others are raw residual streams whose
    scale grows with depth, so a plain mean would be dominated by whichever is larger. No gradient reaches the
    teacher.
    """
    standardised = [
        stats.standardise(
            gather_teacher(teacher_hidden_states[layer], pairs), resolve_layer(layer, teacher_hidden_states)
        )
        for layer in layers
    ]
    return torch.stack(standardised).mean(dim=0)


def mse_per_position(prediction: Tensor, target: Tensor) -> Tensor:
    """[..., H] -> [...]: squared error averaged over channels, so the scale does not grow with the width."""
    return (prediction - target).pow(2).mean(dim=-1)
