"""Byte alignment: the pair set equals a brute-force intersection of the two tokenisations' byte boundaries."""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest
from hypothesis import given, settings

from crosskd.data.alignment import AlignedPairs, align, alignment_rate
from crosskd.data.encoding import EncodedText, encode_with_byte_spans
from crosskd.data.report import alignment_report, cli_align_report
from crosskd.testing import assert_exact_byte_spans, mixed_texts
from crosskd.testing.tiny_tokenizers import TEST_TOKENIZERS, tiny_tokenizer

TOKENIZER_PAIRS = list(itertools.permutations(sorted(TEST_TOKENIZERS), 2))


def brute_force_pairs(student: EncodedText, teacher: EncodedText) -> set[tuple[int, int, int, int]]:
    """Every (i, j) whose next tokens both carry text starting at the same byte, by checking all combinations."""
    pairs = set()
    for i in range(len(student) - 1):
        for j in range(len(teacher) - 1):
            student_next = (int(student.byte_starts[i + 1]), int(student.byte_ends[i + 1]))
            teacher_next = (int(teacher.byte_starts[j + 1]), int(teacher.byte_ends[j + 1]))
            both_text = student_next[1] > student_next[0] and teacher_next[1] > teacher_next[0]
            if both_text and student_next[0] == teacher_next[0]:
                pairs.add((i, j, student_next[1] - student_next[0], teacher_next[1] - teacher_next[0]))
    return pairs


def as_set(pairs: AlignedPairs) -> set[tuple[int, int, int, int]]:
    columns = (pairs.student_pos, pairs.teacher_pos, pairs.student_next_bytes, pairs.teacher_next_bytes)
    return set(zip(*(column.tolist() for column in columns)))


@pytest.mark.parametrize(("student_name", "teacher_name"), TOKENIZER_PAIRS)
@settings(max_examples=40, deadline=None)
@given(text=mixed_texts())
def test_pairs_equal_brute_force_intersection_of_byte_boundaries(student_name, teacher_name, text):
    student_tokenizer, teacher_tokenizer = tiny_tokenizer(student_name), tiny_tokenizer(teacher_name)
    student = encode_with_byte_spans(student_tokenizer, text)
    teacher = encode_with_byte_spans(teacher_tokenizer, text)
    assert_exact_byte_spans(student_tokenizer, text, student)
    assert_exact_byte_spans(teacher_tokenizer, text, teacher)

    pairs = align(student, teacher)

    assert as_set(pairs) == brute_force_pairs(student, teacher)
    for column in (pairs.student_pos, pairs.teacher_pos, pairs.student_next_bytes, pairs.teacher_next_bytes):
        assert column.dtype == np.int64
    assert (np.diff(pairs.student_pos) > 0).all() and (np.diff(pairs.teacher_pos) > 0).all()


def test_identical_tokenisations_align_every_position():
    tokenizer = tiny_tokenizer("bpe300")
    encoded = encode_with_byte_spans(tokenizer, "def f(x):\r\n    return x  # 🎉\n")
    pairs = align(encoded, encoded)
    assert pairs.student_pos.tolist() == pairs.teacher_pos.tolist() == list(range(len(encoded) - 1))
    assert alignment_rate(pairs, len(encoded) - 1) == 1.0


def test_byte_fallback_pieces_of_a_character_are_not_aligned_inside_it():
    # The student spells '日本' and '🎉' byte by byte; all pieces of one character share its character offsets, so
    # matching characters would pair every piece with the teacher. On bytes, only the start of ' 🎉' is shared.
    text = "日本 🎉"
    student_tokenizer, teacher_tokenizer = tiny_tokenizer("sentencepiece400"), tiny_tokenizer("bpe700")
    student = encode_with_byte_spans(student_tokenizer, text)
    teacher = encode_with_byte_spans(teacher_tokenizer, text)
    student_tokens = student_tokenizer.convert_ids_to_tokens(student.ids.tolist())
    assert student_tokens == ["▁", "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>", "▁"] + [
        "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"
    ]
    assert student.byte_starts.tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert teacher.byte_starts.tolist() == [0, 6]  # '日本' and ' 🎉'

    pairs = align(student, teacher)

    # Student position 6 (after '本') predicts the space at byte 6, as does teacher position 0.
    assert as_set(pairs) == {(6, 0, 1, 5)}


def _encoded(starts_and_ends) -> EncodedText:
    spans = np.asarray(starts_and_ends, dtype=np.int64)
    return EncodedText(ids=np.arange(len(spans), dtype=np.int64), byte_starts=spans[:, 0], byte_ends=spans[:, 1])


def test_zero_length_separator_is_a_shared_boundary():
    # Student: "ab" | SEP | "cd" ; teacher: "a" "b" | SEP | "cd". SEP has no bytes, both at byte 2.
    student = _encoded([(0, 2), (2, 2), (2, 4)])
    teacher = _encoded([(0, 1), (1, 2), (2, 2), (2, 4)])
    pairs = align(student, teacher)
    assert as_set(pairs) == {(0, 1, 0, 0), (1, 2, 2, 2)}


def test_prepended_space_after_a_separator_has_no_partner():
    # A SentencePiece student prepends an empty '▁' to each document: only the separator is the shared boundary,
    # and the text after the '▁' is aligned with the text after the teacher's separator.
    student = _encoded([(0, 2), (2, 2), (2, 2), (2, 4)])
    teacher = _encoded([(0, 2), (2, 2), (2, 4)])
    pairs = align(student, teacher)
    assert as_set(pairs) == {(0, 0, 0, 0), (2, 1, 2, 2)}


def test_alignment_rate_rejects_an_empty_denominator():
    assert alignment_rate(align(_encoded([(0, 1), (1, 2)]), _encoded([(0, 2)])), 1) == 0.0
    with pytest.raises(ValueError, match="must be positive"):
        alignment_rate(align(_encoded([(0, 1)]), _encoded([(0, 1)])), 0)


def test_alignment_report_and_its_command(tmp_path, capsys):
    text = "def f(x):\r\n    return x  # 日本 🎉\n" * 3
    student, teacher = tiny_tokenizer("sentencepiece400"), tiny_tokenizer("bpe700")
    report = alignment_report(student, teacher, text)
    pairs = align(encode_with_byte_spans(student, text), encode_with_byte_spans(teacher, text))
    assert report.pairs == len(pairs) and 0 < report.rate < 1
    assert report.rate == len(pairs) / (report.student_tokens - 1)

    folders = {}
    for role, tokenizer in (("student", student), ("teacher", teacher)):
        folders[role] = tmp_path / role
        tokenizer.save_pretrained(folders[role])
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    args = argparse.Namespace(student=str(folders["student"]), teacher=str(folders["teacher"]), text_file=None)
    args.text_file = str(tmp_path / "text.txt")
    assert cli_align_report(args) == 0
    assert f"alignment rate:  {report.rate:.2%}" in capsys.readouterr().out
    args.text_file = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli_align_report(args)
