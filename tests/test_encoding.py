"""Tiny tokenizers, the token -> bytes table and exact byte spans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from tokenizers import Tokenizer, normalizers
from transformers import PreTrainedTokenizerFast

from crosskd.data import encoding
from crosskd.data.encoding import encode_with_byte_spans, token_bytes_table
from crosskd.testing import assert_exact_byte_spans, mixed_texts
from crosskd.testing.tiny_tokenizers import TEST_TOKENIZERS, byte_level_bpe, sentencepiece_like, tiny_tokenizer

SAMPLE = "def f(x):\r\n\treturn x  # 日本 🎉 café\n"


def test_tiny_tokenizers_share_the_end_of_text_convention():
    for tokenizer in (byte_level_bpe(300), byte_level_bpe(700), sentencepiece_like(400)):
        assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
        assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 0
        assert tokenizer.is_fast


def test_tiny_tokenizers_round_trip_and_differ_by_vocabulary_size():
    small, large = byte_level_bpe(300), byte_level_bpe(700)
    assert len(small) == 300 and len(large) == 700
    small_ids = small(SAMPLE, add_special_tokens=False)["input_ids"]
    large_ids = large(SAMPLE, add_special_tokens=False)["input_ids"]
    assert small.decode(small_ids) == SAMPLE == large.decode(large_ids)
    assert len(large_ids) < len(small_ids)


def test_sentencepiece_like_falls_back_to_bytes_for_non_ascii():
    tokenizer = sentencepiece_like(400)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("日🎉", add_special_tokens=False)["input_ids"])
    assert tokens[-7:] == ["<0xE6>", "<0x97>", "<0xA5>", "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]


def test_token_bytes_table_byte_level():
    tokenizer = byte_level_bpe(300)
    table = token_bytes_table(tokenizer)
    assert len(table) == len(tokenizer)
    assert table[0] is None  # <|endoftext|> is a control token, not text
    assert table[tokenizer.convert_tokens_to_ids("Ġ")] == b" "
    assert table[tokenizer.convert_tokens_to_ids("Ċ")] == b"\n"
    assert table[tokenizer.convert_tokens_to_ids("æ")] == b"\xe6"  # one byte of a multi-byte character
    ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == SAMPLE.encode("utf-8")


def test_token_bytes_table_sentencepiece():
    tokenizer = sentencepiece_like(400)
    table = token_bytes_table(tokenizer)
    assert table[0] is None
    assert table[tokenizer.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert table[tokenizer.convert_tokens_to_ids("▁")] == b" "
    assert table[tokenizer.convert_tokens_to_ids("▁f")] == b" f"
    ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    # Metaspace prepends a space to the text ("first" scheme): the only difference from the source bytes.
    assert b"".join(table[i] for i in ids) == b" " + SAMPLE.encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# Exact byte spans


def _assert_exact_spans(tokenizer, text: str) -> None:
    encoded = encode_with_byte_spans(tokenizer, text)
    assert encoded.ids.dtype == encoded.byte_starts.dtype == encoded.byte_ends.dtype == np.int64
    assert_exact_byte_spans(tokenizer, text, encoded)


@pytest.mark.parametrize("name", sorted(TEST_TOKENIZERS))
@settings(max_examples=60, deadline=None)
@given(text=mixed_texts())
def test_byte_spans_are_exact(name, text):
    _assert_exact_spans(tiny_tokenizer(name), text)


@pytest.mark.parametrize("name", sorted(TEST_TOKENIZERS))
def test_byte_spans_of_a_leading_space_and_an_empty_text(name):
    tokenizer = tiny_tokenizer(name)
    for text in ("", " leading space", "  two", "\nnewline first", "日 first"):
        _assert_exact_spans(tokenizer, text)


def test_byte_fallback_tokens_split_one_character_into_byte_spans():
    tokenizer = sentencepiece_like(400)
    encoded = encode_with_byte_spans(tokenizer, "a日🎉")
    tokens = tokenizer.convert_ids_to_tokens(encoded.ids.tolist())
    spans = list(zip(tokens, encoded.byte_starts.tolist(), encoded.byte_ends.tolist()))
    assert spans[-7:] == [
        ("<0xE6>", 1, 2), ("<0x97>", 2, 3), ("<0xA5>", 3, 4),
        ("<0xF0>", 4, 5), ("<0x9F>", 5, 6), ("<0x8E>", 6, 7), ("<0x89>", 7, 8),
    ]


def test_metaspace_prepended_space_gets_no_text_bytes():
    tokenizer = sentencepiece_like(400)
    encoded = encode_with_byte_spans(tokenizer, "Hi")
    assert encoded.byte_starts[0] == 0
    assert (encoded.byte_ends - encoded.byte_starts).sum() == 2


def _with_normalizer(tokenizer, normalizer) -> PreTrainedTokenizerFast:
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def test_normalising_tokenizer_is_a_clear_error():
    lowercasing = _with_normalizer(byte_level_bpe(300), normalizers.Lowercase())
    assert len(encode_with_byte_spans(lowercasing, "already lower")) > 0
    with pytest.raises(ValueError, match=r"does not reproduce the text.*normalizer = None"):
        encode_with_byte_spans(lowercasing, "Some Capitals")


def test_tokens_without_text_are_a_clear_error():
    no_fallback = Tokenizer.from_str(sentencepiece_like(400).backend_tokenizer.to_str())
    no_fallback.model.byte_fallback = False
    no_fallback.model.unk_token = "<|endoftext|>"
    wrapped = PreTrainedTokenizerFast(tokenizer_object=no_fallback, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="stand for no text.*byte-fallback"):
        encode_with_byte_spans(wrapped, "日")


def test_typed_metaspace_character_spans_its_three_bytes():
    tokenizer = sentencepiece_like(400)
    encoded = encode_with_byte_spans(tokenizer, "a▁b ▁")
    assert_exact_byte_spans(tokenizer, "a▁b ▁", encoded)
    assert encoded.byte_ends[-1] == len("a▁b ▁".encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------------
# Long texts: bounded pieces, the whole text's tokens


@pytest.mark.parametrize("name", sorted(TEST_TOKENIZERS))
def test_a_long_text_is_tokenised_in_bounded_pieces_with_the_whole_texts_tokens(name, monkeypatch):
    tokenizer = tiny_tokenizer(name)
    text = "".join(f"def f{i}(x):\n    return x * {i}  # 日本 🎉\n\nclass C{i}:\n\tpass\n" for i in range(400))
    whole = encode_with_byte_spans(tokenizer, text)
    monkeypatch.setattr(encoding, "PIECE_CHARS", 500)
    monkeypatch.setattr(encoding, "SEAM_CHARS", 100)
    longest = []
    original = type(tokenizer).__call__

    def recording(self, piece, **kwargs):
        longest.append(len(piece))
        return original(self, piece, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", recording)
    pieces = encode_with_byte_spans(tokenizer, text)
    assert np.array_equal(pieces.ids, whole.ids)
    assert np.array_equal(pieces.byte_starts, whole.byte_starts) and np.array_equal(pieces.byte_ends, whole.byte_ends)
    assert max(longest) < 1000  # a piece and the context of a cut, never the whole text


def test_a_long_text_without_a_seamless_cut_is_tokenised_whole(monkeypatch):
    tokenizer = tiny_tokenizer(sorted(TEST_TOKENIZERS)[0])
    text = "x" * 3000  # no cut candidate at all
    whole = encode_with_byte_spans(tokenizer, text)
    monkeypatch.setattr(encoding, "PIECE_CHARS", 500)
    assert np.array_equal(encode_with_byte_spans(tokenizer, text).ids, whole.ids)
