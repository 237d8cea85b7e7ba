"""Vocabulary facts a cross-tokenizer objective needs: which logit ids are real tokens and which are padding.

A model's output layer is often wider than its vocabulary (rounded up for matrix-multiply efficiency), and the
GGUF-converted Qwen tokenizer even lists the padding as ordinary tokens `[PAD151665]` ... `[PAD151935]`, so
`len(tokenizer)` proves nothing. Padded ids are found from every source of evidence available:

- ids the tokenizer does not know at all (>= len(tokenizer), i.e. `config.vocab_size > len(tokenizer)`);
- tokens named like `[PAD123]`;
- GGUF token type UNUSED (5), read from the GGUF file or from `crosskd_vocab.json`, which `crosskd setup-models`
  writes into each converted folder because the token types do not survive conversion to a tokenizer.json.

Padded ids must never receive probability: `VocabFacts.mask_logits` sets their logits to -inf.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_FACTS_FILE = "crosskd_vocab.json"
PADDED_TOKEN_NAME = re.compile(r"^\[PAD\d+\]$")
# Document separator used in pre-training by both reference families (GPT-2 / SmolLM / Qwen); preferred over an
# instruct model's end-of-turn EOS when packing plain documents.
DOCUMENT_SEPARATOR_TOKEN = "<|endoftext|>"

# llama.cpp's token types (gguf.TokenType), as stored in tokenizer.ggml.token_type.
GGUF_TOKEN_TYPE_NAMES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
GGUF_UNUSED, GGUF_CONTROL = 5, 3


@dataclass(frozen=True)
class VocabFacts:
    logit_size: int  # width of the model's output layer
    padded_ids: torch.Tensor  # sorted int64: output ids that are not real tokens
    special_ids: tuple[int, ...]  # control tokens (sorted)
    eos_id: int | None
    separator_id: int | None  # joins packed documents
    pad_id: int | None
    evidence: dict[str, int]  # how many padded ids each detection source found (for reports)

    @property
    def valid_mask(self) -> torch.Tensor:
        """Bool [logit_size]: True for real tokens, False for padded ids."""
        mask = torch.ones(self.logit_size, dtype=torch.bool)
        mask[self.padded_ids] = False
        return mask

    @property
    def real_token_count(self) -> int:
        return self.logit_size - int(self.padded_ids.numel())

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [..., logit_size] with padded ids at -inf, so no softmax ever gives them probability."""
        if logits.shape[-1] != self.logit_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries on the last axis, expected {self.logit_size}")
        return logits.masked_fill(~self.valid_mask.to(logits.device), float("-inf"))

    def describe(self) -> str:
        found = ", ".join(f"{source}: {count}" for source, count in self.evidence.items() if count) or "none"
        return (
            f"{self.logit_size} logits, {self.padded_ids.numel()} padded ids ({found}), "
            f"{len(self.special_ids)} special ids, eos={self.eos_id}, separator={self.separator_id}, pad={self.pad_id}"
        )


def gguf_vocab_record(gguf_path: Path) -> dict:
    """The GGUF token types as a JSON-able record: counts per type, unused (padded) ids and control ids."""
    from gguf import GGUFReader

    token_types = GGUFReader(str(gguf_path)).fields["tokenizer.ggml.token_type"].contents()
    counts: dict[str, int] = {}
    for token_type in token_types:
        name = GGUF_TOKEN_TYPE_NAMES.get(int(token_type), str(token_type))
        counts[name] = counts.get(name, 0) + 1
    return {
        "source": gguf_path.name,
        "token_count": len(token_types),
        "token_type_counts": counts,
        "unused_ids": [i for i, t in enumerate(token_types) if t == GGUF_UNUSED],
        "control_ids": [i for i, t in enumerate(token_types) if t == GGUF_CONTROL],
    }


def write_vocab_record(gguf_path: Path, folder: Path) -> dict:
    record = gguf_vocab_record(gguf_path)
    (folder / VOCAB_FACTS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_vocab_record(folder: Path | None) -> dict | None:
    if folder is None or not (Path(folder) / VOCAB_FACTS_FILE).is_file():
        return None
    return json.loads((Path(folder) / VOCAB_FACTS_FILE).read_text())


def detect_vocab_facts(tokenizer, logit_size: int, gguf_record: dict | None = None) -> VocabFacts:
    """Vocabulary facts from the tokenizer, the output-layer width and (if known) the GGUF token types."""
    known_tokens = len(tokenizer)
    token_to_id = tokenizer.get_vocab()
    beyond_tokenizer = set(range(known_tokens, logit_size))
    named_padding = {
        token_id
        for token, token_id in token_to_id.items()
        if token_id < logit_size and PADDED_TOKEN_NAME.match(token) and token != tokenizer.pad_token
    }
    gguf_unused = {i for i in (gguf_record or {}).get("unused_ids", ()) if i < logit_size}
    padded = sorted(beyond_tokenizer | named_padding | gguf_unused)

    special = set(tokenizer.all_special_ids) | set((gguf_record or {}).get("control_ids", ()))
    special = {i for i in special if i is not None and 0 <= i < logit_size} - set(padded)
    return VocabFacts(
        logit_size=logit_size,
        padded_ids=torch.tensor(padded, dtype=torch.long),
        special_ids=tuple(sorted(special)),
        eos_id=tokenizer.eos_token_id,
        separator_id=token_to_id.get(DOCUMENT_SEPARATOR_TOKEN, tokenizer.eos_token_id),
        pad_id=tokenizer.pad_token_id,
        evidence={
            "ids beyond the tokenizer": len(beyond_tokenizer),
            "[PAD…] names": len(named_padding),
            "GGUF unused type": len(gguf_unused),
        },
    )


def require_fast_tokenizer(tokenizer, role: str = "tokenizer") -> None:
    """Offsets are only available from fast (Rust) tokenizers; a slow one cannot be aligned."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"the {role} ({type(tokenizer).__name__}) is a slow tokenizer without offset mappings, which crosskd needs "
            "to align tokens across vocabularies; load it with use_fast=True or convert it to a tokenizer.json"
        )
