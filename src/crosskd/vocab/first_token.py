"""The `first-token` strategy: carry the teacher's distribution onto the student vocabulary token by token.

Each teacher token t stands for some bytes b(t). Had the student been reading the same text, the token it would
emit at that byte is the first token of its own tokenisation of b(t). So the map sends t to that student token, and
the teacher's top-k probabilities are pushed through it by scatter-add: several teacher tokens that begin with the
same student token ('▁def', '▁define', '▁default' -> '▁def') pool their mass on it.

See docs/VOCAB.md for the positions where this picture breaks (the student's next token runs past the teacher's)
and what `mismatch_policy` does there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from crosskd.config import ConfigError
from crosskd.data.encoding import gpt2_unicode_to_byte, token_bytes_table
from crosskd.losses.chunking import upcast
from crosskd.losses.target import MappedTarget, StudentGroups, TopKTarget, logsumexp_or_neginf
from crosskd.models.cache import resolve_cache_dir
from crosskd.models.fingerprints import tokenizer_hash
from crosskd.teacher.online import TeacherNeeds
from crosskd.vocab.chain_rule import CHAIN_RULE, chain_rule_loss_sum, chain_rule_target, observed_chains
from crosskd.vocab.transfer import DivergenceTransfer, register_transfer

MISMATCH_POLICIES = (CHAIN_RULE, "exclude", "keep", "merge")
GROUPING_POLICIES = ("merge", CHAIN_RULE)  # the policies that pool run-past student tokens into groups
UNMAPPED = -1  # teacher ids that stand for no text (special, padded): they never carry mass onto the student
# Bump when the mapping rules change, so maps cached by an older rule are rebuilt rather than silently reused.
MAP_ALGORITHM_VERSION = 1
_AFTER_EVERY_ID = torch.iinfo(torch.int64).max  # sorts unmapped entries after every real student id


# ---------------------------------------------------------------------------------------------------------------------
# Hashes and the on-disk cache


def first_token_map_key(student_tokenizer, teacher_tokenizer, teacher_valid_mask: torch.Tensor,
                        rules: str = f"first-token-v{MAP_ALGORITHM_VERSION}") -> str:
    """Cache key: both tokenizers, which teacher logit ids are real tokens, and `rules` (the table's kind and its
    rules' version, plus whatever else its shape depends on)."""
    digest = hashlib.sha256()
    digest.update(f"{rules}\n".encode())
    digest.update(tokenizer_hash(student_tokenizer).encode())
    digest.update(tokenizer_hash(teacher_tokenizer).encode())
    digest.update(teacher_valid_mask.to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def first_token_map_path(key: str, cache_dir: str | os.PathLike | None = None, kind: str = "first_token") -> Path:
    return resolve_cache_dir(cache_dir) / "vocab" / f"{kind}-{key[:32]}.npy"


def load_or_build_table(path: Path, build) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    table = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never loads a half-written file.
    partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, table)
    os.replace(partial, path)
    return table


@dataclass(frozen=True)
class FirstTokenMap:
    """teacher_to_student[t] = the student id teacher id t maps to, or UNMAPPED (-1)."""

    teacher_to_student: torch.Tensor  # int64 [teacher logit size]
    student_vocab_size: int
    key: str

    @property
    def mapped_share(self) -> float:
        return float((self.teacher_to_student != UNMAPPED).float().mean())


def load_or_build_first_token_map(
    student_tokenizer,
    teacher_tokenizer,
    teacher_valid_mask: torch.Tensor,
    student_vocab_size: int,
    cache_dir: str | os.PathLike | None = None,
) -> FirstTokenMap:
    """The map for this tokenizer pair, read from the crosskd cache or built once and written there.

    `teacher_valid_mask` is `VocabFacts.valid_mask` of the teacher: bool [teacher logit size], False for padded ids.
    """
    key = first_token_map_key(student_tokenizer, teacher_tokenizer, teacher_valid_mask)
    table = load_or_build_table(
        first_token_map_path(key, cache_dir),
        lambda: build_first_token_table(student_tokenizer, teacher_tokenizer, teacher_valid_mask.numpy()),
    )
    return FirstTokenMap(torch.from_numpy(table).long(), student_vocab_size, key)


def load_or_build_student_groups(student_tokenizer, teacher_tokenizer, student_logit_size: int,
                                 cache_dir: str | os.PathLike | None = None) -> StudentGroups:
    """The student token groups of this tokenizer pair (`build_group_roots`), cached on disk like the map."""
    # The logit size is part of the key (the table has one row per logit id), not a suffix the path would cut off.
    digest = hashlib.sha256(f"groups-v{MAP_ALGORITHM_VERSION}\n{student_logit_size}\n".encode())
    digest.update(tokenizer_hash(student_tokenizer).encode())
    digest.update(tokenizer_hash(teacher_tokenizer).encode())
    roots = load_or_build_table(
        first_token_map_path(digest.hexdigest(), cache_dir, kind="groups"),
        lambda: build_group_roots(student_tokenizer, teacher_tokenizer, student_logit_size),
    )
    return StudentGroups.from_root_table(torch.from_numpy(roots).long())


# ---------------------------------------------------------------------------------------------------------------------
# Building the map


def build_first_token_table(student_tokenizer, teacher_tokenizer, teacher_valid_mask: np.ndarray) -> np.ndarray:
    """int64 [teacher logit size]: for each teacher id, the first student token of the student's tokenisation of its
    bytes; UNMAPPED for special tokens, padded ids and ids without bytes."""
    table = np.full(teacher_valid_mask.shape[0], UNMAPPED, dtype=np.int64)
    teacher_bytes = token_bytes_table(teacher_tokenizer)
    mapped_ids = [
        teacher_id
        for teacher_id, token in enumerate(teacher_bytes)
        if token is not None and teacher_id < table.shape[0] and teacher_valid_mask[teacher_id]
    ]
    first_ids = first_tokens(student_tokenizer, [teacher_bytes[i] for i in mapped_ids])
    table[mapped_ids] = first_ids
    return table


def build_group_roots(student_tokenizer, teacher_tokenizer, student_logit_size: int) -> np.ndarray:
    """int64 [student logit size]: the root of each student id's group, the id itself for a root.

    A student token s whose bytes run past the teacher's first token r of those bytes (the student's '\\n    ' is
    the teacher's '\\n' followed by '    ') can only be emitted where the teacher emits r. So s joins the group of
    the student token r maps to, first(r): the teacher's probability of r is the probability of that group, the
    event both tokenisers can express. A student token that is itself some group's root stays a root, so groups
    are one level deep; ids without bytes (special, padding) are their own roots.
    """
    roots = np.arange(student_logit_size, dtype=np.int64)
    student_bytes = token_bytes_table(student_tokenizer)
    teacher_bytes = token_bytes_table(teacher_tokenizer)
    with_bytes = [i for i, token in enumerate(student_bytes) if token and i < student_logit_size]
    first_teacher = first_tokens(teacher_tokenizer, [student_bytes[i] for i in with_bytes])
    runs_past = {i: r for i, r in zip(with_bytes, first_teacher)
                 if r != UNMAPPED and teacher_bytes[r] is not None and len(teacher_bytes[r]) < len(student_bytes[i])}
    if not runs_past:
        return roots
    candidate_roots = first_tokens(student_tokenizer, [teacher_bytes[r] for r in runs_past.values()])
    for member, root in zip(runs_past, candidate_roots):
        if root != UNMAPPED and root != member and root not in runs_past:
            roots[member] = root
    return roots


def first_tokens(tokenizer, byte_strings: list[bytes]) -> list[int]:
    """The first token of the tokenizer's mid-text tokenisation of each byte string (none may be empty)."""
    backend = mid_text_tokenizer(tokenizer)
    token_bytes = token_bytes_table(tokenizer)
    byte_level = _is_byte_level(backend)
    texts, text_slots, first_ids = [], [], [0] * len(byte_strings)
    for slot, raw in enumerate(byte_strings):
        try:
            texts.append(raw.decode("utf-8"))
            text_slots.append(slot)
        except UnicodeDecodeError:
            first_ids[slot] = _first_token_of_partial_utf8(backend, raw, byte_level, token_bytes)
    # One Rust batch call for the ~99% of tokens that are whole characters: this is what keeps the build fast.
    for slot, encoding in zip(text_slots, backend.encode_batch(texts, add_special_tokens=False)):
        first_ids[slot] = _first_token_id(encoding.ids, encoding.offsets)
    return first_ids


def mid_text_tokenizer(tokenizer):
    """A copy of the student's Rust tokenizer that tokenises a fragment as if it stood in the middle of a text.

    Teacher tokens are fragments: 'lo' in 'hello' must not become '▁lo', which a SentencePiece-style pipeline would
    produce by prepending its word marker to the start of the text. So prefix-space/prepend settings are turned off.
    """
    from tokenizers import Tokenizer

    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    pipeline["normalizer"] = _without_prepend(pipeline.get("normalizer"))
    pipeline["pre_tokenizer"] = _without_prepend(pipeline.get("pre_tokenizer"))
    pipeline["post_processor"] = None
    return Tokenizer.from_str(json.dumps(pipeline))


def _without_prepend(component):
    """The component with every 'prepend a word marker to the text' setting off (recursing into Sequences)."""
    if component is None:
        return None
    if component.get("type") == "Sequence":
        key = "normalizers" if "normalizers" in component else "pretokenizers"
        parts = [_without_prepend(part) for part in component[key]]
        return {**component, key: [part for part in parts if part is not None]}
    if component.get("type") == "Prepend":
        return None
    settings = dict(component)
    if "prepend_scheme" in settings:
        settings["prepend_scheme"] = "never"
    if "add_prefix_space" in settings:
        settings["add_prefix_space"] = False
    return settings


def _is_byte_level(backend) -> bool:
    pipeline = json.loads(backend.to_str())
    return '"ByteLevel"' in json.dumps(pipeline.get("pre_tokenizer")) + json.dumps(pipeline.get("decoder"))


def _first_token_of_partial_utf8(backend, raw: bytes, byte_level: bool, student_bytes: list[bytes | None]) -> int:
    """First student token for bytes that are not valid UTF-8: a character cut by the teacher's byte-level BPE.

    Such bytes cannot be passed as text. The student would have seen them inside the whole character:
    - a byte-level student BPEs the byte-level characters of those bytes: apply its BPE model to them directly.
      The regex pre-tokenizer never splits inside a character, so the cut character belongs to the same chunk as
      what precedes it, unless the valid text before it already splits into several chunks; then the first chunk
      alone decides the first token.
    - any other student (byte fallback) spells a character it lacks as one token per byte. The valid text before
      the cut character decides the first token if there is any; otherwise it is the byte token of the first byte.
    """
    valid_prefix = _longest_valid_utf8_prefix(raw)
    if byte_level:
        chunks = backend.pre_tokenizer.pre_tokenize_str(valid_prefix.decode("utf-8")) if valid_prefix else []
        first_chunk = chunks[0][0] if len(chunks) >= 2 else _byte_level_string(raw)
        return _first_bpe_token(backend, first_chunk)
    if valid_prefix:
        encoding = backend.encode(valid_prefix.decode("utf-8"), add_special_tokens=False)
        return _first_token_id(encoding.ids, encoding.offsets)
    return _single_byte_token(student_bytes, raw[0])


def _first_token_id(ids: list[int], offsets: list[tuple[int, int]]) -> int:
    # A BPE without an unknown token silently drops characters it lacks: the reference student has no token for a
    # few control bytes (0x04, 0x06, ...) nor for the bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF). The
    # student cannot emit text starting with those, so such a teacher token stays unmapped rather than being mapped
    # to whatever token follows the dropped character.
    if not ids or offsets[0][0] != 0:
        return UNMAPPED
    return ids[0]


def _first_bpe_token(backend, byte_level_chunk: str) -> int:
    tokens = backend.model.tokenize(byte_level_chunk)
    return _first_token_id([token.id for token in tokens], [token.offsets for token in tokens])


def _longest_valid_utf8_prefix(raw: bytes) -> bytes:
    try:
        raw.decode("utf-8")
        return raw
    except UnicodeDecodeError as error:
        return raw[: error.start]


def _byte_level_string(raw: bytes) -> str:
    """GPT-2's byte-to-printable-character spelling, the alphabet a byte-level BPE's vocabulary is written in."""
    byte_to_unicode = {byte: char for char, byte in gpt2_unicode_to_byte().items()}
    return "".join(byte_to_unicode[b] for b in raw)


def _single_byte_token(student_bytes: list[bytes | None], byte: int) -> int:
    target = bytes([byte])
    for student_id, token in enumerate(student_bytes):
        if token == target:
            return student_id
    raise ValueError(f"the student has no token for the single byte {byte:#04x}, so cut characters cannot be mapped")


# ---------------------------------------------------------------------------------------------------------------------
# Pushing the teacher's top-k through the map


def push_topk_through_map(topk: TopKTarget, teacher_to_student: Tensor) -> MappedTarget:
    """The teacher's top-k pushed onto the student vocabulary: scatter-add of each row's top-k probabilities onto the
    student ids they map to, so duplicates merge into one atom.

    Top-k ids that map to no student token (UNMAPPED) add their mass to the tail atom, so the target keeps its total
    mass. Each row's distinct student ids come first; the remaining slots are masked out.
    """
    mapped = teacher_to_student.to(topk.ids.device)[topk.ids]
    is_mapped = mapped != UNMAPPED
    probs = upcast(topk.logp).exp()
    # Sorting puts equal student ids next to each other, unmapped ones last (largest key); each run of equal ids
    # becomes one output slot, numbered by the running count of run starts.
    sort_key = mapped.masked_fill(~is_mapped, _AFTER_EVERY_ID)
    sorted_key, order = sort_key.sort(dim=-1)
    sorted_mapped = sorted_key != _AFTER_EVERY_ID
    sorted_probs = probs.gather(-1, order).masked_fill(~sorted_mapped, 0.0)
    starts_run = torch.ones_like(sorted_mapped)
    starts_run[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    slot = starts_run.long().cumsum(dim=-1) - 1
    merged_probs = torch.zeros_like(probs).scatter_add(-1, slot, sorted_probs)
    ids = torch.zeros_like(topk.ids).scatter(-1, slot, sorted_key.masked_fill(~sorted_mapped, 0))
    mask = torch.zeros_like(sorted_mapped).scatter(-1, slot, sorted_mapped)
    # Empty slots take log(1) rather than log(0): they are masked anyway, and a -inf there would turn a zero gradient
    # into NaN (0 * inf) in the backward of log.
    merged_logp = merged_probs.masked_fill(~mask, 1.0).log()
    return MappedTarget(ids=ids, logp=merged_logp, mask=mask, tail_logmass=tail_logmass_with(topk, ~is_mapped))


def tail_logmass_with(topk: TopKTarget, left_out: Tensor) -> Tensor:
    """float32 [P]: the log of the top-k's tail mass plus the mass of its slots ``left_out`` (bool [P, K]), the
    tail of a target whose support drops those slots."""
    left_out_logmass = logsumexp_or_neginf(upcast(topk.logp).masked_fill(~left_out, -math.inf))
    return logsumexp_or_neginf(torch.stack([upcast(topk.tail_logmass), left_out_logmass], dim=-1))


def first_token_kd_pairs(pair_student_next_bytes: Tensor, pair_teacher_next_bytes: Tensor) -> Tensor:
    """bool [P]: aligned pairs whose true next student token the first-token target can describe.

    Where the student's next token runs past the teacher's ('\\n    ' against Qwen's '\\n'), the true token is not
    the first student token of any likely teacher token, so the mapped target gives it almost no probability
    (NLL ~26 nats on the reference pair): such pairs are left out of KD (mismatch_policy 'exclude').
    """
    return pair_student_next_bytes <= pair_teacher_next_bytes


# ---------------------------------------------------------------------------------------------------------------------
# The mismatch policies and the transfer


def policy_map(policy: str, student_tokenizer, teacher_tokenizer, teacher_valid_mask: Tensor,
               student_logit_size: int) -> tuple[Tensor, StudentGroups | None]:
    """The teacher -> student map `mismatch_policy` distils through, and the student groups whose atoms it pools:
    with `merge` (and `chain-rule`, built on it), student tokens that run past the teacher's token share one atom
    with it (docs/VOCAB.md), so the map points at group roots."""
    teacher_to_student = load_or_build_first_token_map(student_tokenizer, teacher_tokenizer, teacher_valid_mask,
                                                       student_logit_size).teacher_to_student
    if policy not in GROUPING_POLICIES:
        return teacher_to_student, None
    groups = load_or_build_student_groups(student_tokenizer, teacher_tokenizer, student_logit_size)
    return groups.root_of(teacher_to_student), groups


def policy_kd_pairs(policy: str, pair_student_next_bytes: Tensor, pair_teacher_next_bytes: Tensor) -> Tensor:
    """bool [P]: the aligned pairs `mismatch_policy` distils (`exclude` leaves out `first_token_kd_pairs`' others)."""
    if policy == "exclude":
        return first_token_kd_pairs(pair_student_next_bytes, pair_teacher_next_bytes)
    return torch.ones_like(pair_student_next_bytes, dtype=torch.bool)


class TokenMapOnDevice:
    """A teacher -> student id table, copied once to the device the batches are on."""

    def __init__(self, teacher_to_student: Tensor):
        self.table = teacher_to_student

    def on(self, device) -> Tensor:
        if self.table.device != torch.device(device):
            self.table = self.table.to(device)
        return self.table


class FirstTokenRetention:
    """The retention target of a transfer whose KD target is not the first-token one (ULD, student-projection):
    the teacher's top-k at the KD pairs pushed through the plain first-token map (no groups), so the retention
    metrics compare every strategy with the teacher on the student's vocabulary the same way."""

    def __init__(self, student, teacher):
        token_map = load_or_build_first_token_map(student.tokenizer, teacher.tokenizer, teacher.vocab.valid_mask,
                                                  student.vocab.logit_size)
        self.teacher_to_student = TokenMapOnDevice(token_map.teacher_to_student)

    def target(self, signal, selection) -> MappedTarget:
        topk = signal.topk.select(selection.kd_pairs)
        return push_topk_through_map(topk, self.teacher_to_student.on(topk.ids.device))


@register_transfer
class FirstTokenTransfer(DivergenceTransfer):
    """The teacher's top-k pushed through the first-token map onto the student's vocabulary.

    `objective.mismatch_policy`: where the student's next token runs past the teacher's, `merge` pools such student
    tokens with the token the teacher's maps to (the map then points at group roots and the student's atoms pool
    their groups), `chain-rule` also splits the group's teacher mass between the observed token and the rest by the
    teacher's chain probability of the observed text (crosskd.vocab.chain_rule), `exclude` leaves those pairs out of
    KD (`first_token_kd_pairs`), `keep` keeps them as they are.
    """

    name = "first-token"
    exclusive_options = {"mismatch_policy": MISMATCH_POLICIES}

    @classmethod
    def check_config(cls, objective) -> None:
        super().check_config(objective)
        divergence = objective.divergence or "forward_kl"
        if objective.mismatch_policy == CHAIN_RULE and divergence != "forward_kl":
            raise ConfigError(f"objective.mismatch_policy chain-rule splits the forward KL exactly into a group level "
                              f"and a within-group term; objective.divergence {divergence!r} has no such split. Set "
                              "objective.divergence: forward_kl, or use mismatch_policy merge")

    @classmethod
    def teacher_needs(cls, objective) -> TeacherNeeds:
        # Chain-rule alone reads the teacher's observed-token log-probabilities: the other policies' caches stay topk.
        return TeacherNeeds(topk=True, observed_logprobs=objective.mismatch_policy == CHAIN_RULE)

    def __init__(self, config, teacher, student):
        super().__init__(config, teacher, student)
        self.policy = config.objective.mismatch_policy
        teacher_to_student, self.groups = policy_map(self.policy, student.tokenizer, teacher.tokenizer,
                                                     teacher.vocab.valid_mask, student.vocab.logit_size)
        self.teacher_to_student = TokenMapOnDevice(teacher_to_student)

    def kd_pairs(self, batch) -> Tensor:
        return policy_kd_pairs(self.policy, batch.pair_student_next_bytes, batch.pair_teacher_next_bytes)

    def micro_batch_inputs(self, signal, batch, selection, student_hidden):
        """With chain-rule, the observed chains at the KD pairs (None otherwise)."""
        if self.policy != CHAIN_RULE:
            return None
        groups = self.student_groups(batch.student_input_ids.device)
        return observed_chains(batch, signal.observed_logprobs, groups.root_table).select(selection.kd_pairs)

    def kd_target(self, signal, selection, inputs, student_embedding):
        topk = signal.topk.select(selection.kd_pairs)
        merged = push_topk_through_map(topk, self.teacher_to_student.on(topk.ids.device))
        if inputs is None:
            return merged
        return chain_rule_target(merged, inputs, self.student_groups(topk.ids.device).root_table)

    def kd_loss_sum(self, temperature: float, device):
        if self.policy != CHAIN_RULE:
            return super().kd_loss_sum(temperature, device)
        return functools.partial(chain_rule_loss_sum, temperature=temperature, groups=self.student_groups(device))

    def retention_target(self, signal, selection, inputs, student_embedding) -> MappedTarget:
        """The merged target (chain-rule's group level): what the retention metrics compare on the support."""
        return self.kd_target(signal, selection, None, student_embedding)

    def student_groups(self, device) -> StudentGroups | None:
        if self.groups is not None and self.groups.members.device != torch.device(device):
            self.groups = self.groups.to(device)
        return self.groups
