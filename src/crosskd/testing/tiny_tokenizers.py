"""Tiny fast tokenizers trained on the fly, so tests never touch the network and run in milliseconds.

Both kinds share the conventions the real reference pair has: `<|endoftext|>` is id 0 and doubles as eos and pad.
Training is deterministic for a given vocabulary size, and results are cached per process.
"""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
BYTE_FALLBACK_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
SENTENCEPIECE_ALPHABET = "".join(chr(code) for code in range(33, 127)) + "\t\n\r▁"

# A small corpus with what real training text throws at a tokenizer: code, prose, CJK, emoji, CRLF, whitespace runs.
TRAINING_CORPUS = (
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n",
    "import os\nimport sys\n\nfor path in sorted(os.listdir('.')):\n\tprint(path, file=sys.stderr)\n",
    "# Comment with trailing spaces   \n\n\n    x = {'key': [1, 2, 3], \"other\": None}  # done\n",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n",
    "Knowledge distillation trains a small student model to imitate a larger teacher model.\n",
    "Windows line endings look like this.\r\nSecond line.\r\n\r\nFourth line after a blank one.\r\n",
    "Unicode: café, naïve, Straße, Ελληνικά, русский текст, עברית.\n",
    "日本語のテキストと中文文本。東京は日本の首都です。\n",
    "Emoji: 🎉 party, 🐍 python, 👍🏽 thumbs, 🇫🇷 flag, ❤️ heart.\n",
    "Whitespace   runs\t\tand  tabs,    and\u00a0non-breaking spaces.\n",
    "    return {k: v for k, v in zip(keys, values) if v is not None}\n",
)


# Two chat templates that differ the way real ones do (markers, layout, default system prompts), both ending a turn
# with the special `<|endoftext|>`: the tiny student renders conversations with the first, the tiny teacher with the
# second.
STUDENT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|system|>\nYou are a tiny student.<|endoftext|>\n' }}{% endif %}"
    "{%- for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|endoftext|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEACHER_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{ '### System:\nYou are the tiny teacher, made for tests.<|endoftext|>\n\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '<|endoftext|>\n\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def _train(tokenizer: Tokenizer, trainer: trainers.Trainer) -> Tokenizer:
    # Repeat the corpus so frequent pairs dominate and merges are stable rather than decided by single occurrences.
    tokenizer.train_from_iterator(list(TRAINING_CORPUS) * 4, trainer=trainer)
    return tokenizer


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT, unk_token=None
    )


@lru_cache(maxsize=None)
def byte_level_bpe(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE with `vocab_size` entries (at least 257: the special token and 256 bytes)."""
    if vocab_size < 257:
        raise ValueError(f"byte_level_bpe needs vocab_size >= 257 (1 special + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return _wrap(_train(tokenizer, trainer))


@lru_cache(maxsize=None)
def sentencepiece_like(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE: Metaspace pre-tokenizer ('▁' for spaces, prepended to the text) and byte fallback.

    Ids: 0 is `<|endoftext|>`, 1..256 are `<0x00>`..`<0xFF>`, then the learned pieces. The alphabet is ASCII only, so
    every other character (accents, CJK, emoji) falls back to its UTF-8 bytes: the case alignment must get right.
    """
    reserved = 1 + len(BYTE_FALLBACK_TOKENS)
    if vocab_size <= reserved + 32:
        raise ValueError(f"sentencepiece_like needs vocab_size > {reserved + 32} (special + 256 bytes + pieces)")
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_FALLBACK_TOKENS),
        special_tokens=[END_OF_TEXT],
        initial_alphabet=list(SENTENCEPIECE_ALPHABET),
        limit_alphabet=len(SENTENCEPIECE_ALPHABET),
        show_progress=False,
    )
    trained = json.loads(_train(tokenizer, trainer).to_str())
    # The trainer cannot reserve ids for byte tokens, so insert them after the special token and shift the pieces.
    pieces = sorted(trained["model"]["vocab"].items(), key=lambda item: item[1])
    vocab = {END_OF_TEXT: 0}
    vocab.update({token: 1 + byte for byte, token in enumerate(BYTE_FALLBACK_TOKENS)})
    for piece, _ in pieces:
        vocab.setdefault(piece, len(vocab))
    model = models.BPE(
        vocab=vocab, merges=[tuple(merge) for merge in trained["model"]["merges"]], byte_fallback=True, fuse_unk=False
    )
    result = Tokenizer(model)
    result.add_special_tokens([END_OF_TEXT])
    result.pre_tokenizer = metaspace
    result.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _wrap(result)


def with_chat_template(tokenizer: PreTrainedTokenizerFast, template: str) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` (the cached one is left as it is) that renders conversations with `template`."""
    copy = _wrap(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    copy.chat_template = template
    return copy


# The three tokenizers tests pair up: two byte-level BPEs that disagree on boundaries, and a byte-fallback one.
TEST_TOKENIZERS = {
    "bpe300": lambda: byte_level_bpe(300),
    "bpe700": lambda: byte_level_bpe(700),
    "sentencepiece400": lambda: sentencepiece_like(400),
}


def tiny_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """One of TEST_TOKENIZERS by name."""
    if name not in TEST_TOKENIZERS:
        raise KeyError(f"no tiny tokenizer named {name!r}; choose one of {sorted(TEST_TOKENIZERS)}")
    return TEST_TOKENIZERS[name]()
