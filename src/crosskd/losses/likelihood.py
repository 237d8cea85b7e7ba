"""Likelihood chunks: the text between consecutive shared token boundaries of the two tokenisations, and the losses
that compare the teacher's and the student's log-likelihood of each chunk (approximate likelihood matching,
Minixhofer, Vulić & Ponti 2025; docs/VOCAB.md, "chunk-likelihood").

An aligned pair (i, j) is a byte where student token i + 1 and teacher token j + 1 both start (docs/ALIGNMENT.md), so
consecutive pairs (i, j), (i', j') of a row bound a chunk: student tokens i + 1 .. i' and teacher tokens j + 1 .. j'
spell the same bytes. The chunk's log-likelihood is the sum of each model's log-probabilities of its own observed
tokens there: the student's at positions i .. i' - 1, the teacher's at j .. j' - 1. Text before a row's first pair
and after its last one is in no chunk (its other end is no boundary both sides are known to share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from crosskd.losses.chunking import upcast
from crosskd.losses.divergences import forward_kl
from crosskd.losses.target import log1mexp


@dataclass(frozen=True)
class LikelihoodChunks:
    """The chunks of a micro-batch as flat index lists, each position tagged with its chunk (0 .. count - 1)."""

    student_rows: Tensor  # int64 [R]: flat student rows (row * N + i) whose next token lies in a chunk
    student_chunk: Tensor  # int64 [R]
    teacher_rows: Tensor  # int64 [T]: flat teacher rows (row * M + j) whose next token lies in a chunk
    teacher_chunk: Tensor  # int64 [T]
    count: int

    def loglikelihoods(self, token_logp: Tensor, rows: Tensor, chunk: Tensor) -> Tensor:
        """float32 [count]: the sum of the flat per-position log-probabilities `token_logp` over each chunk."""
        summed = torch.zeros(self.count, dtype=torch.promote_types(token_logp.dtype, torch.float32),
                             device=token_logp.device)
        return summed.index_add(0, chunk, upcast(token_logp[rows]))

    def student(self, student_token_logp: Tensor) -> Tensor:
        """[count]: the student's log-likelihood of each chunk from its flat [B * N] observed-token log-probs."""
        return self.loglikelihoods(student_token_logp, self.student_rows, self.student_chunk)

    def teacher(self, teacher_observed_logprobs: Tensor) -> Tensor:
        """[count]: the teacher's log-likelihood of each chunk from its [B, M] observed-token log-probabilities."""
        return self.loglikelihoods(teacher_observed_logprobs.reshape(-1), self.teacher_rows, self.teacher_chunk)


def _spans(starts: Tensor, stops: Tensor) -> tuple[Tensor, Tensor]:
    """(every index in [starts[c], stops[c]) for every c, the c of each), concatenated in order."""
    lengths = stops - starts
    chunk = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), lengths)
    first = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths)
    return first + torch.arange(len(chunk), device=starts.device), chunk


def likelihood_chunks(batch, trained: Tensor | None = None) -> LikelihoodChunks:
    """The chunks of `batch` between consecutive aligned pairs of each row. `trained` (bool [B, N], the loss mask):
    a chunk with any position left out is left out whole (its likelihood would otherwise be a part of it)."""
    pair_batch, student_pos, teacher_pos = batch.pair_batch, batch.pair_student_pos, batch.pair_teacher_pos
    same_row = pair_batch[1:] == pair_batch[:-1]
    rows = pair_batch[:-1][same_row]
    student_start, student_stop = student_pos[:-1][same_row], student_pos[1:][same_row]
    teacher_start, teacher_stop = teacher_pos[:-1][same_row], teacher_pos[1:][same_row]
    student_width, teacher_width = batch.student_input_ids.shape[1], batch.teacher_input_ids.shape[1]
    if trained is not None:
        positions, chunk = _spans(rows * student_width + student_start, rows * student_width + student_stop)
        left_out = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
        left_out.index_add_(0, chunk, (~trained.reshape(-1)[positions]).long())
        kept = left_out == 0
        rows, student_start, student_stop = rows[kept], student_start[kept], student_stop[kept]
        teacher_start, teacher_stop = teacher_start[kept], teacher_stop[kept]
    student_rows, student_chunk = _spans(rows * student_width + student_start, rows * student_width + student_stop)
    teacher_rows, teacher_chunk = _spans(rows * teacher_width + teacher_start, rows * teacher_width + teacher_stop)
    return LikelihoodChunks(student_rows, student_chunk, teacher_rows, teacher_chunk, len(rows))


def binary_likelihood_kl(student_loglik: Tensor, teacher_loglik: Tensor, temperature: float) -> Tensor:
    """[C]: tokenkit's binary cross-entropy between p_T^(1/τ) and p_S^(1/τ) (each chunk's likelihood as the
    probability of a binary event), less the teacher's binary entropy (a constant of the student: same gradient), so
    it is the binary KL and 0 where the likelihoods agree. In log space: the two-atom distributions
    [ℓ/τ, log(1 - e^(ℓ/τ))] of each side, compared by forward KL (an empty teacher atom contributes exactly 0)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def atoms(loglik: Tensor) -> Tensor:
        scaled = upcast(loglik) / temperature
        return torch.stack([scaled, log1mexp(scaled)], dim=-1)

    return forward_kl(atoms(student_loglik), atoms(teacher_loglik))


def squared_likelihood_difference(student_loglik: Tensor, teacher_loglik: Tensor, temperature: float) -> Tensor:
    """[C]: (ℓ_S - ℓ_T)², the squared difference of the log-likelihoods (no temperature: it reads none)."""
    return (upcast(student_loglik) - upcast(teacher_loglik)).square()


#: `objective.chunk_likelihood_loss` -> the per-chunk loss (student log-likelihoods, teacher's, τ) -> [C].
CHUNK_LOSSES = {"bce": binary_likelihood_kl, "squared": squared_likelihood_difference}
