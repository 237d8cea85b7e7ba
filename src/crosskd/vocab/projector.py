"""The `projector` strategy: a learned linear map from the teacher's representation into the student's logit space.

    teacher features [P, D_t] --(LogitProjector, learned)--> [P, D_s] --(student output embedding, DETACHED)--> [P, V_s]

Teacher features are either the teacher's final hidden state at the aligned position (the fast path) or the
teacher's top-k probabilities times its output-embedding rows, computed with `embedding_bag` so the dense
[positions x 151,936] probability matrix never exists. Why each safeguard is there (docs/VOCAB.md):

- the projector is pre-fitted with the student frozen before KD starts: a random map sends the teacher's hidden
  state (norm ~160) to confident random logits, whose KL to the student is ~17 nats at step 0;
- the cross-entropy anchor on the true next student token keeps the projector a good predictor while the student
  moves; without it, KD would pull the projector towards whatever the student already says;
- the student's output embedding is detached here: the embedding is tied to the input embedding, and a gradient
  through the projector would let the anchor (and KD) reshape the student's vocabulary to suit the projector;
- the projected target is detached inside the KD term: otherwise KD trains the projector to imitate the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosskd.losses.chunking import DEFAULT_CHUNK_ROWS, chunk_slices, upcast
from crosskd.losses.target import MappedTarget, TopKTarget, teacher_topk

IGNORE_INDEX = -100


class LogitProjector(nn.Module):
    """The learned map from teacher features [.., D_t] to the student's output-embedding space [.., D_s]."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.linear = nn.Linear(teacher_dim, student_dim, bias=True)
        # A small init only keeps the first pre-fit steps tame; it is not what makes step 0 sane (pre-fit is).
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, teacher_features: Tensor) -> Tensor:
        return self.linear(teacher_features.to(self.linear.weight.dtype))


def teacher_features_from_topk(topk_ids: Tensor, topk_probs: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Σ_k p_k · E[id_k] per position: [P, k] ids and probabilities, E [V_t, D_t] -> [P, D_t].

    `embedding_bag` sums the weighted rows without materialising [P, k, D_t], let alone [P, V_t].
    """
    return F.embedding_bag(topk_ids, teacher_embedding, per_sample_weights=topk_probs.to(teacher_embedding.dtype),
                           mode="sum")


def projected_logits(projector: LogitProjector, teacher_features: Tensor, student_output_embedding: Tensor) -> Tensor:
    """Student-vocabulary logits [P, V_s] of the projected teacher features, through the DETACHED student embedding.

    Call it on one chunk of positions at a time; its width is the student vocabulary, never the teacher's.
    """
    projected = upcast(projector(teacher_features))
    return projected @ upcast(student_output_embedding.detach()).T


def anchor_loss(
    projector: LogitProjector,
    teacher_features: Tensor,
    student_output_embedding: Tensor,
    target_ids: Tensor,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the projected logits on the true next student token: (sum over positions, count).

    Only the projector receives a gradient. Each chunk's logits are recomputed in backward (checkpointing), so at
    most one chunk of [chunk, V_s] float32 logits is alive at a time.
    """
    total = teacher_features.new_zeros((), dtype=torch.promote_types(teacher_features.dtype, torch.float32))
    for rows in chunk_slices(teacher_features.shape[0], chunk_size):
        total = total + torch.utils.checkpoint.checkpoint(
            _anchor_chunk_sum, projector, teacher_features[rows], student_output_embedding, target_ids[rows],
            use_reentrant=False,
        )
    return total, (target_ids != IGNORE_INDEX).sum()


def _anchor_chunk_sum(projector, features: Tensor, embedding: Tensor, targets: Tensor) -> Tensor:
    logits = projected_logits(projector, features, embedding)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def projected_target(
    projector: LogitProjector,
    teacher_features: Tensor,
    student_output_embedding: Tensor,
    top_k: int,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> MappedTarget:
    """The projector's distribution as a KD target, DETACHED: its top-k on the student vocabulary plus a tail atom,
    the same kind of target the first-token strategy gives, so both feed the same divergences.

    No gradient: inside the KD term the projector plays the teacher, and a teacher that KD can move is simply pulled
    towards the student (the anchor is what trains it).
    """
    every_id = torch.ones(student_output_embedding.shape[0], dtype=torch.bool, device=teacher_features.device)
    parts = [
        teacher_topk(projected_logits(projector, teacher_features[rows], student_output_embedding), top_k, every_id)
        for rows in chunk_slices(teacher_features.shape[0], chunk_size)
    ]
    ids, logp, tail_logmass = (torch.cat(field) for field in zip(*((t.ids, t.logp, t.tail_logmass) for t in parts)))
    return TopKTarget(ids, logp, tail_logmass).as_support()


# ---------------------------------------------------------------------------------------------------------------------
# Pre-fit


@dataclass(frozen=True)
class AnchorData:
    """Aligned positions for fitting the projector: teacher features and the true next student token."""

    teacher_features: Tensor  # [P, D_t]
    target_ids: Tensor  # int64 [P]

    def mean_nll(self, projector: LogitProjector, student_output_embedding: Tensor, chunk_size: int) -> float:
        with torch.no_grad():
            total, count = anchor_loss(projector, self.teacher_features, student_output_embedding, self.target_ids,
                                       chunk_size)
        return float(total / count.clamp_min(1))


@dataclass(frozen=True)
class PrefitReport:
    steps: int
    heldout_nll: float  # the projector's mean NLL of the true next student token on held-out positions
    student_nll: float  # the frozen student's own mean NLL on the same positions
    beats_student: bool  # False: the step budget ran out first

    def describe(self) -> str:
        verdict = "beats" if self.beats_student else "does NOT beat (budget exhausted)"
        return (f"projector pre-fit: {self.steps} steps, held-out NLL {self.heldout_nll:.3f} {verdict} "
                f"the student's {self.student_nll:.3f}")


def least_squares_init(projector: LogitProjector, teacher_features: Tensor, student_hidden: Tensor,
                       ridge: float = 0.1) -> None:
    """Start the projector as the ridge regression of the student's final hidden state on the teacher features.

    Then the projected logits ≈ the student's own logits: the pre-fit starts near the student's NLL instead of from
    ~17 nats, and the cross-entropy steps only have to add what the teacher knows beyond the student.
    """
    features = teacher_features.double()
    mean_x, mean_y = features.mean(0), student_hidden.double().mean(0)
    x, y = features - mean_x, student_hidden.double() - mean_y
    # Ridge scaled by the features' average energy, so it means the same for hidden states of any norm. It is strong
    # because pre-fit sets are small: ~900 pairs for 896 features interpolate the training pairs with ridge 1e-3
    # and the held-out NLL was 8.2 (bench/step0_sanity.py, first attempt).
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, x.T @ y).T  # [D_s, D_t]
    with torch.no_grad():
        projector.linear.weight.copy_(weight)
        projector.linear.bias.copy_(mean_y - weight @ mean_x)


def prefit_projector(
    projector: LogitProjector,
    student_output_embedding: Tensor,
    train: AnchorData,
    heldout: AnchorData,
    student_heldout_nll: float,
    max_steps: int = 200,
    lr: float = 1e-3,
    eval_every: int = 10,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> PrefitReport:
    """Fit the projector alone (the student frozen: its embedding is only read, detached) with the cross-entropy
    anchor, until its held-out NLL beats the student's own or `max_steps` full-batch Adam steps have run."""
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    heldout_nll = heldout.mean_nll(projector, student_output_embedding, chunk_size)
    steps = 0
    while heldout_nll >= student_heldout_nll and steps < max_steps:
        for _ in range(min(eval_every, max_steps - steps)):
            optimizer.zero_grad(set_to_none=True)
            total, count = anchor_loss(projector, train.teacher_features, student_output_embedding, train.target_ids,
                                       chunk_size)
            (total / count.clamp_min(1)).backward()
            optimizer.step()
            steps += 1
        heldout_nll = heldout.mean_nll(projector, student_output_embedding, chunk_size)
    return PrefitReport(steps, heldout_nll, student_heldout_nll, heldout_nll < student_heldout_nll)
