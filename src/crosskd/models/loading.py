"""Load a teacher or a student by spec, validated for cross-tokenizer distillation.

A spec is one of:
- `tiny:teacher` / `tiny:student`: deterministic tiny random models (registered by crosskd.testing.tiny_models),
  written once under the cache dir;
- `reference:teacher` / `reference:student`: the reference pair made by `crosskd setup-models`;
- a path to a `.gguf` file (dequantised on load);
- a local Hugging Face folder;
- anything else is a hub id, passed to `from_pretrained` (it must already be in the local Hugging Face cache when
  there is no network).

The teacher is frozen and in eval mode, in the requested dtype. The student keeps float32 master weights whatever the
compute dtype; `LoadedModel.compute_dtype` is what its forward pass should autocast to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from crosskd.models.moe import is_moe_config
from crosskd.models.reference import reference_model_dirs
from crosskd.models.vocab import (
    VocabFacts,
    detect_vocab_facts,
    gguf_vocab_record,
    read_vocab_record,
    require_fast_tokenizer,
)

ROLES = ("teacher", "student")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(OSError):
    pass


class ModelFileError(ValueError):
    """A model file that exists but cannot be what it claims (truncated, corrupt, not a model folder)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points: `location` is a folder, a hub id or the folder holding `gguf_file`."""

    spec: str
    location: str
    gguf_file: str | None = None
    is_local: bool = True

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def vocab_record(self) -> dict | None:
        if self.gguf_file:
            return gguf_vocab_record(Path(self.location) / self.gguf_file)
        return read_vocab_record(Path(self.location)) if self.is_local else None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    vocab: VocabFacts
    is_moe: bool
    spec: str
    compute_dtype: torch.dtype


def resolve_spec(spec: str | os.PathLike) -> ModelSource:
    spec = str(spec)
    prefix, _, role = spec.partition(":")
    if prefix in NAMED_PAIRS and role:
        if role not in ROLES:
            raise ValueError(f"unknown model spec {spec!r}: use {prefix}:teacher or {prefix}:student")
        teacher_dir, student_dir = NAMED_PAIRS[prefix]()
        return ModelSource(spec, str(teacher_dir if role == "teacher" else student_dir))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, str(path.parent.resolve()), gguf_file=path.name)
    if path.is_dir():
        return ModelSource(spec, str(path.resolve()))
    # Hub ids look like "name" or "org/name", so these forms are surely paths: trying them on the hub only waits for
    # its retries (about a minute without network) before failing.
    first_part = spec.split("/", 1)[0]
    surely_path = (path.exists() or spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1
                   or ("/" in spec and Path(first_part).is_dir()))
    if surely_path:
        raise ModelNotFoundError(
            f"model spec {spec!r} is a path but not an existing folder or .gguf file; check the path, or run "
            "`crosskd setup-models` and use reference:teacher / reference:student"
        )
    return ModelSource(spec, spec, is_local=False)


def register_named_pair(prefix: str, folders: Callable[[], tuple[Path, Path]]) -> None:
    """Make `<prefix>:teacher` and `<prefix>:student` load the (teacher, student) folders `folders()` returns."""
    NAMED_PAIRS[prefix] = folders


def _reference_folders() -> tuple[Path, Path]:
    pair = reference_model_dirs()
    return pair.teacher_dir, pair.student_dir


# Named teacher/student pairs: `reference` (crosskd setup-models); crosskd.testing registers `tiny`.
NAMED_PAIRS: dict[str, Callable[[], tuple[Path, Path]]] = {"reference": _reference_folders}


def load_pretrained(loader, source: ModelSource, **kwargs):
    """`loader.from_pretrained` (AutoConfig, AutoTokenizer, AutoModelForCausalLM) for a resolved model source; a
    name the hub cannot provide raises ModelNotFoundError saying what to pass instead."""
    try:
        return loader.from_pretrained(source.location, **source.from_pretrained_kwargs(), **kwargs)
    except Exception as error:
        if source.gguf_file:  # the GGUF reader fails on a damaged file with whatever its parser meets (struct, numpy)
            raise ModelFileError(
                f"{Path(source.location) / source.gguf_file} could not be read as GGUF "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): the file is truncated "
                "or corrupt; download or convert it again"
            ) from error
        if source.is_local or not isinstance(error, OSError):
            raise
        raise ModelNotFoundError(
            f"could not find model {source.spec!r} locally (it is not a folder or .gguf file, and the Hugging Face "
            f"hub could not provide it: {str(error).splitlines()[0]}). Pass a local model folder or .gguf file, or run "
            "`crosskd setup-models` and use reference:teacher / reference:student."
        ) from error


def check_model_folder(folder: Path) -> None:
    """Name what is wrong with a model folder before transformers reads it (its errors name neither the folder nor
    the file): no config.json, or a safetensors file shorter than its header says."""
    if not (folder / "config.json").is_file():
        raise ModelFileError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder (one holds config.json, the "
            "weights as *.safetensors and the tokenizer files); pass such a folder, a .gguf file or a hub id"
        )
    for path in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem is not None:
            raise ModelFileError(f"{path} {problem}; download or convert the model again")


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header with each tensor's byte range, then the data."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if size < 8 or 8 + header_length > size:
            return f"has {size} bytes, fewer than its header needs: truncated"
        try:
            header = json.loads(handle.read(header_length))
        except ValueError:
            return "has a corrupt header: not a safetensors file, or damaged"
    data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    expected = 8 + header_length + data_end
    if size < expected:
        return f"has {size} bytes but its header describes {expected}: truncated"
    return None


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token an existing token to pad with: eos, else another special token.

    Never adds a token: a new id would need a new embedding row, silently changing the model.
    """
    if tokenizer.pad_token is not None:
        return
    candidates = [tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token, *tokenizer.all_special_tokens]
    existing = next((token for token in candidates if token is not None), None)
    if existing is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no pad token and no eos or other special token to pad "
            "with; add one to the tokenizer and resize the model's embeddings, then save and load that folder"
        )
    tokenizer.pad_token = existing


def load_tokenizer(spec: str | os.PathLike, role: str = "tokenizer"):
    """A fast tokenizer (offsets are required for alignment) with a pad token set."""
    return _load_tokenizer(resolve_spec(spec), role)


def _load_tokenizer(source: ModelSource, role: str):
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, source)
    require_fast_tokenizer(tokenizer, role=f"{role} tokenizer of {source.spec!r}")
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(spec: str | os.PathLike, role: str, dtype: str = "float32") -> LoadedModel:
    """Load a teacher (frozen, eval, in `dtype`) or a student (trainable, float32 master weights)."""
    from transformers import AutoModelForCausalLM

    if role not in ROLES:
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = resolve_spec(spec)
    if source.is_local and not source.gguf_file:
        check_model_folder(Path(source.location))
    tokenizer = _load_tokenizer(source, role)
    compute_dtype = DTYPES[dtype]
    load_dtype = compute_dtype if role == "teacher" else torch.float32
    model = load_pretrained(AutoModelForCausalLM, source, dtype=load_dtype)
    model.to(load_dtype)  # GGUF loading may dequantise to another dtype than asked
    if role == "teacher":
        model.eval()
        model.requires_grad_(False)
    else:
        model.train()
        model.requires_grad_(True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    logit_size = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > logit_size:
        raise ValueError(
            f"the {role} tokenizer of {source.spec!r} has {len(tokenizer)} tokens but the model only {logit_size} "
            "output logits: tokenizer and model do not belong together"
        )
    vocab = detect_vocab_facts(tokenizer, logit_size, source.vocab_record())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        vocab=vocab,
        is_moe=is_moe_config(model.config),
        spec=source.spec,
        compute_dtype=compute_dtype,
    )
