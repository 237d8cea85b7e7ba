"""Tiny random models built from config, shaped like the reference pair, so model tests run in seconds offline.

- student: a Llama with tied embeddings (like SmolLM2), on a 300-entry byte-level BPE;
- teacher: a Qwen2-MoE (4 experts, top-2) on a 700-entry byte-level BPE whose vocabulary, like the GGUF-converted
  Qwen tokenizer, lists `[PAD<id>]` tokens as ordinary entries, and whose output layer is wider still: both kinds of
  padded ids that crosskd must detect and mask.
- each tokenizer has its own chat template (testing/tiny_tokenizers.py), as an instruct pair has.

Weights depend only on the seed (the global RNG is left untouched).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM

from crosskd.models.cache import resolve_cache_dir
from crosskd.models.loading import register_named_pair
from crosskd.testing.tiny_tokenizers import (
    STUDENT_CHAT_TEMPLATE,
    TEACHER_CHAT_TEMPLATE,
    byte_level_bpe,
    with_chat_template,
)

TINY_MODELS_SUBDIR = "tiny-v2"  # bump when this module changes, so stale folders are not reused

STUDENT_VOCAB = 300
TEACHER_VOCAB = 700
TEACHER_NAMED_PADDING = 20  # `[PAD<id>]` entries appended to the teacher's tokenizer vocabulary
LOGIT_ROUNDING = 64  # the teacher's output layer is rounded up to a multiple of this, beyond the named padding
COMPLETE_FILE = "crosskd_tiny_complete"


def _from_config_seeded(model_class, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def _special_ids(tokenizer) -> dict:
    return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}


def with_named_padding(tokenizer: PreTrainedTokenizerFast, count: int) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` whose model vocabulary ends with `[PAD<id>]` entries that no merge ever produces."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first = len(tokenizer)
    for token_id in range(first, first + count):
        vocab[f"[PAD{token_id}]"] = token_id
    padded = Tokenizer.from_str(json.dumps(spec))
    copy = PreTrainedTokenizerFast(
        tokenizer_object=padded, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, unk_token=None
    )
    copy.chat_template = tokenizer.chat_template
    return copy


def tiny_llama_student(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        **_special_ids(tokenizer),
    )
    return _from_config_seeded(LlamaForCausalLM, config, seed)


def tiny_qwen2_moe_teacher(tokenizer, seed: int = 0) -> Qwen2MoeForCausalLM:
    """A 3-layer Qwen2-MoE, 4 experts top-2, whose output layer is rounded up beyond `len(tokenizer)`."""
    logit_size = -(-(len(tokenizer) + 1) // LOGIT_ROUNDING) * LOGIT_ROUNDING  # +1: always at least one id beyond
    config = Qwen2MoeConfig(
        vocab_size=logit_size,
        hidden_size=96,
        intermediate_size=192,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **_special_ids(tokenizer),
    )
    return _from_config_seeded(Qwen2MoeForCausalLM, config, seed)


def tiny_teacher_tokenizer() -> PreTrainedTokenizerFast:
    return with_named_padding(with_chat_template(byte_level_bpe(TEACHER_VOCAB), TEACHER_CHAT_TEMPLATE),
                              TEACHER_NAMED_PADDING)


def tiny_student_tokenizer() -> PreTrainedTokenizerFast:
    return with_chat_template(byte_level_bpe(STUDENT_VOCAB), STUDENT_CHAT_TEMPLATE)


def materialize_tiny_pair(root: str | os.PathLike) -> tuple[Path, Path]:
    """Write the tiny teacher and student as normal HF folders `root/teacher`, `root/student` (once; atomically)."""
    root = Path(root)
    teacher_dir, student_dir = root / "teacher", root / "student"
    if (teacher_dir / COMPLETE_FILE).is_file() and (student_dir / COMPLETE_FILE).is_file():
        return teacher_dir, student_dir
    root.mkdir(parents=True, exist_ok=True)
    teacher_tokenizer, student_tokenizer = tiny_teacher_tokenizer(), tiny_student_tokenizer()
    builds = (
        (teacher_dir, tiny_qwen2_moe_teacher(teacher_tokenizer), teacher_tokenizer),
        (student_dir, tiny_llama_student(student_tokenizer), student_tokenizer),
    )
    for destination, model, tokenizer in builds:
        if (destination / COMPLETE_FILE).is_file():
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=root))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_FILE).touch()
        if destination.exists() and not (destination / COMPLETE_FILE).is_file():
            shutil.rmtree(destination)  # left by an interrupted run
        try:
            staging.rename(destination)
        except OSError:  # a concurrent run got there first; its folder is identical (deterministic build)
            shutil.rmtree(staging, ignore_errors=True)
    return teacher_dir, student_dir


# `tiny:teacher` / `tiny:student`: written once under the crosskd cache dir.
register_named_pair("tiny", lambda: materialize_tiny_pair(resolve_cache_dir() / TINY_MODELS_SUBDIR))
