"""Dual windows: the student's fixed-size training windows, the teacher's tokens for the same text, and their pairs.

Documents are tokenised one at a time by the student and joined by the student's separator token into one stream,
which is cut into consecutive windows of N tokens (a last, shorter window is dropped). For each window, the text it
covers is tokenised by the teacher document piece by document piece, with the teacher's separator where the student
has its own. Both sides live in one byte coordinate system, in which a separator is a zero-length token at the byte
where its document ends; alignment treats it as a boundary both sides share (docs/ALIGNMENT.md).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np

from crosskd.data import stdlib
from crosskd.data.alignment import AlignedPairs, align
from crosskd.data.encoding import EncodedText, encode_with_byte_spans
from crosskd.data.sources import Document

END_OF_TEXT = "<|endoftext|>"
PROTOCOL_SEPARATOR_ID = 0  # the reference student's <|endoftext|>, fixed by the benchmark protocol


@dataclass(frozen=True)
class DualWindow:
    student_ids: np.ndarray  # int64 [N]
    teacher_ids: np.ndarray  # int64 [M], M varies with the text
    pairs: AlignedPairs
    text_bytes: int  # UTF-8 bytes of text the student's tokens cover (separators have none; conversations: responses)
    # bool [N]: the positions whose next token is trained (None: all), e.g. the responses of a conversation
    student_loss_mask: np.ndarray | None = None


def separator_id(tokenizer) -> int:
    """The token that joins documents: `<|endoftext|>` if the vocabulary has it (chat models' eos is often an
    end-of-turn token instead), else the eos token."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    # A missing token converts to the unk id; compare the token itself, because some vocabularies (SmolLM's) use
    # <|endoftext|> as their unk token too.
    if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == END_OF_TEXT:
        return int(token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither {END_OF_TEXT} nor an eos token to separate "
        "documents; pass the separator id explicitly"
    )


@dataclass(frozen=True)
class _StreamTokens:
    """A run of the student's token stream in stream byte coordinates, each token tagged with its document."""

    ids: np.ndarray
    byte_starts: np.ndarray
    byte_ends: np.ndarray
    documents: np.ndarray  # ordinal of the document the token belongs to (a separator belongs to the one it ends)
    separators: np.ndarray  # bool

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def slice(self, start: int, stop: int) -> _StreamTokens:
        return _StreamTokens(*(field[start:stop] for field in self._fields()))

    def _fields(self) -> tuple[np.ndarray, ...]:
        return (self.ids, self.byte_starts, self.byte_ends, self.documents, self.separators)

    @staticmethod
    def concatenate(runs: list[_StreamTokens]) -> _StreamTokens:
        return _StreamTokens(*(np.concatenate(fields) for fields in zip(*(run._fields() for run in runs))))


@dataclass(frozen=True)
class _PlacedDocument:
    data: bytes  # UTF-8 text
    stream_offset: int  # where the document's first byte sits in the stream


def _with_separator(encoded: EncodedText, separator: int, offset: int, ordinal: int) -> _StreamTokens:
    """A document's tokens shifted to the stream, followed by a zero-length separator where the document ends."""
    end = offset + (int(encoded.byte_ends[-1]) if len(encoded) else 0)
    count = len(encoded) + 1
    return _StreamTokens(
        ids=np.append(encoded.ids, separator),
        byte_starts=np.append(encoded.byte_starts + offset, end),
        byte_ends=np.append(encoded.byte_ends + offset, end),
        documents=np.full(count, ordinal, dtype=np.int64),
        separators=np.arange(count) == count - 1,
    )


def _cut(runs: Iterable[_StreamTokens], window_tokens: int) -> Iterator[_StreamTokens]:
    """Consecutive windows of exactly `window_tokens` tokens from a stream of runs, in linear time."""
    parts: list[_StreamTokens] = []
    held = 0
    for run in runs:
        start = 0
        while len(run) - start >= window_tokens - held:
            stop = start + window_tokens - held
            yield _StreamTokens.concatenate([*parts, run.slice(start, stop)])
            parts, held, start = [], 0, stop
        if start < len(run):
            parts.append(run.slice(start, len(run)))
            held += len(run) - start


def _character_span(data: bytes, start: int, stop: int) -> tuple[int, int]:
    """Widen [start, stop) to whole UTF-8 characters: a byte-level student may cut a window inside one."""
    while start > 0 and data[start] & 0xC0 == 0x80:
        start -= 1
    while stop < len(data) and data[stop] & 0xC0 == 0x80:
        stop += 1
    return start, stop


def _teacher_tokens(window: _StreamTokens, placed: dict[int, _PlacedDocument], teacher, separator: int) -> EncodedText:
    """The teacher's tokenisation of the text the window covers, document piece by piece, in stream coordinates."""
    ids, starts, ends = [], [], []
    for ordinal in np.unique(window.documents):
        in_document = window.documents == ordinal
        document = placed[int(ordinal)]
        has_text = in_document & ~window.separators
        if has_text.any():
            start, stop = _character_span(
                document.data,
                int(window.byte_starts[has_text].min()) - document.stream_offset,
                int(window.byte_ends[has_text].max()) - document.stream_offset,
            )
            piece = encode_with_byte_spans(teacher, document.data[start:stop].decode("utf-8"))
            ids.append(piece.ids)
            starts.append(piece.byte_starts + document.stream_offset + start)
            ends.append(piece.byte_ends + document.stream_offset + start)
        if (in_document & window.separators).any():
            document_end = np.array([document.stream_offset + len(document.data)], dtype=np.int64)
            ids.append(np.array([separator], dtype=np.int64))
            starts.append(document_end)
            ends.append(document_end)
    return EncodedText(ids=np.concatenate(ids), byte_starts=np.concatenate(starts), byte_ends=np.concatenate(ends))


def dual_windows(
    documents: Iterable[Document],
    student_tokenizer,
    teacher_tokenizer,
    window_tokens: int,
    *,
    student_separator_id: int | None = None,
    teacher_separator_id: int | None = None,
) -> Iterator[DualWindow]:
    """Stream DualWindows of `window_tokens` student tokens over `documents` (each followed by a separator).

    Separators default to `separator_id` of each tokenizer. Documents are read lazily and forgotten once no window
    needs them, so a corpus is never in memory at once.
    """
    if window_tokens < 2:
        raise ValueError(f"window_tokens must be at least 2 (a position and its next token), got {window_tokens}")
    student_separator = separator_id(student_tokenizer) if student_separator_id is None else student_separator_id
    teacher_separator = separator_id(teacher_tokenizer) if teacher_separator_id is None else teacher_separator_id
    placed: dict[int, _PlacedDocument] = {}

    def student_runs() -> Iterator[_StreamTokens]:
        offset = 0
        for ordinal, document in enumerate(documents):
            data = document.text.encode("utf-8")
            placed[ordinal] = _PlacedDocument(data, offset)
            encoded = encode_with_byte_spans(student_tokenizer, document.text)
            yield _with_separator(encoded, student_separator, offset, ordinal)
            offset += len(data)

    for window in _cut(student_runs(), window_tokens):
        student = EncodedText(ids=window.ids, byte_starts=window.byte_starts, byte_ends=window.byte_ends)
        teacher = _teacher_tokens(window, placed, teacher_tokenizer, teacher_separator)
        yield DualWindow(
            student_ids=window.ids,
            teacher_ids=teacher.ids,
            pairs=align(student, teacher),
            text_bytes=int((window.byte_ends - window.byte_starts).sum()),
        )
        first_needed = int(window.documents[-1])
        for ordinal in [ordinal for ordinal in placed if ordinal < first_needed]:
            del placed[ordinal]


def protocol_documents() -> Iterator[Document]:
    """The benchmark protocol's training documents: the stdlib minus the held-out files, in sorted path order
    shuffled by random.Random(0), read one at a time."""
    root = stdlib.stdlib_root()
    heldout = set(stdlib.HELDOUT_FILES)
    names = [path.relative_to(root).as_posix() for path in stdlib.stdlib_files(root)]
    names = [name for name in names if name not in heldout]
    random.Random(0).shuffle(names)
    return (Document(name, (root / name).read_text(encoding="utf-8")) for name in names)


def protocol_train_windows(student_tokenizer, teacher_tokenizer, count: int = 240, window_tokens: int = 256):
    """The benchmark protocol's first `count` training windows of `window_tokens` student tokens.

    Stdlib files minus the held-out ones, in sorted path order shuffled by random.Random(0).shuffle, each tokenised by
    the student without special tokens and followed by id 0 (<|endoftext|>), concatenated and cut into windows.
    """
    windows = list(
        islice(
            dual_windows(
                protocol_documents(),
                student_tokenizer,
                teacher_tokenizer,
                window_tokens,
                student_separator_id=PROTOCOL_SEPARATOR_ID,
            ),
            count,
        )
    )
    if len(windows) < count:
        raise ValueError(f"the protocol corpus gave only {len(windows)} windows of {window_tokens}, not {count}")
    return windows


def window_ids_sha256(windows: Iterable[DualWindow]) -> str:
    """sha256 of the student window ids as little-endian int32, concatenated: a fingerprint of the training data."""
    digest = hashlib.sha256()
    for window in windows:
        digest.update(np.asarray(window.student_ids, dtype="<i4").tobytes())
    return digest.hexdigest()
