"""Dual windows: packing, the teacher's view of the same text, separators as shared boundaries, the protocol."""

from __future__ import annotations

import hashlib
import itertools
import random

import numpy as np
import pytest
import torch

from crosskd.data import stdlib
from crosskd.data.alignment import AlignedPairs
from crosskd.data.collate import collate_windows
from crosskd.data.encoding import token_bytes_table
from crosskd.data.sources import Document
from crosskd.data.windows import (
    DualWindow,
    dual_windows,
    protocol_documents,
    protocol_train_windows,
    separator_id,
    window_ids_sha256,
)
from crosskd.testing import TRICKY_FRAGMENTS
from crosskd.testing.tiny_tokenizers import TEST_TOKENIZERS, tiny_tokenizer

SEPARATOR = 0  # <|endoftext|> in every tiny tokenizer
TOKENIZER_PAIRS = list(itertools.permutations(sorted(TEST_TOKENIZERS), 2))


def _documents(count: int = 12, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    return [
        Document(f"doc{index}", "".join(rng.choice(TRICKY_FRAGMENTS) for _ in range(rng.randint(1, 12))))
        for index in range(count)
    ]


def _pieces(ids, table) -> list[bytes]:
    """The text between separators as whole characters (a window edge may cut one), a typed '▁' read as the space a
    SentencePiece tokenizer takes it for."""
    pieces, current = [], []
    for token_id in ids.tolist():
        if token_id == SEPARATOR:
            pieces.append(b"".join(current))
            current = []
        else:
            current.append(table[token_id])
    pieces.append(b"".join(current))
    return [_as_spaces(piece.decode("utf-8", errors="ignore").encode("utf-8")) for piece in pieces]


def _as_spaces(data: bytes) -> bytes:
    return data.replace("▁".encode("utf-8"), b" ")


@pytest.mark.parametrize(("student_name", "teacher_name"), TOKENIZER_PAIRS)
def test_windows_pack_the_student_stream_and_the_teacher_sees_the_same_text(student_name, teacher_name):
    student, teacher = tiny_tokenizer(student_name), tiny_tokenizer(teacher_name)
    documents = _documents()
    windows = list(dual_windows(documents, student, teacher, window_tokens=32))

    stream = []
    for document in documents:
        stream += student(document.text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [0]
    assert len(windows) == len(stream) // 32
    assert np.concatenate([w.student_ids for w in windows]).tolist() == stream[: 32 * len(windows)]

    student_table, teacher_table = token_bytes_table(student), token_bytes_table(teacher)
    for window in windows:
        student_pieces = _pieces(window.student_ids, student_table)
        teacher_pieces = _pieces(window.teacher_ids, teacher_table)
        assert len(student_pieces) == len(teacher_pieces)  # a teacher separator wherever the student has one
        for student_piece, teacher_piece in zip(student_pieces, teacher_pieces):
            # Equal but for Metaspace prefix spaces and characters a window edge cuts (the teacher gets them whole,
            # up to 4 bytes at each end).
            student_text = student_piece.removeprefix(b" ")
            assert student_text in teacher_piece
            assert len(teacher_piece) - len(student_text) <= 1 + 4 + 4


def _without_prefix_space(piece: bytes, text: str) -> bytes:
    """Drop the space a Metaspace tokenizer prepends to a document (not part of the text)."""
    return piece[1:] if piece.startswith(b" ") and not text.startswith((" ", "▁")) else piece


@pytest.mark.parametrize(("student_name", "teacher_name"), TOKENIZER_PAIRS)
def test_a_window_of_whole_documents_holds_exactly_their_text(student_name, teacher_name):
    student, teacher = tiny_tokenizer(student_name), tiny_tokenizer(teacher_name)
    documents = _documents(count=5, seed=1)
    (window,) = dual_windows(documents, student, teacher, window_tokens=len(_stream(student, documents)))
    texts = [document.text for document in documents]
    assert window.text_bytes == sum(len(text.encode("utf-8")) for text in texts)
    for ids, tokenizer in ((window.student_ids, student), (window.teacher_ids, teacher)):
        pieces = _pieces(ids, token_bytes_table(tokenizer))
        assert pieces[-1] == b""  # the window ends with the last document's separator
        expected = [_as_spaces(text.encode("utf-8")) for text in texts]
        assert [_without_prefix_space(p, t) for p, t in zip(pieces, texts)] == expected


@pytest.mark.parametrize(("student_name", "teacher_name"), [("bpe300", "bpe700"), ("bpe700", "sentencepiece400")])
def test_separator_is_a_boundary_both_sides_share(student_name, teacher_name):
    student, teacher = tiny_tokenizer(student_name), tiny_tokenizer(teacher_name)
    documents = [Document("a", "def f(x):\n    return x\n"), Document("b", "x = 1\n")]
    (window,) = dual_windows(documents, student, teacher, window_tokens=len(_stream(student, documents)))
    pairs = window.pairs
    student_sep = int(np.flatnonzero(window.student_ids == SEPARATOR)[0])
    teacher_sep = int(np.flatnonzero(window.teacher_ids == SEPARATOR)[0])
    pair_set = set(zip(pairs.student_pos.tolist(), pairs.teacher_pos.tolist()))
    # The positions about to predict the separator are a pair, with no bytes to predict.
    assert (student_sep - 1, teacher_sep - 1) in pair_set
    predicting_separator = pairs.student_pos.tolist().index(student_sep - 1)
    assert pairs.student_next_bytes[predicting_separator] == pairs.teacher_next_bytes[predicting_separator] == 0
    # The next document's first text "x" is predicted from the separators (or, for a SentencePiece side, from the
    # empty prefix '▁' right after its separator, which is not text).
    teacher_before_text = teacher_sep + (1 if teacher_name.startswith("sentencepiece") else 0)
    assert (student_sep, teacher_before_text) in pair_set
    assert (np.diff(pairs.student_pos) > 0).all() and (np.diff(pairs.teacher_pos) > 0).all()


def _stream(tokenizer, documents) -> list[int]:
    ids = []
    for document in documents:
        ids += tokenizer(document.text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [0]
    return ids


def test_windows_are_streamed():
    def documents_then_failure():
        yield from _documents(count=6)
        raise AssertionError("read past what the first window needs")

    student, teacher = tiny_tokenizer("bpe300"), tiny_tokenizer("bpe700")
    first = next(dual_windows(documents_then_failure(), student, teacher, window_tokens=16))
    assert len(first.student_ids) == 16


def test_configurable_separators_and_bad_window_size():
    student, teacher = tiny_tokenizer("bpe300"), tiny_tokenizer("sentencepiece400")
    assert separator_id(student) == separator_id(teacher) == 0
    documents = [Document("a", "x"), Document("b", "y")]
    (window,) = dual_windows(documents, student, teacher, 4, student_separator_id=7, teacher_separator_id=9)
    assert window.student_ids.tolist().count(7) == 2 and window.teacher_ids.tolist().count(9) == 2
    with pytest.raises(ValueError, match="window_tokens must be at least 2"):
        next(dual_windows(documents, student, teacher, 1))


def test_protocol_train_windows_follow_the_protocol():
    student, teacher = tiny_tokenizer("bpe700"), tiny_tokenizer("bpe300")
    windows = protocol_train_windows(student, teacher, count=3, window_tokens=64)

    root = stdlib.stdlib_root()
    names = [p.relative_to(root).as_posix() for p in stdlib.stdlib_files(root)]
    names = [name for name in names if name not in stdlib.HELDOUT_FILES]
    random.Random(0).shuffle(names)
    assert [d.name for d in itertools.islice(protocol_documents(), 3)] == names[:3]
    expected = []
    for name in names:
        expected += student((root / name).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [0]
        if len(expected) >= 3 * 64:
            break
    assert [w.student_ids.tolist() for w in windows] == [expected[i * 64 : (i + 1) * 64] for i in range(3)]

    ints = np.array(expected[: 3 * 64], dtype=np.int64)
    little_endian_int32 = b"".join(int(v).to_bytes(4, "little", signed=True) for v in ints)
    assert window_ids_sha256(windows) == hashlib.sha256(little_endian_int32).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Collation


def test_collate_windows_shifts_targets_pads_the_teacher_and_flattens_pairs():
    student, teacher = tiny_tokenizer("bpe300"), tiny_tokenizer("bpe700")
    windows = list(itertools.islice(dual_windows(_documents(), student, teacher, window_tokens=24), 3))
    assert len({len(w.teacher_ids) for w in windows}) > 1  # the teacher rows really need padding
    batch = collate_windows(windows, teacher_pad_id=5)

    assert batch.student_input_ids.shape == batch.student_targets.shape == (3, 24)
    assert batch.student_targets[:, :-1].tolist() == batch.student_input_ids[:, 1:].tolist()
    assert (batch.student_targets[:, -1] == -100).all()
    assert batch.student_attention_mask.all()
    width = max(len(w.teacher_ids) for w in windows)
    assert batch.teacher_input_ids.shape == batch.teacher_attention_mask.shape == (3, width)
    for row, window in enumerate(windows):
        length = len(window.teacher_ids)
        assert batch.teacher_input_ids[row, :length].tolist() == window.teacher_ids.tolist()
        assert (batch.teacher_input_ids[row, length:] == 5).all()
        assert batch.teacher_attention_mask[row].sum() == length
        in_row = batch.pair_batch == row
        assert batch.pair_student_pos[in_row].tolist() == window.pairs.student_pos.tolist()
        assert batch.pair_teacher_pos[in_row].tolist() == window.pairs.teacher_pos.tolist()
        assert batch.pair_teacher_next_bytes[in_row].tolist() == window.pairs.teacher_next_bytes.tolist()
        assert batch.pair_student_next_bytes[in_row].tolist() == window.pairs.student_next_bytes.tolist()
    assert batch.text_bytes.tolist() == [w.text_bytes for w in windows]
    moved = batch.to("cpu")
    assert moved.student_loss_mask is None  # no loss mask: every target is trained
    assert all(tensor.dtype == torch.int64 for name, tensor in vars(moved).items() if name != "student_loss_mask")


def test_collate_masks_student_padding_in_targets():
    no_pairs = AlignedPairs(*(np.zeros(0, dtype=np.int64) for _ in range(4)))
    short = DualWindow(np.array([3, 4]), np.array([7]), no_pairs, 2)
    full = DualWindow(np.array([3, 4, 5]), np.array([7, 8]), no_pairs, 3)
    batch = collate_windows([short, full], teacher_pad_id=0)
    assert batch.student_targets.tolist() == [[4, -100, -100], [4, 5, -100]]
    assert batch.student_attention_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="no windows"):
        collate_windows([], teacher_pad_id=0)


def test_separator_is_endoftext_even_when_it_is_also_the_unk_token():
    # SmolLM2's <|endoftext|> (id 0) doubles as its unk token; falling back to eos (<|im_end|>) there once changed
    # every window of the benchmark protocol.
    import copy

    from crosskd.data.windows import separator_id
    from crosskd.testing.tiny_tokenizers import END_OF_TEXT, byte_level_bpe

    tokenizer = copy.deepcopy(byte_level_bpe(300))
    tokenizer.add_special_tokens({"unk_token": END_OF_TEXT, "eos_token": "<|im_end|>"})
    assert tokenizer.unk_token_id == tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert tokenizer.eos_token_id != tokenizer.unk_token_id
    assert separator_id(tokenizer) == tokenizer.convert_tokens_to_ids(END_OF_TEXT)
