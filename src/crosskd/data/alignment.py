"""Byte alignment of two tokenisations of the same text.

Pair (i, j) means the byte where student token i+1 starts equals the byte where teacher token j+1 starts: both models
are about to predict text from the same byte, so their next-token distributions can be compared.

Zero-length tokens (a document separator, a space a SentencePiece tokenizer prepended) stand for no bytes. They are
boundaries, not text: predicting one is matched only with predicting the other side's first zero-length token at the
same byte, and predicting the text after it is matched with predicting that same text. See docs/ALIGNMENT.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crosskd.data.encoding import EncodedText


@dataclass(frozen=True)
class AlignedPairs:
    """Aligned positions (strictly increasing on both sides) and the byte length of each side's next token."""

    student_pos: np.ndarray  # int64 [P]
    teacher_pos: np.ndarray  # int64 [P]
    student_next_bytes: np.ndarray  # int64 [P]: bytes of student token student_pos+1 (0 for a separator)
    teacher_next_bytes: np.ndarray  # int64 [P]: bytes of teacher token teacher_pos+1

    def __len__(self) -> int:
        return int(self.student_pos.shape[0])


def _next_token_keys(encoded: EncodedText) -> tuple[np.ndarray, np.ndarray]:
    """(key, position) for each position i < n-1, keyed by what token i+1 starts; first occurrence of each key.

    key = 2 * byte_start + (token has bytes): a zero-length token at byte b sorts just before text starting at b. Keys
    never decrease along the tokens, so keeping first occurrences leaves them strictly increasing with position.
    """
    next_starts = encoded.byte_starts[1:]
    next_has_bytes = encoded.byte_ends[1:] > next_starts
    keys = 2 * next_starts + next_has_bytes
    unique_keys, first_positions = np.unique(keys, return_index=True)
    return unique_keys, first_positions.astype(np.int64)


def align(student: EncodedText, teacher: EncodedText) -> AlignedPairs:
    """Every (student position, teacher position) pair about to predict from the same byte."""
    return pairs_of_keys(student, teacher, *_next_token_keys(student), *_next_token_keys(teacher))


def pairs_of_keys(student: EncodedText, teacher: EncodedText, student_keys: np.ndarray, student_positions: np.ndarray,
                  teacher_keys: np.ndarray, teacher_positions: np.ndarray) -> AlignedPairs:
    """The pairs of positions with equal keys, where each side's keys are unique and increase with position (what
    each side is about to predict, e.g. `_next_token_keys`)."""
    _, student_index, teacher_index = np.intersect1d(
        student_keys, teacher_keys, assume_unique=True, return_indices=True
    )
    student_pos = student_positions[student_index]
    teacher_pos = teacher_positions[teacher_index]
    return AlignedPairs(
        student_pos=student_pos,
        teacher_pos=teacher_pos,
        student_next_bytes=student.byte_ends[student_pos + 1] - student.byte_starts[student_pos + 1],
        teacher_next_bytes=teacher.byte_ends[teacher_pos + 1] - teacher.byte_starts[teacher_pos + 1],
    )


def alignment_rate(pairs: AlignedPairs, n_student_positions: int) -> float:
    """Share of student positions with a teacher partner; `n_student_positions` counts positions that predict a token
    (a sequence of n tokens has n-1)."""
    if n_student_positions <= 0:
        raise ValueError(f"n_student_positions must be positive, got {n_student_positions}: the text gave no position")
    return len(pairs) / n_student_positions
