"""What a teacher cache holds and how it is laid out: the stored signal, the window keys, the fingerprint.

A cache is a folder of safetensors shards plus `index.json`. Each shard holds consecutive windows of the run's plan;
each window is identified by a key (a hash of its teacher tokens and of the teacher positions of its aligned pairs,
everything the stored rows are a function of), and its rows (one per aligned pair, in the batch's pair order) are
`window_offsets[w] : window_offsets[w + 1]` of the shard's row tensors.

Stored per aligned pair: the parts of the signal the run's vocabulary transfer reads (its `TeacherNeeds`; docs/CACHE.md
has the reasons and the sizes):
- `topk`: the teacher's top-k ids, exact (low 16 bits as uint16, the bits above packed into uint8), their τ=1
  log-probabilities (fp16) and the log tail mass (fp16): `TopKTarget` of docs/OBJECTIVE.md;
- `final_hidden`: the teacher's final hidden state (fp16).
Stored per teacher token (each window's real teacher tokens, `window_token_offsets`), when the transfer reads it:
- `observed_logprobs`: the teacher's τ=1 log-probability of its own next token (float32; the last token's entry is
  the placeholder the online teacher gives it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from crosskd.config import ChatConfig, Config
from crosskd.data.chat_windows import chat_template_of
from crosskd.data.collate import DualBatch
from crosskd.data.corpus import TEXT_FORMAT
from crosskd.data.sources import Document
from crosskd.data.teacher_text import load_teacher_text
from crosskd.losses.target import TopKTarget
from crosskd.teacher.online import TeacherNeeds, TeacherSignal
from crosskd.models.fingerprints import documents_hash, file_sha256, tokenizer_hash, valid_ids_hash, weights_hash

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
KEY_BYTES = 16
LOW_ID_BITS = 16
# fp16 keeps 11 significant bits: a stored value x̂ of x satisfies |x̂ - x| <= 2^-11 |x| (and 2^-25 below fp16's normal
# range, where the spacing is absolute). Values beyond ±65504 would become ±inf, which is why final hidden states are
# checked before they are stored; log-probabilities below -65504 are probability 0 in float32 anyway.
FP16_RELATIVE_ROUNDING = 2.0**-11
FP16_ABSOLUTE_ROUNDING = 2.0**-25
FP16_MAX = float(torch.finfo(torch.float16).max)


class TeacherCacheError(ValueError):
    """A cache that cannot serve this run: the message names what differs and how to fix it."""


def cache_dir_of(config: Config) -> Path:
    return Path(config.teacher.cache_dir or Path(config.output.run_dir) / "teacher-cache")


# ---------------------------------------------------------------------------------------------------------------------
# Window keys


def rows_per_window(batch: DualBatch) -> list[int]:
    """How many aligned pairs (stored rows) each window of the batch has; a window's pairs are consecutive."""
    return torch.bincount(batch.pair_batch.cpu(), minlength=len(batch.teacher_input_ids)).tolist()


def window_keys(batch: DualBatch) -> list[bytes]:
    """Each window's key: a hash of its teacher tokens (without padding) and its pairs' teacher positions."""
    teacher_ids = batch.teacher_input_ids.cpu()
    lengths = batch.teacher_attention_mask.sum(dim=1).tolist()
    positions = batch.pair_teacher_pos.cpu().split(rows_per_window(batch))
    keys = []
    for row, length in enumerate(lengths):
        digest = hashlib.blake2b(digest_size=KEY_BYTES)
        digest.update(teacher_ids[row, :length].numpy().tobytes())
        digest.update(b"/")
        digest.update(positions[row].numpy().tobytes())
        keys.append(digest.digest())
    return keys


# ---------------------------------------------------------------------------------------------------------------------
# The stored rows


#: Parts stored per teacher token rather than per aligned pair, with their bytes per token.
TOKEN_PART_BYTES = {"observed_logprobs": 4}


def tokens_per_window(batch: DualBatch) -> list[int]:
    """How many real teacher tokens each window of the batch has (the rows of its per-token parts)."""
    return batch.teacher_attention_mask.sum(dim=1).tolist()


@dataclass(frozen=True)
class CacheLayout:
    signal: str  # the stored parts of the signal (`TeacherNeeds.parts`) joined by "+", e.g. "topk"
    top_k: int
    teacher_logit_size: int
    hidden_size: int

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.signal.split("+"))

    @property
    def pair_parts(self) -> tuple[str, ...]:
        return tuple(part for part in self.parts if part not in TOKEN_PART_BYTES)

    @property
    def token_parts(self) -> tuple[str, ...]:
        return tuple(part for part in self.parts if part in TOKEN_PART_BYTES)

    @property
    def id_high_bits(self) -> int:
        """Bits above the low 16 of the largest teacher id, rounded up to a divisor of 8 so a byte holds whole ids."""
        needed = max(0, (self.teacher_logit_size - 1).bit_length() - LOW_ID_BITS)
        if needed > 8:
            raise ValueError(f"teacher vocabularies over 2^24 ids are not supported (this one has "
                             f"{self.teacher_logit_size})")
        return next(bits for bits in (0, 1, 2, 4, 8) if bits >= needed)

    @property
    def high_bytes_per_row(self) -> int:
        return math.ceil(self.top_k * self.id_high_bits / 8)

    @property
    def bytes_per_row(self) -> int:
        sizes = {"final_hidden": 2 * self.hidden_size,
                 "topk": 2 * self.top_k + self.high_bytes_per_row + 2 * self.top_k + 2}  # ids, high bits, logp, tail
        return sum(sizes[part] for part in self.pair_parts)

    @property
    def bytes_per_token(self) -> int:
        return sum(TOKEN_PART_BYTES[part] for part in self.token_parts)

    def to_dict(self) -> dict:
        return {"signal": self.signal, "top_k": self.top_k, "teacher_logit_size": self.teacher_logit_size,
                "hidden_size": self.hidden_size}

    def encode(self, signal: TeacherSignal) -> dict[str, Tensor]:
        """The per-pair rows to store for `signal` (all its aligned pairs), on the CPU."""
        rows: dict[str, Tensor] = {}
        if "final_hidden" in self.parts:
            hidden = signal.final_hidden.detach().float().cpu()
            largest = hidden.abs().max().item() if hidden.numel() else 0.0
            if not largest <= FP16_MAX:
                raise ValueError(f"a teacher final hidden state reaches {largest:.4g}, beyond fp16's range "
                                 f"(±{FP16_MAX:.0f}); this teacher's final hidden states cannot be cached, train "
                                 "with teacher.source=online")
            rows["final_hidden"] = hidden.half()
        if "topk" in self.parts:
            topk = signal.topk
            rows.update(self._pack_ids(topk.ids.cpu()))
            rows["topk_logp"] = topk.logp.detach().cpu().half()
            rows["tail_logmass"] = topk.tail_logmass.detach().cpu().half()
        return rows

    def encode_tokens(self, signal: TeacherSignal, token_counts: list[int]) -> dict[str, Tensor]:
        """The per-token rows to store for `signal`: each window's first `token_counts[w]` (its real tokens),
        concatenated, on the CPU."""
        if "observed_logprobs" not in self.token_parts:
            return {}
        observed = signal.observed_logprobs.detach().float().cpu()
        return {"observed_logprobs": torch.cat([observed[w, :count] for w, count in enumerate(token_counts)]
                                               or [observed.new_zeros(0)])}

    def encode_empty(self) -> dict[str, Tensor]:
        """Zero rows of every stored tensor: their names, dtypes and row shapes."""
        no_rows = TopKTarget(torch.zeros(0, self.top_k, dtype=torch.int64), torch.zeros(0, self.top_k), torch.zeros(0))
        return {**self.encode(TeacherSignal(topk=no_rows, final_hidden=torch.zeros(0, self.hidden_size))),
                **self.encode_tokens(TeacherSignal(observed_logprobs=torch.zeros(0, 0)), [])}

    def decode_tokens(self, windows: list[dict[str, Tensor]], width: int, device) -> Tensor | None:
        """The observed-token log-probabilities [windows, width] of the windows' stored per-token rows, right-padded
        with the online teacher's placeholder (0.0); None when they are not stored."""
        if "observed_logprobs" not in self.token_parts:
            return None
        observed = torch.zeros(len(windows), width)
        for row, window in enumerate(windows):
            stored = window["observed_logprobs"]
            observed[row, : len(stored)] = stored
        return observed.to(device)

    def decode(self, rows: dict[str, Tensor], device) -> TeacherSignal:
        """The `TeacherSignal` of stored per-pair rows; the parts that are not stored come back None."""
        signal = TeacherSignal()
        if "final_hidden" in self.parts:
            signal.final_hidden = rows["final_hidden"].to(device).float()
        if "topk" in self.parts:
            signal.topk = TopKTarget(
                ids=self._unpack_ids(rows).to(device),
                logp=rows["topk_logp"].to(device).float(),
                tail_logmass=rows["tail_logmass"].to(device).float(),
            )
        return signal

    def _pack_ids(self, ids: Tensor) -> dict[str, Tensor]:
        packed = {"topk_ids_low": (ids & 0xFFFF).to(torch.int32).to(torch.uint16)}
        bits = self.id_high_bits
        if bits:
            per_byte = 8 // bits
            high = ids >> LOW_ID_BITS
            high = torch.nn.functional.pad(high, (0, self.high_bytes_per_row * per_byte - self.top_k))
            shifts = torch.arange(per_byte, dtype=torch.int64) * bits
            grouped = high.view(len(ids), self.high_bytes_per_row, per_byte)
            packed["topk_ids_high"] = (grouped << shifts).sum(-1).to(torch.uint8)
        return packed

    def _unpack_ids(self, rows: dict[str, Tensor]) -> Tensor:
        ids = rows["topk_ids_low"].to(torch.int64)
        bits = self.id_high_bits
        if bits:
            per_byte = 8 // bits
            shifts = torch.arange(per_byte, dtype=torch.int64) * bits
            high = (rows["topk_ids_high"].to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
            high = high.reshape(len(ids), self.high_bytes_per_row * per_byte)[:, : self.top_k]
            ids = ids | (high << LOW_ID_BITS)
        return ids


# ---------------------------------------------------------------------------------------------------------------------
# The fingerprint: what must be equal for a cache to serve a run exactly


DATA_KEYS = ("source", "text_field", "window_tokens", "heldout_documents", "eval_fraction", "eval_max_chars", "seed",
             "max_train_windows")
# Conversational runs only (absent from a plain-text run's fingerprint, so caches written before them still serve):
# the row format, how rows are read and rendered, which positions are trained, and each model's chat template.
CHAT_FINGERPRINT_FIELDS = {
    "data.format": "data.format",
    **{f"data.chat.{field.name}": f"data.chat.{field.name}" for field in dataclasses.fields(ChatConfig)},
    "student_chat_template": "the student's chat template (its tokenizer's, or data.chat.student_template)",
    "teacher_chat_template": "the teacher's chat template (its tokenizer's, or data.chat.teacher_template)",
}
# Fingerprint fields that must be equal, each with what changes it. Fields named like config keys are those keys.
FINGERPRINT_FIELDS = {
    "format": "the cache format of this crosskd version",
    "teacher_weights": "models.teacher (its weights)",
    "models.teacher_dtype": "models.teacher_dtype",
    "teacher_tokenizer": "models.teacher (its tokenizer)",
    "teacher_valid_ids": "models.teacher (which of its logit ids are padding)",
    "student_tokenizer": "models.student (its tokenizer decides the windows and the aligned pairs)",
    "corpus_text": "the documents of data.source (their text changed)",
    **{f"data.{key}": f"data.{key}" for key in DATA_KEYS},
    **CHAT_FINGERPRINT_FIELDS,
    "teacher_text": "the continuations in data.teacher_text.dir (written by crosskd write-teacher-text)",
    "training.mixed_precision": "training.mixed_precision (the teacher runs under the run's autocast)",
    "objective.kd_top_k": "objective.kd_top_k",
    "signal": "objective.strategy and its options (what the vocabulary transfer reads of the teacher)",
}


def chat_fingerprint(config: Config, teacher_tokenizer, student_tokenizer) -> dict:
    """The conversational fields of a run's fingerprint (none for plain text)."""
    data = config.data
    if data.format == TEXT_FORMAT:
        return {}
    templates = {f"{role}_chat_template": hashlib.sha256(
        chat_template_of(tokenizer, getattr(data.chat, f"{role}_template"), role).encode("utf-8")).hexdigest()
        for role, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer))}
    return {"data.format": data.format,
            **{f"data.chat.{key}": value for key, value in dataclasses.asdict(data.chat).items()}, **templates}


def run_fingerprint(config: Config, needs: TeacherNeeds, teacher, student_tokenizer, documents: list[Document]) -> dict:
    """The fingerprint of the teacher signal a run reads (`needs`, of its vocabulary transfer). `teacher` is a loaded
    teacher (crosskd.models.loading); `documents` are the corpus's documents or conversations."""
    return {
        "format": FORMAT_VERSION,
        "teacher": config.models.teacher,  # informative only: a moved folder is the same teacher
        "teacher_weights": weights_hash(teacher.model),
        "models.teacher_dtype": config.models.teacher_dtype,
        "teacher_tokenizer": tokenizer_hash(teacher.tokenizer),
        "teacher_valid_ids": valid_ids_hash(teacher.vocab.valid_mask),
        "student_tokenizer": tokenizer_hash(student_tokenizer),
        "corpus_text": documents_hash(documents),
        **{f"data.{key}": getattr(config.data, key) for key in DATA_KEYS},
        **chat_fingerprint(config, teacher.tokenizer, student_tokenizer),
        # Only where the run reads teacher text, so that the caches of other runs still serve.
        **({} if config.data.teacher_text.dir is None else
           {"teacher_text": documents_hash(load_teacher_text(config.data.teacher_text.dir))}),
        "training.mixed_precision": config.training.mixed_precision,
        "objective.kd_top_k": config.objective.kd_top_k,
        "signal": layout_signal(needs),
        "strategy": config.objective.strategy,  # informative only: transfers that read the same parts share a cache
    }


def layout_signal(needs: TeacherNeeds) -> str:
    return "+".join(needs.parts)


def run_layout(config: Config, needs: TeacherNeeds, teacher) -> CacheLayout:
    return CacheLayout(signal=layout_signal(needs), top_k=config.objective.kd_top_k,
                       teacher_logit_size=teacher.vocab.logit_size,
                       hidden_size=teacher.model.config.hidden_size)


def fingerprint_difference(cached: dict, expected: dict) -> str | None:
    """The first compared field that differs, with both values and what changes it; None if all match."""
    for field, cause in FINGERPRINT_FIELDS.items():
        if cached.get(field) != expected.get(field):
            return (f"{field} differs (cache: {_short(cached.get(field))}, this run: {_short(expected.get(field))}; "
                    f"set by {cause}){_missing_parts(cached, expected) if field == 'signal' else ''}")
    return None


def _missing_parts(cached: dict, expected: dict) -> str:
    held = set(str(cached.get("signal")).split("+"))
    missing = [part for part in str(expected.get("signal")).split("+") if part not in held]
    return f": the cache lacks {' and '.join(missing)}, which this run reads" if missing else ""


def _short(value) -> str:
    is_digest = isinstance(value, str) and len(value) == 64
    return value[:12] + "…" if is_digest else json.dumps(value)


# ---------------------------------------------------------------------------------------------------------------------
# The index


def read_index(cache_dir: Path) -> dict | None:
    """The cache's index, None when there is none; a `TeacherCacheError` when it cannot be read."""
    path = cache_dir / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TeacherCacheError(f"{path} is corrupt ({error}): the cache's shards cannot be trusted. Run `crosskd "
                                "cache-teacher` with the run's config again: it writes the cache afresh") from error


def shard_entry(path: Path, **facts) -> dict:
    """A shard's line in the index: its facts plus its size and SHA-256, checked whenever the cache is opened."""
    return {"file": path.name, **facts, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def shard_problem(cache_dir: Path, shard: dict) -> str | None:
    """What is wrong with a shard against its index entry (missing, truncated, overwritten), or None."""
    path = cache_dir / shard["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"{path} has {size} bytes, the index records {shard['bytes']}: truncated or replaced"
    # Indexes written before checksums were recorded are checked by size alone.
    if "sha256" in shard and file_sha256(path) != shard["sha256"]:
        return f"{path} does not match its SHA-256 in {INDEX_FILE}: overwritten or corrupt"
    return None


def write_index(cache_dir: Path, index: dict) -> None:
    """Write then rename: a reader or a resumed writer never sees a half-written index."""
    partial = cache_dir / f".{INDEX_FILE}.{os.getpid()}.tmp"
    partial.write_text(json.dumps(index, indent=1))
    os.replace(partial, cache_dir / INDEX_FILE)
