"""The student's LM cross-entropy and its distillation term, fused over chunks of positions.

The student's logits are never built for the whole batch: for each chunk of positions the logits are computed
from the final hidden states and the output embedding in float32, and both losses are taken from that one chunk.
The first chunks' log-probabilities are kept for the backward, up to a byte budget; past it,
``torch.utils.checkpoint`` discards each chunk so that backward recomputes it (its head matmul and log-softmax
again) instead of keeping every chunk's logits alive. With a budget of 0 peak memory is a few [chunk, V] float32
buffers, forward and backward.

Everything returns sums with their counts: the trainer divides by counts over the whole accumulated batch
(all micro-batches, all processes), which a per-micro-batch mean would get wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from crosskd.data.collate import IGNORE_INDEX
from crosskd.losses.chunking import DEFAULT_CHUNK_ROWS, DEFAULT_KEPT_LOGIT_BYTES, chunk_slices, upcast
from crosskd.losses.divergences import Divergence, get_divergence
from crosskd.losses.target import MappedTarget, StudentGroups, support_atoms
from crosskd.models.memory import FLOAT32_BYTES

#: (student log-probabilities of some positions [p, V] float32, the target at those positions) -> (sum, count).
KDLossSum = Callable[[Tensor, Any], tuple[Tensor, int]]


class LossSums(NamedTuple):
    lm_sum: Tensor
    lm_count: int
    kd_sum: Tensor
    kd_count: int
    # float32 [N]: each row's log-probability of its LM target (0 where the row has none), when asked for.
    lm_token_logp: Tensor | None = None


def divergence_loss_sum(
    student_logp: Tensor, target: MappedTarget, divergence: Divergence, temperature: float,
    groups: StudentGroups | None = None,
) -> tuple[Tensor, int]:
    """Sum over positions of ``divergence`` between the student's and the teacher's atoms at ``temperature``, from
    the student's float32 log-probabilities (with ``groups``, a support id's atom pools its group)."""
    student, teacher = support_atoms(student_logp, target, temperature, groups, normalized=True)
    return divergence(student, teacher).sum(), len(student_logp)


def _empty_sum(hidden: Tensor) -> Tensor:
    # A zero that is still part of the graph, so backward works (and gives zero gradients) when nothing counts.
    return upcast(hidden[:0]).sum()


def _chunk_sums(
    hidden: Tensor,
    head_weight: Tensor,
    lm_targets: Tensor,
    kd_count: int,
    kd_target: Any,
    kd_loss_sum: KDLossSum | None,
    keep_token_logp: bool = False,
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """Both sums of one chunk whose first ``kd_count`` rows are the KD rows (a slice, so no gather of [p, V]), and
    with ``keep_token_logp`` each row's log-probability of its LM target."""
    # One log_softmax serves both terms (cross-entropy is log_softmax + nll_loss).
    logp = F.linear(upcast(hidden), upcast(head_weight)).log_softmax(-1)
    # reduction="sum" over a chunk whose targets are all ignored is 0, where "mean" would be 0/0.
    lm_sum = F.nll_loss(logp, lm_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    token_logp = None
    if keep_token_logp:
        has_target = lm_targets != IGNORE_INDEX
        token_logp = logp.gather(-1, lm_targets.clamp_min(0).unsqueeze(-1)).squeeze(-1).masked_fill(~has_target, 0.0)
    if kd_count == 0:
        return lm_sum, _empty_sum(hidden), 0, token_logp
    # A chunk of KD rows only passes its log-probabilities whole: the backward of a slice would allocate a zero
    # [p, V] gradient and copy into it.
    kd_sum, kd_count = kd_loss_sum(logp if kd_count == len(logp) else logp[:kd_count], kd_target)
    return lm_sum, kd_sum, kd_count, token_logp


def fused_chunked_losses(
    hidden: Tensor,
    head_weight: Tensor,
    lm_targets: Tensor,
    kd_rows: Tensor,
    kd_target: Any,
    kd_loss_sum: KDLossSum | None,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    keep_token_logp: bool = False,
    kept_logit_bytes: int = DEFAULT_KEPT_LOGIT_BYTES,
) -> LossSums:
    """LM cross-entropy on rows with a target, and ``kd_loss_sum`` on ``kd_rows``, one chunk of logits at a time.
    ``keep_token_logp``: also return each row's log-probability of its LM target from the same chunks (a term that
    reads the student's likelihood of its observed tokens, crosskd.losses.likelihood), no second pass.
    ``kept_logit_bytes``: the chunks whose float32 log-probabilities (and, for a 16-bit head, one shared float32 copy
    of it) fit in this many bytes keep them for the backward; the others are recomputed there (`kept_chunks`).
    Values and gradients are the same either way.

    hidden [N, H] and head_weight [V, H] give the logits; lm_targets [N] (IGNORE_INDEX = not counted);
    kd_rows [P] distinct row indices into N whose targets are ``kd_target`` positions 0..P-1 (anything with
    ``select``). Only rows used by either term are computed, each once: the KD rows first, in their order, then the
    rows only the LM term uses, so each chunk's KD rows and targets are contiguous slices.
    """
    if len(kd_rows) and (kd_target is None or kd_loss_sum is None):
        raise ValueError("kd_rows given without a kd_target and kd_loss_sum")
    if kd_target is not None and len(kd_target.ids) != len(kd_rows):
        raise ValueError(f"kd_target has {len(kd_target.ids)} positions but kd_rows has {len(kd_rows)}")
    lm_rows = (lm_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    is_kd_row = torch.zeros(len(lm_targets), dtype=torch.bool, device=lm_targets.device)
    is_kd_row[kd_rows] = True
    if int(is_kd_row.sum()) != len(kd_rows):
        raise ValueError("kd_rows repeat a row: each aligned pair has its own student position")
    rows = torch.cat([kd_rows, lm_rows[~is_kd_row[lm_rows]]])
    chunks = list(chunk_slices(len(rows), chunk_size))
    is_float32_or_wider = torch.promote_types(head_weight.dtype, torch.float32) == head_weight.dtype
    kept = kept_chunks([chunk.stop - chunk.start for chunk in chunks], head_weight.shape[0], kept_logit_bytes,
                       0 if is_float32_or_wider else head_weight.numel() * FLOAT32_BYTES)
    # One float32 copy of a 16-bit head serves every kept chunk (each would otherwise keep its own); a checkpointed
    # chunk upcasts inside, so its copy is freed with it.
    kept_head_weight = upcast(head_weight) if kept else head_weight
    lm_sum = kd_sum = _empty_sum(hidden)
    kd_count = 0
    token_logp_parts = []
    for index, chunk in enumerate(chunks):
        kd_here = slice(min(chunk.start, len(kd_rows)), min(chunk.stop, len(kd_rows)))
        kd_rows_here = kd_here.stop - kd_here.start
        chunk_rows = rows[chunk]
        chunk_arguments = (lm_targets[chunk_rows], kd_rows_here, kd_target.select(kd_here) if kd_rows_here else None,
                           kd_loss_sum, keep_token_logp)
        if index < kept:
            chunk_sums = _chunk_sums(hidden[chunk_rows], kept_head_weight, *chunk_arguments)
        else:
            chunk_sums = checkpoint(_chunk_sums, hidden[chunk_rows], head_weight, *chunk_arguments,
                                    use_reentrant=False)
        chunk_lm, chunk_kd, chunk_kd_count, chunk_token_logp = chunk_sums
        lm_sum = lm_sum + chunk_lm
        kd_sum = kd_sum + chunk_kd
        kd_count += chunk_kd_count
        token_logp_parts.append(chunk_token_logp)
    token_logp = None
    if keep_token_logp:
        token_logp = upcast(hidden.new_zeros(len(lm_targets))).scatter(0, rows, torch.cat(
            token_logp_parts or [upcast(hidden.new_zeros(0))]))
    return LossSums(lm_sum, len(lm_rows), kd_sum, kd_count, token_logp)


def kept_chunks(chunk_rows: list[int], vocab_size: int, kept_logit_bytes: int, head_copy_bytes: int = 0) -> int:
    """How many of the leading chunks (their row counts) keep their [rows, vocab_size] float32 log-probabilities for
    the backward within ``kept_logit_bytes``, after ``head_copy_bytes`` (a 16-bit head's float32 copy)."""
    used = head_copy_bytes
    kept = 0
    for rows in chunk_rows:
        used += rows * vocab_size * FLOAT32_BYTES
        if used > kept_logit_bytes:
            break
        kept += 1
    return kept


def student_forward_kwargs(batch, attentions: bool = False) -> dict:
    """The arguments of the one student forward (training, projector pre-fit, retention): every hidden state, and
    `logits_to_keep=1`, which stops the LM head from building [B, N, V] logits; the losses compute them chunk by chunk
    from the final hidden state (`hidden_states[-1]`, after the norm)."""
    return dict(input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask,
                output_hidden_states=True, output_attentions=attentions, logits_to_keep=1)


def chunked_cross_entropy(
    hidden: Tensor, head_weight: Tensor, targets: Tensor, chunk_size: int = DEFAULT_CHUNK_ROWS,
    kept_logit_bytes: int = DEFAULT_KEPT_LOGIT_BYTES,
) -> tuple[Tensor, int]:
    """(sum of the cross-entropy over rows whose target is not IGNORE_INDEX, number of such rows)."""
    no_kd = torch.empty(0, dtype=torch.int64, device=targets.device)
    sums = fused_chunked_losses(hidden, head_weight, targets, no_kd, None, None, chunk_size,
                                kept_logit_bytes=kept_logit_bytes)
    return sums.lm_sum, sums.lm_count


def chunked_lm_and_kd(
    hidden: Tensor,
    head_weight: Tensor,
    lm_targets: Tensor,
    kd_rows: Tensor,
    kd_target: MappedTarget,
    temperature: float,
    divergence: Divergence | str,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    scale_by_t2: bool = True,
    student_groups: StudentGroups | None = None,
    kept_logit_bytes: int = DEFAULT_KEPT_LOGIT_BYTES,
) -> LossSums:
    """LM cross-entropy plus ``divergence`` between student and teacher atoms on the (mapped) support.

    ``divergence`` is a divergence from :func:`get_divergence` or its name. With ``scale_by_t2`` the KD sum is
    multiplied by temperature**2, which keeps its gradient on the same scale whatever the temperature.
    ``student_groups`` pools each support id's group into its atom (the target's ids must be group roots).
    """
    if isinstance(divergence, str):
        divergence = get_divergence(divergence)
    kd_loss_sum = divergence_kd_loss(divergence, temperature, student_groups)
    sums = fused_chunked_losses(hidden, head_weight, lm_targets, kd_rows, kd_target, kd_loss_sum, chunk_size,
                                kept_logit_bytes=kept_logit_bytes)
    return sums._replace(kd_sum=scale_kd_sum(sums.kd_sum, temperature, scale_by_t2))


def divergence_kd_loss(divergence: Divergence, temperature: float, groups: StudentGroups | None = None) -> KDLossSum:
    """The per-chunk KD sum of ``divergence`` at ``temperature`` (``groups``: pooled student atoms)."""
    return functools.partial(divergence_loss_sum, divergence=divergence, temperature=temperature, groups=groups)


def scale_kd_sum(kd_sum: Tensor, temperature: float, scale_by_t2: bool) -> Tensor:
    """A KL-type KD sum times temperature**2 (``scale_by_t2``), which keeps its gradient on the same scale whatever
    the temperature."""
    return kd_sum * temperature**2 if scale_by_t2 else kd_sum
