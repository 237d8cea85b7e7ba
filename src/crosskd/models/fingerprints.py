"""Fingerprints: short hashes that identify a model's weights, a tokenizer, a set of valid ids or a corpus.

They decide whether something stored on disk (a teacher cache, a first-token map) was made from exactly the models
and text a run uses; every such check reads its hashes from here, so two stored things never disagree on what
"the same tokenizer" means.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from collections.abc import Iterable
from typing import Protocol

import torch


class NamedText(Protocol):
    name: str
    text: str


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes: what a checkpoint's manifest and a cache's index record of every file."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's tokenizer.json serialisation: any change to vocab, merges or pipeline changes it."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def valid_ids_hash(valid_mask: torch.Tensor) -> str:
    """sha256 of a bool [V] mask of which logit ids are real tokens."""
    return hashlib.sha256(valid_mask.numpy().tobytes()).hexdigest()


def weights_hash(model: torch.nn.Module) -> str:
    """A cheap but identifying hash of a model: every tensor's name, shape and dtype, and 4096 values sampled across
    it (a fine-tuned or re-quantised model differs in nearly every value, so a strided sample finds it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
        digest.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def documents_hash(documents: Iterable[NamedText]) -> str:
    """sha256 of documents' names and texts, independent of their order."""
    digest = hashlib.sha256()
    for document in sorted(documents, key=lambda d: d.name):
        digest.update(f"{len(document.name)}:{document.name}:{len(document.text)}:".encode())
        digest.update(document.text.encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()
