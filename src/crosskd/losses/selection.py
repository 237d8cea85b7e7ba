"""Which positions of a micro-batch each term trains on: built once per micro-batch, read by every loss and by the
step's position counts, so a rule that leaves a position out lives in one place.

- LM rows: student positions with a next-token target (`IGNORE_INDEX` elsewhere: the last position and padding).
- KD rows: the aligned pairs the vocabulary transfer trains on (`VocabularyTransfer.kd_pairs`), as flat student rows.
- Feature pairs: the aligned pairs of the hidden-state and attention terms, without window position 0 on either side
  (the attention sink, see losses/features.py).
- Likelihood chunks (only for a transfer that reads them): the text between consecutive aligned pairs of a row
  (crosskd.losses.likelihood); a chunk with a masked-out position is left out whole.
- A per-position loss mask (`DualBatch.student_loss_mask`, e.g. the response tokens of instruction data) removes
  student positions from every term: an LM target, a KD pair or a feature pair at a masked-out position is not
  trained and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from crosskd.data.collate import IGNORE_INDEX, DualBatch
from crosskd.losses.features import AlignedPairs
from crosskd.losses.likelihood import LikelihoodChunks, likelihood_chunks

COUNT_KEYS = ("lm", "kd", "features", "chunks")


@dataclass(frozen=True)
class PositionSelection:
    lm_targets: Tensor  # int64 [B * N]: the student's flat next-token targets, IGNORE_INDEX where LM does not train
    kd_pairs: Tensor  # bool [P]: the aligned pairs in the KD term (and in the transfer's extra terms)
    kd_rows: Tensor  # int64 [P_kd]: their flat student rows (row * N + position), in pair order
    feature_pairs: AlignedPairs  # the pairs of the hidden-state and attention terms
    chunks: LikelihoodChunks | None = None  # the likelihood chunks, when the transfer reads them

    def counts(self) -> dict[str, Tensor]:
        """Positions each per-token term trains on in this micro-batch, by count key."""
        return {
            "lm": (self.lm_targets != IGNORE_INDEX).sum(),
            "kd": self.kd_pairs.sum(),
            "features": torch.as_tensor(len(self.feature_pairs)),
            "chunks": torch.as_tensor(self.chunks.count if self.chunks is not None else 0),
        }


def select_positions(batch: DualBatch, kd_pairs: Tensor, with_chunks: bool = False) -> PositionSelection:
    """The selection of `batch`, where `kd_pairs` (bool [P]) are the pairs the vocabulary transfer keeps;
    `with_chunks`: with the likelihood chunks."""
    lm_targets = batch.student_targets.reshape(-1)
    pairs = AlignedPairs(batch.pair_batch, batch.pair_student_pos, batch.pair_teacher_pos)
    feature_pairs = pairs.without_window_start()
    trained = None
    if batch.student_loss_mask is not None:
        trained = batch.student_loss_mask.bool()
        lm_targets = lm_targets.masked_fill(~trained.reshape(-1), IGNORE_INDEX)
        kd_pairs = kd_pairs & trained[batch.pair_batch, batch.pair_student_pos]
        feature_pairs = feature_pairs.where(trained[feature_pairs.batch, feature_pairs.student_pos])
    kd_rows = (batch.pair_batch * batch.student_input_ids.shape[1] + batch.pair_student_pos)[kd_pairs]
    chunks = likelihood_chunks(batch, trained) if with_chunks else None
    return PositionSelection(lm_targets, kd_pairs, kd_rows, feature_pairs, chunks)


def step_counts(selections: list[PositionSelection], accelerator=None) -> dict[str, Tensor]:
    """Valid positions of each per-token term over the whole optimizer step: every micro-batch, every process."""
    device = selections[0].lm_targets.device
    per_micro_batch = [selection.counts() for selection in selections]
    counts = {key: sum(micro_batch[key] for micro_batch in per_micro_batch) for key in COUNT_KEYS}
    counts = {key: torch.as_tensor(value, dtype=torch.float64, device=device) for key, value in counts.items()}
    if accelerator is not None and accelerator.num_processes > 1:
        counts = {key: accelerator.reduce(value, reduction="sum") for key, value in counts.items()}
    return counts
