"""Tokenisation with exact UTF-8 byte spans: what every cross-tokenizer computation stands on.

Fast tokenizers report offsets in characters. Byte-fallback tokenizers split one character into several tokens that
share the same character span ('日' -> two tokens, '🎉' -> three), and byte-level BPEs cut characters too, so character
offsets cannot say how many bytes each of those tokens consumed. Here every token gets a byte span [start, end) into
the UTF-8 encoding of the text, computed from the bytes each token stands for and checked against the text.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from crosskd.models.vocab import require_fast_tokenizer

METASPACE = "▁"
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class EncodedText:
    """Token ids with the byte span of each token in the UTF-8 text."""

    ids: np.ndarray  # int64 [n]
    byte_starts: np.ndarray  # int64 [n]
    byte_ends: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


# ---------------------------------------------------------------------------------------------------------------------
# What each token id stands for, in bytes


@lru_cache(maxsize=1)
def gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE writes byte b as a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + shifted)] = b
            shifted += 1
    return mapping


def _pipeline_text(tokenizer) -> dict[str, str]:
    """The normalizer, pre-tokenizer, decoder and model settings of a fast tokenizer, as JSON text per component."""
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    model_settings = {key: value for key, value in pipeline["model"].items() if key not in ("vocab", "merges")}
    parts = {part: pipeline.get(part) for part in ("normalizer", "pre_tokenizer", "decoder")}
    parts["model"] = model_settings
    return {part: json.dumps(settings, ensure_ascii=False) for part, settings in parts.items()}


def _uses_metaspace(pipeline: dict[str, str]) -> bool:
    """SentencePiece-style: spaces become '▁' before tokenising (a Metaspace pre-tokenizer or a normalizer)."""
    return any(METASPACE in pipeline[part] for part in ("normalizer", "pre_tokenizer", "decoder"))


def _byte_level_token_bytes(token: str) -> bytes | None:
    table = gpt2_unicode_to_byte()
    if not all(ch in table for ch in token):
        return None  # not reachable from text: the byte-level pre-tokenizer only ever produces table characters
    return bytes(table[ch] for ch in token)


def _sentencepiece_token_bytes(token: str, byte_fallback: bool) -> bytes:
    if byte_fallback and _BYTE_FALLBACK_TOKEN.fullmatch(token):
        return bytes([int(token[3:5], 16)])
    return token.replace(METASPACE, " ").encode("utf-8")


def token_bytes_table(tokenizer) -> list[bytes | None]:
    """For each id 0..len(tokenizer)-1, the exact bytes the token stands for inside a text.

    Byte-level BPE tokens are decoded through GPT-2's byte<->unicode table; byte-fallback tokens `<0xNN>` are that one
    byte; a SentencePiece `▁` is a space. None marks ids that never stand for text: special/control tokens, ids
    without a token, empty tokens and byte-level tokens outside the byte alphabet.
    """
    require_fast_tokenizer(tokenizer)
    pipeline = _pipeline_text(tokenizer)
    byte_level = '"ByteLevel"' in pipeline["pre_tokenizer"] or '"ByteLevel"' in pipeline["decoder"]
    metaspace = _uses_metaspace(pipeline)
    byte_fallback = '"byte_fallback": true' in pipeline["model"]
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    table: list[bytes | None] = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in added:
            # Added tokens match the raw text, so a non-special one stands for its content verbatim.
            entry = None if added[token_id].special else added[token_id].content.encode("utf-8")
        elif token is None:
            entry = None
        elif byte_level:
            entry = _byte_level_token_bytes(token)
        elif metaspace:
            entry = _sentencepiece_token_bytes(token, byte_fallback)
        else:
            entry = token.encode("utf-8")
        table.append(entry or None)
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Byte spans


@dataclass(frozen=True)
class _TokenByteArrays:
    """token_bytes_table as flat arrays, so that spans of millions of tokens are computed without a Python loop."""

    flat: np.ndarray  # uint8: every token's bytes concatenated
    offsets: np.ndarray  # int64 [V]: where token v's bytes start in `flat`
    lengths: np.ndarray  # int64 [V]: byte length of token v, -1 if it stands for no text
    leading_space: np.ndarray  # bool [V]: the token's bytes start with a space (a candidate for Metaspace's prefix)
    metaspace: bool  # a '▁' typed in the text becomes the same token as a space


_BYTE_ARRAYS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_byte_arrays(tokenizer) -> _TokenByteArrays:
    cached = _BYTE_ARRAYS_CACHE.get(tokenizer)
    if cached is not None and len(cached.lengths) == len(tokenizer):  # rebuilt if tokens were added since
        return cached
    table = token_bytes_table(tokenizer)
    lengths = np.array([-1 if entry is None else len(entry) for entry in table], dtype=np.int64)
    offsets = np.zeros(len(table), dtype=np.int64)
    np.cumsum(np.maximum(lengths, 0)[:-1], out=offsets[1:])
    arrays = _TokenByteArrays(
        flat=np.frombuffer(b"".join(entry or b"" for entry in table), dtype=np.uint8),
        offsets=offsets,
        lengths=lengths,
        leading_space=np.array([entry is not None and entry[:1] == b" " for entry in table], dtype=bool),
        metaspace=_uses_metaspace(_pipeline_text(tokenizer)),
    )
    _BYTE_ARRAYS_CACHE[tokenizer] = arrays
    return arrays


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


# A fast tokenizer's output for a whole text costs about 400 bytes per character (token strings, offset tuples,
# Python lists): an 8 MB document peaked at 3.3 GB. Longer texts are tokenised in pieces of about this many
# characters, so memory is bounded by the piece and the result (24 bytes per token). No document of the stdlib
# corpus is this long (its longest, pydoc_data/topics.py, has ~0.76 M), so the reference runs tokenise as before.
PIECE_CHARS = 1 << 20
# Context either side of a cut in which cutting must not change a token (checked by tokenising it both ways).
SEAM_CHARS = 2048
SEAM_TRIES = 8  # candidate cuts tried per piece before the text is tokenised whole
# Where pre-tokenizers split anyway: before the space between two word characters, after a newline between visible
# ones (the seam check decides; these only make it likely to pass).
_CUT_CANDIDATE = re.compile(r"(?<=\w)(?= \w)|(?<=\S\n)(?=\S)")


def encode_with_byte_spans(tokenizer, text: str) -> EncodedText:
    """Tokenise `text` as plain text (special-token strings are text, no BOS/EOS added) with exact byte spans.

    Spans are contiguous and non-overlapping, each span's bytes are the token's bytes and together they are the UTF-8
    text. The one exception is the space a Metaspace (SentencePiece) tokenizer prepends to the text: it is not in the
    text, so the token carrying it spans one byte less (an empty span if the token is just '▁').

    A text longer than `PIECE_CHARS` is tokenised in pieces, cut only where tokenising the `SEAM_CHARS` around the
    cut in one go gives the same tokens as in two (where pre-tokenizers split anyway: `_CUT_CANDIDATE`); where no
    such cut is found the rest is tokenised whole. Either way the ids and spans are those of the whole text.
    """
    require_fast_tokenizer(tokenizer)
    if len(text) <= PIECE_CHARS:
        return _encode_piece(tokenizer, text)
    pieces, start = [], 0
    while start < len(text):
        cut = _seamless_cut(tokenizer, text, start + PIECE_CHARS) if start + PIECE_CHARS < len(text) else len(text)
        if cut is None:
            if not pieces:
                return _encode_piece(tokenizer, text)
            cut = len(text)
        pieces.append(text[start:cut])
        start = cut
    return _joined(tokenizer, pieces)


def _seamless_cut(tokenizer, text: str, near: int) -> int | None:
    """The first cut at or after `near` that changes no token around it, or None after `SEAM_TRIES` candidates."""
    for attempt, match in enumerate(_CUT_CANDIDATE.finditer(text, near)):
        if attempt == SEAM_TRIES:
            return None
        cut = match.start()
        left, right = text[max(0, cut - SEAM_CHARS) : cut], text[cut : cut + SEAM_CHARS]
        if np.array_equal(_encode_piece(tokenizer, left + right).ids, _joined(tokenizer, [left, right]).ids):
            return cut
    return None


def _joined(tokenizer, pieces: list[str]) -> EncodedText:
    """Consecutive pieces of one text tokenised one by one, as one encoding: each piece's spans shifted by the bytes
    of the pieces before it."""
    encoded = [_encode_piece(tokenizer, piece) for piece in pieces]
    shifts = np.cumsum([0] + [len(piece.encode("utf-8")) for piece in pieces[:-1]])
    return EncodedText(
        ids=np.concatenate([part.ids for part in encoded]),
        byte_starts=np.concatenate([part.byte_starts + shift for part, shift in zip(encoded, shifts)]),
        byte_ends=np.concatenate([part.byte_ends + shift for part, shift in zip(encoded, shifts)]),
    )


def _encode_piece(tokenizer, text: str) -> EncodedText:
    encoding = tokenizer(
        text,
        add_special_tokens=False,
        split_special_tokens=True,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    char_spans = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    arrays = _token_byte_arrays(tokenizer)
    # A Metaspace tokenizer reads a typed '▁' as a space: its tokens are checked against the text seen that way, and
    # each typed '▁' a token covers then widens its span from 1 to 3 bytes.
    typed_metaspaces = arrays.metaspace and METASPACE in text
    seen_text = text.replace(METASPACE, " ") if typed_metaspaces else text
    seen_bytes = np.frombuffer(seen_text.encode("utf-8"), dtype=np.uint8)
    lengths = arrays.lengths[ids]
    _require_text_tokens(tokenizer, ids, lengths)
    prefix_spaces = _prepended_spaces(arrays, ids, char_spans[:, 0], text, int(lengths.sum()) - len(seen_bytes))
    lengths = lengths - prefix_spaces
    seen_ends = np.cumsum(lengths)
    _require_reproduced_text(
        tokenizer, arrays.flat, arrays.offsets[ids] + prefix_spaces, seen_ends - lengths, lengths, seen_bytes, ids
    )
    if typed_metaspaces:
        lengths = lengths + 2 * _count_in_spans(text, METASPACE, char_spans)
    byte_ends = np.cumsum(lengths)
    return EncodedText(ids=ids, byte_starts=byte_ends - lengths, byte_ends=byte_ends)


def _count_in_spans(text: str, character: str, char_spans: np.ndarray) -> np.ndarray:
    """How many times `character` occurs in each [start, end) character span of `text`."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    cumulative = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(code_points == ord(character), out=cumulative[1:])
    return cumulative[char_spans[:, 1]] - cumulative[char_spans[:, 0]]


def _require_text_tokens(tokenizer, ids: np.ndarray, lengths: np.ndarray) -> None:
    textless = np.flatnonzero(lengths < 0)
    if textless.size:
        token = tokenizer.convert_ids_to_tokens(int(ids[textless[0]]))
        raise ValueError(
            f"tokenizer {_tokenizer_name(tokenizer)} produced {textless.size} token(s) that stand for no text "
            f"(first: {token!r} at position {int(textless[0])}), e.g. an unknown-token for a character outside its "
            "vocabulary; crosskd needs every token to map back to bytes: use a byte-level or byte-fallback tokenizer"
        )


def _prepended_spaces(arrays: _TokenByteArrays, ids, char_starts, text: str, excess_bytes: int) -> np.ndarray:
    """1 for each token whose leading space was prepended by the tokenizer (Metaspace 'first'/'always'), else 0.

    Such a token starts at a character that is neither a space nor a typed '▁'. It is only looked for when the tokens
    have more bytes than the text, so byte-level tokens (whose offsets may be trimmed of spaces) are never touched.
    """
    prefix = np.zeros(len(ids), dtype=np.int64)
    if excess_bytes <= 0:
        return prefix
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    candidates = np.flatnonzero(arrays.leading_space[ids])
    starting_characters = code_points[char_starts[candidates]]
    candidates = candidates[(starting_characters != ord(" ")) & (starting_characters != ord(METASPACE))]
    if candidates.size == excess_bytes:
        prefix[candidates] = 1
    return prefix


def _require_reproduced_text(tokenizer, flat, first_used_byte, byte_starts, lengths, text_bytes, ids) -> None:
    """The tokens' bytes laid end to end must be the text, or the spans would point at the wrong bytes."""
    total = int(lengths.sum())
    if total == len(text_bytes):
        gather = np.repeat(first_used_byte - byte_starts, lengths) + np.arange(total)
        mismatched = np.flatnonzero(flat[gather] != text_bytes)
        if not mismatched.size:
            return
        first_bad_byte = int(mismatched[0])
    else:
        first_bad_byte = min(total, len(text_bytes))
    token_index = min(int(np.searchsorted(byte_starts + lengths, first_bad_byte, side="right")), len(ids) - 1)
    context = bytes(text_bytes[max(0, first_bad_byte - 20) : first_bad_byte + 20]).decode("utf-8", "replace")
    token = tokenizer.convert_ids_to_tokens(int(ids[token_index])) if len(ids) else None
    raise ValueError(
        f"tokenizer {_tokenizer_name(tokenizer)} does not reproduce the text byte for byte (its tokens have {total} "
        f"bytes, the text {len(text_bytes)}; first difference at byte {first_bad_byte}, token {token!r}, near "
        f"{context!r}): it normalises the text (e.g. lowercasing, Unicode normalisation, stripping) before "
        "tokenising, so tokens cannot be mapped to exact byte spans; use a tokenizer without a normalizer "
        "(tokenizer.backend_tokenizer.normalizer = None) or one that only prepends/replaces spaces with '▁'"
    )
