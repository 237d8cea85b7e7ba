"""Batches of dual windows as torch tensors, with the flat aligned-pair tensors (docs/ARCHITECTURE.md, "The contracts
between stages")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from crosskd.data.windows import DualWindow

IGNORE_INDEX = -100  # what torch's cross_entropy skips


@dataclass(frozen=True)
class DualBatch:
    student_input_ids: torch.Tensor  # int64 [B, N]
    student_targets: torch.Tensor  # int64 [B, N]: next token, IGNORE_INDEX at the last position and padding
    student_attention_mask: torch.Tensor  # int64 [B, N]
    teacher_input_ids: torch.Tensor  # int64 [B, M_max], right-padded with the teacher's pad id
    teacher_attention_mask: torch.Tensor  # int64 [B, M_max]
    pair_batch: torch.Tensor  # int64 [P]: row of each pair
    pair_student_pos: torch.Tensor  # int64 [P]
    pair_teacher_pos: torch.Tensor  # int64 [P]
    pair_student_next_bytes: torch.Tensor  # int64 [P]
    pair_teacher_next_bytes: torch.Tensor  # int64 [P]
    text_bytes: torch.Tensor  # int64 [B]: UTF-8 bytes each student window covers
    # bool [B, N]: the student positions whose next token is trained (None: all with a target). Every term leaves
    # the others out (crosskd.losses.selection), e.g. the prompt of an instruction example.
    student_loss_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> DualBatch:
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        return DualBatch(**{name: None if value is None else value.to(device) for name, value in values.items()})


def _right_padded(rows: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        mask[index, : len(row)] = 1
    return ids, mask


def collate_windows(windows: Sequence[DualWindow], teacher_pad_id: int, student_pad_id: int = 0) -> DualBatch:
    """Stack windows into a DualBatch; student rows of unequal length are right-padded with `student_pad_id`."""
    if not windows:
        raise ValueError("collate_windows got no windows; a batch needs at least one")
    student_ids, student_mask = _right_padded([window.student_ids for window in windows], student_pad_id)
    teacher_ids, teacher_mask = _right_padded([window.teacher_ids for window in windows], teacher_pad_id)
    targets = torch.full_like(student_ids, IGNORE_INDEX)
    targets[:, :-1] = student_ids[:, 1:]
    targets[:, :-1][student_mask[:, 1:] == 0] = IGNORE_INDEX
    pairs = [window.pairs for window in windows]
    loss_mask = None
    if any(window.student_loss_mask is not None for window in windows):
        loss_mask = torch.zeros_like(student_ids, dtype=torch.bool)  # padding is never trained
        for row, window in enumerate(windows):
            trained = window.student_loss_mask
            loss_mask[row, : len(window.student_ids)] = True if trained is None else torch.from_numpy(trained)

    def flat(column: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(p, column) for p in pairs]).astype(np.int64))

    return DualBatch(
        student_input_ids=student_ids,
        student_targets=targets,
        student_attention_mask=student_mask,
        teacher_input_ids=teacher_ids,
        teacher_attention_mask=teacher_mask,
        pair_batch=torch.from_numpy(np.repeat(np.arange(len(pairs), dtype=np.int64), [len(p) for p in pairs])),
        pair_student_pos=flat("student_pos"),
        pair_teacher_pos=flat("teacher_pos"),
        pair_student_next_bytes=flat("student_next_bytes"),
        pair_teacher_next_bytes=flat("teacher_next_bytes"),
        text_bytes=torch.tensor([window.text_bytes for window in windows], dtype=torch.int64),
        student_loss_mask=loss_mask,
    )
