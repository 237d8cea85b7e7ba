"""Student-aware router: route each aligned student token to the teacher layer groups it should match.

The teacher's block outputs 1..L_t are split into E contiguous groups. Expert e is a linear map from one student
layer's hidden state into the teacher's space, trained to predict group e's target: the mean of the group's
per-layer standardised hidden states at the aligned teacher position (``standardised_teacher_target``). A gate on
the same student state picks the top-k experts per token; the feature loss is the gate-weighted MSE of each chosen
expert against its own group's target, so an expert stays a map into its group and the gate weights cannot mix
errors away.

The gate is trained by the loss it selects, so it can learn to prefer the easiest group. ``group_mse`` (every
group's error, measured on all tokens) next to ``RoutingStats.expert_share`` shows whether it does.
``DenseGroupMatcher`` matches every group on every token with the same experts: the baseline the router must beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def teacher_layer_groups(num_teacher_layers: int, num_groups: int) -> tuple[tuple[int, ...], ...]:
    """``hidden_states`` indices 1..L_t split into ``num_groups`` contiguous groups, sizes differing by at most 1.

    Index L_t (the last) is the state after the final norm; it belongs to the last group like any block output,
    because the targets standardise each layer on its own before averaging.
    """
    if not 1 <= num_groups <= num_teacher_layers:
        raise ValueError(f"need 1 <= num_groups ({num_groups}) <= teacher layers ({num_teacher_layers})")
    blocks = torch.arange(1, num_teacher_layers + 1)
    return tuple(tuple(chunk.tolist()) for chunk in torch.tensor_split(blocks, num_groups))


def default_student_layer(num_student_layers: int) -> int:
    """The middle block output: deep enough to carry features, far enough from the LM head to leave it alone."""
    return max(1, num_student_layers // 2)


@dataclass(frozen=True)
class RoutingStats:
    load_balance: Tensor  # Switch form E * sum_e f_e * P_e: 1 when balanced, up to E when collapsed
    importance: Tensor  # squared coefficient of variation of summed gate probabilities: 0 when balanced
    expert_share: Tensor  # [E] fraction of the top-k assignments each expert received (detached, for logging)
    gate_entropy: Tensor  # mean per-token entropy of the gate in nats (detached, for logging); log E is uniform


@dataclass(frozen=True)
class GroupMatchOutput:
    feature: SummedLoss
    group_mse: Tensor  # [E] mean MSE of each expert against its group on all aligned tokens (detached)
    routing: RoutingStats | None  # None for the dense matcher


class _GroupMatcher(nn.Module):
    """The part router and dense baseline share: one expert per teacher layer group, and its per-token errors."""

    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        num_teacher_layers: int,
        *,
        student_layer: int,
        num_experts: int = 4,
    ) -> None:
        super().__init__()
        self.groups = teacher_layer_groups(num_teacher_layers, num_experts)
        self.student_layer = student_layer
        self.experts = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in self.groups)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """The ``hidden_states`` indices the calibration pass must cover."""
        return tuple(layer for group in self.groups for layer in group)

    def _student_and_errors(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        pairs: AlignedPairs,
        stats: HiddenStateStats,
        student_grad_weight: float,
    ) -> tuple[Tensor, Tensor]:
        """Student features [P, H_s] and every expert's error against its own group [P, E] at the feature pairs."""
        student = student_features(student_hidden_states[self.student_layer], pairs, student_grad_weight)
        predictions = torch.stack([expert(student) for expert in self.experts], dim=1)  # [P, E, H_t]
        targets = torch.stack(
            [standardised_teacher_target(teacher_hidden_states, group, stats, pairs) for group in self.groups], dim=1
        )
        return student, mse_per_position(predictions, targets)


class StudentAwareRouter(_GroupMatcher):
    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        num_teacher_layers: int,
        *,
        student_layer: int,
        num_experts: int = 4,
        top_k: int = 2,
    ) -> None:
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and num_experts ({num_experts})")
        super().__init__(
            student_hidden, teacher_hidden, num_teacher_layers, student_layer=student_layer, num_experts=num_experts
        )
        self.top_k = top_k
        self.gate = nn.Linear(student_hidden, num_experts)

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        pairs: AlignedPairs,
        stats: HiddenStateStats,
        *,
        student_grad_weight: float,
    ) -> GroupMatchOutput:
        student, errors = self._student_and_errors(
            student_hidden_states, teacher_hidden_states, pairs, stats, student_grad_weight
        )
        log_probs = torch.log_softmax(self.gate(student), dim=-1)  # [P, E]
        probs = log_probs.exp()
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        # Renormalised over the chosen experts (with top_k = 1 the gate then learns only from the balance terms).
        top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        per_position = (top_weights * errors.gather(1, top_experts)).sum(dim=-1)
        return GroupMatchOutput(
            feature=SummedLoss(per_position.sum(), errors.shape[0]),
            group_mse=_group_mse(errors),
            routing=routing_stats(log_probs, top_experts),
        )


def _group_mse(errors: Tensor) -> Tensor:
    return errors.detach().sum(dim=0) / max(errors.shape[0], 1)


def routing_stats(log_probs: Tensor, top_experts: Tensor) -> RoutingStats:
    """Balance regularisers and logging statistics from gate log-probabilities [P, E] and chosen experts [P, k]."""
    num_experts = log_probs.shape[-1]
    if log_probs.shape[0] == 0:  # a micro-batch whose only aligned pairs were at window position 0
        zero = log_probs.sum()
        return RoutingStats(zero, zero, torch.zeros(num_experts, device=log_probs.device), zero.detach())
    probs = log_probs.exp()
    assignments = torch.zeros_like(probs).scatter_(1, top_experts, 1.0)
    share = assignments.mean(dim=0) / top_experts.shape[-1]  # f_e: a fraction of all assignments, sums to 1
    mean_prob = probs.mean(dim=0)  # P_e
    importance = probs.sum(dim=0)
    entropy = -(probs * log_probs).sum(dim=-1).mean()
    return RoutingStats(
        load_balance=num_experts * (share * mean_prob).sum(),
        importance=importance.var(correction=0) / importance.mean().pow(2),
        expert_share=share.detach(),
        gate_entropy=entropy.detach(),
    )


class DenseGroupMatcher(_GroupMatcher):
    """Every expert matches its group on every token (equal weights): the router's experts without the gate."""

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        pairs: AlignedPairs,
        stats: HiddenStateStats,
        *,
        student_grad_weight: float,
    ) -> GroupMatchOutput:
        _, errors = self._student_and_errors(
            student_hidden_states, teacher_hidden_states, pairs, stats, student_grad_weight
        )
        return GroupMatchOutput(
            feature=SummedLoss(errors.mean(dim=-1).sum(), errors.shape[0]),
            group_mse=_group_mse(errors),
            routing=None,
        )
