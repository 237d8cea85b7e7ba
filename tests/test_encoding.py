"""Tiny tokenizers, the token -> bytes table and exact byte spans."""

from __future__ import annotations

from crosskd.data.encoding import token_bytes_table
from crosskd.testing.tiny_tokenizers import byte_level_bpe, sentencepiece_like

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
