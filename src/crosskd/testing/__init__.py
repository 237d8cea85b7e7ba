"""Helpers for crosskd's tests: tiny tokenizers and text generators that need no network."""

from __future__ import annotations

from crosskd.data.encoding import token_bytes_table

# Pieces real corpora are made of and tokenizers disagree on: code, whitespace runs, CRLF, CJK, emoji (with
# modifiers and ZWJ sequences), combining marks and the literal text of a special token.
TRICKY_FRAGMENTS = (
    "def f(x):\n",
    "    return x  # done\n",
    "\t\t",
    "   ",
    "\r\n",
    "\n\n",
    "日本語",
    "🎉",
    "👍🏽",
    "👨‍👩‍👧",
    "e\u0301",
    "\u00a0",
    "<|endoftext|>",
    "▁x ▁",
    "Straße",
    " the",
)


def mixed_texts(max_size: int = 40):
    """A hypothesis strategy of texts mixing arbitrary unicode with TRICKY_FRAGMENTS (hypothesis is a test extra)."""
    from hypothesis import strategies as st

    piece = st.one_of(st.sampled_from(TRICKY_FRAGMENTS), st.text(max_size=6))
    return st.lists(piece, max_size=max_size).map("".join)


def assert_exact_byte_spans(tokenizer, text: str, encoded) -> None:
    """Check an EncodedText against its text: contiguous spans covering the UTF-8 bytes, each holding its token's
    bytes (the space a Metaspace tokenizer prepends to the text being the one byte not in the text)."""

    data = text.encode("utf-8")
    assert len(encoded.ids) == len(encoded.byte_starts) == len(encoded.byte_ends)
    if not len(encoded):
        assert data == b"", "a non-empty text gave no tokens"
        return
    assert encoded.byte_starts[0] == 0 and encoded.byte_ends[-1] == len(data)
    assert (encoded.byte_starts[1:] == encoded.byte_ends[:-1]).all(), "spans are not contiguous"
    table = token_bytes_table(tokenizer)
    # A SentencePiece-style tokenizer reads a typed '▁' as a space: its token for one stands for b" ".
    metaspace = "Metaspace" in tokenizer.backend_tokenizer.to_str()
    for position, (token_id, start, end) in enumerate(zip(encoded.ids, encoded.byte_starts, encoded.byte_ends)):
        token_bytes = table[token_id]
        span = data[start:end].replace("▁".encode("utf-8"), b" ") if metaspace else data[start:end]
        if position == 0 and token_bytes.startswith(b" ") and not span.startswith(b" "):
            token_bytes = token_bytes[1:]
        assert span == token_bytes, (position, tokenizer.convert_ids_to_tokens(int(token_id)))
