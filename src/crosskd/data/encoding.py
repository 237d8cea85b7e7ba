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


def require_fast_tokenizer(tokenizer, role: str = "tokenizer") -> None:
    """Offsets are only available from fast (Rust) tokenizers; a slow one cannot be aligned."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"the {role} ({type(tokenizer).__name__}) is a slow tokenizer without offset mappings, which crosskd needs "
            "to align tokens across vocabularies; load it with use_fast=True or convert it to a tokenizer.json"
        )


# ---------------------------------------------------------------------------------------------------------------------
# What each token id stands for, in bytes


@lru_cache(maxsize=1)
def _gpt2_unicode_to_byte() -> dict[str, int]:
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


def _byte_level_token_bytes(token: str) -> bytes | None:
    table = _gpt2_unicode_to_byte()
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
    metaspace = any(METASPACE in pipeline[part] for part in ("normalizer", "pre_tokenizer", "decoder"))
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


def encode_with_byte_spans(tokenizer, text: str) -> EncodedText:
    """Tokenise `text` as plain text (special-token strings are text, no BOS/EOS added) with byte spans."""
    require_fast_tokenizer(tokenizer)
    enc = tokenizer(
        text,
        add_special_tokens=False,
        split_special_tokens=True,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    char_offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    char_to_byte = _char_to_byte_table(text)
    starts = char_to_byte[char_offsets[:, 0]]
    ends = char_to_byte[char_offsets[:, 1]]
    return EncodedText(ids=ids, byte_starts=starts, byte_ends=ends)


def _char_to_byte_table(text: str) -> np.ndarray:
    """table[c] = byte offset of character c in text.encode('utf-8'); table[len(text)] = total bytes."""
    lengths = np.fromiter((len(ch.encode("utf-8", "surrogatepass")) for ch in text), dtype=np.int64, count=len(text))
    table = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(lengths, out=table[1:])
    return table
