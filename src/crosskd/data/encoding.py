"""Tokenisation with exact UTF-8 byte spans: what every cross-tokenizer computation stands on.

Fast tokenizers report offsets in characters. Byte-fallback tokenizers split one character into several tokens that
share the same character span ('日' -> two tokens, '🎉' -> three), so character offsets cannot say how many bytes each
of those tokens consumed. Here every token gets a byte span [start, end) into the UTF-8 encoding of the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
