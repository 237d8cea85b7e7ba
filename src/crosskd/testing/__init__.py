"""Helpers for crosskd's tests: tiny tokenizers and text generators that need no network."""

from __future__ import annotations

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
    "Straße",
    " the",
)


def mixed_texts(max_size: int = 40):
    """A hypothesis strategy of texts mixing arbitrary unicode with TRICKY_FRAGMENTS (hypothesis is a test extra)."""
    from hypothesis import strategies as st

    piece = st.one_of(st.sampled_from(TRICKY_FRAGMENTS), st.text(max_size=6))
    return st.lists(piece, max_size=max_size).map("".join)
