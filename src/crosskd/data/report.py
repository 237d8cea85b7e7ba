"""`crosskd align-report`: how well two tokenizers' boundaries line up on a text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crosskd.data import stdlib
from crosskd.data.alignment import align, alignment_rate
from crosskd.data.encoding import encode_with_byte_spans
from crosskd.models.reference import reference_model_dirs
from crosskd.models.vocab import require_fast_tokenizer


@dataclass(frozen=True)
class AlignmentReport:
    student_tokens: int
    teacher_tokens: int
    pairs: int
    rate: float  # pairs / student positions that predict a token
    student_next_longer_share: float  # share of pairs where the student's next token has more bytes


def alignment_report(student_tokenizer, teacher_tokenizer, text: str) -> AlignmentReport:
    student = encode_with_byte_spans(student_tokenizer, text)
    teacher = encode_with_byte_spans(teacher_tokenizer, text)
    pairs = align(student, teacher)
    longer = pairs.student_next_bytes > pairs.teacher_next_bytes
    return AlignmentReport(
        student_tokens=len(student),
        teacher_tokens=len(teacher),
        pairs=len(pairs),
        rate=alignment_rate(pairs, len(student) - 1),
        student_next_longer_share=float(np.mean(longer)) if len(pairs) else 0.0,
    )


def _load_tokenizer(path: str, role: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    require_fast_tokenizer(tokenizer, role)
    return tokenizer


def cli_align_report(args) -> int:
    student_path, teacher_path = args.student, args.teacher
    if student_path is None or teacher_path is None:
        reference = reference_model_dirs()
        student_path = student_path or str(reference.student_dir)
        teacher_path = teacher_path or str(reference.teacher_dir)
    if args.text_file:
        if not Path(args.text_file).is_file():
            raise FileNotFoundError(f"--text-file {args.text_file} does not exist; pass a UTF-8 text file to align")
        # Bytes, not read_text: text mode would turn CRLF into LF and change what is tokenised.
        text, text_name = Path(args.text_file).read_bytes().decode("utf-8", errors="replace"), args.text_file
    else:
        text, text_name = stdlib.heldout_text(), "held-out stdlib text (benchmark protocol)"
    report = alignment_report(_load_tokenizer(student_path, "student"), _load_tokenizer(teacher_path, "teacher"), text)
    print(f"text:            {text_name} ({len(text.encode('utf-8')):,} bytes)")
    print(f"student:         {student_path} ({report.student_tokens:,} tokens)")
    print(f"teacher:         {teacher_path} ({report.teacher_tokens:,} tokens)")
    print(f"aligned pairs:   {report.pairs:,}")
    print(f"alignment rate:  {report.rate:.2%} of student positions have a teacher partner")
    print(f"student longer:  {report.student_next_longer_share:.2%} of pairs (student's next token has more bytes)")
    return 0
