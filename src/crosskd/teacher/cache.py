"""The teacher signal cached once, read by any number of runs: `crosskd cache-teacher` and `teacher.source: cache`.

The writer runs the teacher over exactly the windows a configured run reads (its preparation windows when the
projector is pre-fitted, the training budget, the held-out windows of the retention metrics), in the run's own
micro-batches, through the same `OnlineTeacher` the trainer uses, and stores the parts of the signal the run's
vocabulary transfer reads (its `TeacherNeeds`, cache_format.py).
The reader serves `TeacherSignal`s from the memory-mapped shards, finding each window by its key, so a window that
changed or was never cached is an error, never a wrong target. docs/CACHE.md has the format, sizes and exactness.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from crosskd.config import Config, require_cacheable_terms
from crosskd.data.collate import DualBatch, collate_windows
from crosskd.data.corpus import TrainingCorpus, load_corpus_documents, windows_per_step
from crosskd.models.allocator import freed_memory_kept
from crosskd.models.loading import load_model, load_tokenizer
from crosskd.models.precision import MixedPrecision
from crosskd.teacher.cache_format import (
    TeacherCacheError,
    shard_entry,
    shard_problem,
    FORMAT_VERSION,
    INDEX_FILE,
    KEY_BYTES,
    CacheLayout,
    cache_dir_of,
    fingerprint_difference,
    read_index,
    rows_per_window,
    run_fingerprint,
    run_layout,
    tokens_per_window,
    window_keys,
    write_index,
)
from crosskd.teacher.online import OnlineTeacher, TeacherNeeds, TeacherSignal

DEFAULT_SHARD_MEGABYTES = 64
WINDOW_BYTES = KEY_BYTES + 8  # a window's key and its row offset
WINDOW_TOKEN_OFFSET_BYTES = 8  # a window's offset in its shard's per-token rows, when the layout has any


# ---------------------------------------------------------------------------------------------------------------------
# Which windows a run reads


@dataclass(frozen=True)
class Budget:
    """The training windows a run reads: the first `training_windows` of the corpus stream."""

    max_steps: int | None
    epochs: int
    windows_per_step: int
    training_windows: int

    def to_dict(self) -> dict:
        return vars(self).copy()


def planned_batches(config: Config, corpus, teacher_pad_id: int, budget: Budget,
                    with_preparation: bool) -> Iterator[tuple[str, DualBatch]]:
    """(stage, micro-batch) for every micro-batch whose teacher signal the run reads, in the run's composition: the
    stream cut into `batch_size` windows is exactly what the trainer's processes read, whatever their number.
    `with_preparation`: the run's vocabulary transfer is prepared (pre-fitted) on the preparation windows."""
    batch_size = config.training.batch_size
    if with_preparation:
        for batch in corpus.preparation_batches(batch_size, "cpu"):
            yield "preparation", batch
    stream = corpus.train_windows(start=0, process_index=0, num_processes=1, batch_size=batch_size)
    for _ in range(budget.training_windows // batch_size):
        yield "training", collate_windows(next(stream), teacher_pad_id)
    for batch in corpus.eval_batches(batch_size, "cpu"):
        yield "evaluation", batch


# ---------------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class CacheSummary:
    cache_dir: Path
    micro_batches: int
    windows: int
    unique_windows: int
    positions: int  # aligned pairs stored (one row each)
    student_tokens: int  # student tokens of the stored windows
    bytes: int
    seconds: float
    resumed_at: int  # micro-batches already cached when this call started

    @property
    def bytes_per_position(self) -> float:
        return self.bytes / max(1, self.positions)

    @property
    def bytes_per_student_token(self) -> float:
        return self.bytes / max(1, self.student_tokens)

    def describe(self) -> str:
        return (f"teacher cache {self.cache_dir}: {self.unique_windows} windows ({self.windows} read by the run), "
                f"{self.positions} aligned positions, {self.bytes / 2**20:.1f} MiB = "
                f"{self.bytes_per_position:.0f} bytes per aligned position, "
                f"{self.bytes_per_student_token:.0f} bytes per student token; "
                f"{self.seconds:.1f} s"
                + (f" ({self.resumed_at} micro-batches were already cached)" if self.resumed_at else ""))


def _survey(batches: Iterator[tuple[str, DualBatch]]) -> dict:
    """Counts of the plan and the hash of its window keys, from one pass over the windows (no teacher)."""
    digest = hashlib.sha256()
    seen: set[bytes] = set()
    survey = {"micro_batches": 0, "windows": 0, "unique_windows": 0, "positions": 0, "student_tokens": 0,
              "teacher_tokens": 0}
    for _, batch in batches:
        survey["micro_batches"] += 1
        for key, rows, tokens, teacher_tokens in zip(window_keys(batch), rows_per_window(batch),
                                                     batch.student_attention_mask.sum(dim=1).tolist(),
                                                     tokens_per_window(batch)):
            digest.update(key)
            survey["windows"] += 1
            if key not in seen:
                seen.add(key)
                survey["unique_windows"] += 1
                survey["positions"] += rows
                survey["student_tokens"] += tokens
                survey["teacher_tokens"] += teacher_tokens
    return {**survey, "window_ids": digest.hexdigest()}


class _ShardWriter:
    """Collects the rows of new windows and writes them as one shard, atomically, then records it in the index."""

    def __init__(self, cache_dir: Path, index: dict):
        self.cache_dir = cache_dir
        self.index = index
        self.keys: list[bytes] = []
        self.rows: list[dict[str, torch.Tensor]] = []
        self.counts: list[tuple[int, int]] = []  # (aligned pairs, teacher tokens) of each window
        self.start = index["shards"][-1]["micro_batches"][1] if index["shards"] else 0

    def add(self, key: bytes, rows: dict[str, torch.Tensor], pairs: int, tokens: int) -> None:
        self.keys.append(key)
        self.rows.append(rows)
        self.counts.append((pairs, tokens))

    def flush(self, end: int, layout: CacheLayout) -> None:
        number = len(self.index["shards"])
        name = f"shard-{number:05d}.safetensors"
        counts = [pairs for pairs, _ in self.counts]
        empty = layout.encode_empty()
        tensors = {row_name: torch.cat([empty[row_name], *(rows[row_name] for rows in self.rows)])
                   for row_name in empty}
        keys = torch.tensor(list(b"".join(self.keys)), dtype=torch.uint8)
        tensors["window_keys"] = keys.reshape(len(self.keys), KEY_BYTES)  # no rows when every window was cached before
        tensors["window_offsets"] = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
        if layout.token_parts:
            tensors["window_token_offsets"] = torch.tensor([0, *(tokens for _, tokens in self.counts)],
                                                           dtype=torch.int64).cumsum(0)
        partial = self.cache_dir / f".{name}.{os.getpid()}.tmp"
        save_file(tensors, str(partial))
        os.replace(partial, self.cache_dir / name)
        self.index["shards"].append(shard_entry(self.cache_dir / name, micro_batches=[self.start, end],
                                                windows=len(self.keys), positions=sum(counts)))
        write_index(self.cache_dir, self.index)
        self.keys, self.rows, self.counts, self.start = [], [], [], end


def _cached_keys(cache_dir: Path, index: dict) -> set[bytes]:
    keys: set[bytes] = set()
    for shard in index["shards"]:
        with safe_open(cache_dir / shard["file"], framework="pt") as handle:
            keys.update(bytes(row) for row in handle.get_tensor("window_keys").numpy())
    return keys


def write_teacher_cache(config: Config, needs: TeacherNeeds, with_preparation: bool, processes: int = 1,
                        shard_megabytes: float = DEFAULT_SHARD_MEGABYTES, progress: bool = True) -> CacheSummary:
    """Run the teacher over the windows `config`'s run reads and store the parts of its signal the run's vocabulary
    transfer `needs` (with its preparation windows when `with_preparation`); resume an interrupted cache. Like
    training, with `training.keep_freed_memory` the teacher's large logit buffers are reused from batch to batch."""
    with freed_memory_kept(config.training.keep_freed_memory):
        return _write_teacher_cache(config, needs, with_preparation, processes, shard_megabytes, progress)


def _write_teacher_cache(config: Config, needs: TeacherNeeds, with_preparation: bool, processes: int,
                         shard_megabytes: float, progress: bool) -> CacheSummary:
    require_cacheable_terms(config)
    if processes < 1 or shard_megabytes <= 0:
        raise ValueError(f"processes ({processes}) must be at least 1 and shard_megabytes ({shard_megabytes}) positive")
    started = time.perf_counter()
    cache_dir = cache_dir_of(config)
    accelerator = Accelerator(mixed_precision=config.training.mixed_precision)
    precision = MixedPrecision(accelerator, config.training.mixed_precision)
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    teacher.model.to(accelerator.device)
    student_tokenizer = load_tokenizer(config.models.student, "student")
    corpus = TrainingCorpus(config.data, student_tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    step_windows = windows_per_step(config.training, processes)
    budget = Budget(config.training.max_steps, config.training.epochs, step_windows,
                    corpus.optimizer_steps(config.training, step_windows) * step_windows)
    layout = run_layout(config, needs, teacher)
    fingerprint = run_fingerprint(config, needs, teacher, student_tokenizer, load_corpus_documents(config.data))

    def plan() -> Iterator[tuple[str, DualBatch]]:
        return planned_batches(config, corpus, teacher.vocab.pad_id, budget, with_preparation)

    survey = _survey(plan())
    window_bytes = WINDOW_BYTES + (WINDOW_TOKEN_OFFSET_BYTES if layout.token_parts else 0)
    estimate = (survey["positions"] * layout.bytes_per_row + survey["teacher_tokens"] * layout.bytes_per_token
                + survey["unique_windows"] * window_bytes)
    shard_micro_batches = max(1, int(shard_megabytes * 2**20 * survey["micro_batches"] / max(1, estimate)))
    index = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "layout": layout.to_dict(),
             "budget": budget.to_dict(), "plan": {**survey, "shard_micro_batches": shard_micro_batches},
             "shards": [], "complete": False}
    try:
        existing = read_index(cache_dir)
    except TeacherCacheError as error:
        print(f"{error}; writing it afresh", flush=True)
        existing = None
        for stale in cache_dir.glob("shard-*.safetensors"):
            stale.unlink()
    if existing is not None:
        difference = fingerprint_difference(existing["fingerprint"], fingerprint) or _plan_difference(existing, index)
        if difference:
            raise TeacherCacheError(
                f"{cache_dir} already holds a teacher cache for another run: {difference}. Delete that folder, or set "
                "teacher.cache_dir to another folder for this run"
            )
        index = existing
        shard_micro_batches = index["plan"]["shard_micro_batches"]
        _drop_damaged_shards(cache_dir, index)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for partial in cache_dir.glob(".*.tmp"):  # left by a killed writer; only renamed files are part of the cache
        partial.unlink()
    writer = _ShardWriter(cache_dir, index)
    resumed_at = writer.start
    print(f"caching the teacher signal ({layout.signal}, k={layout.top_k}) of {survey['micro_batches']} micro-batches "
          f"= {survey['unique_windows']} windows, {survey['positions']} aligned positions into {cache_dir}: "
          f"estimated {estimate / 2**20:.1f} MiB ({layout.bytes_per_row} bytes per aligned position, "
          f"{estimate / max(1, survey['student_tokens']):.0f} per student token)"
          + ("; already complete" if index["complete"] else
             f"; resuming after {resumed_at} micro-batches" if resumed_at else ""), flush=True)

    if not index["complete"]:
        source = OnlineTeacher(teacher.model, teacher.vocab.valid_mask, config.objective.kd_top_k,
                               config.objective.chunk_size, needs)
        seen = _cached_keys(cache_dir, index)
        bar = tqdm(total=survey["micro_batches"], initial=resumed_at, unit="batch", desc="teacher",
                   disable=not progress)
        for number, (stage, batch) in enumerate(plan()):
            if number < resumed_at:
                continue
            keys = window_keys(batch)
            if not set(keys) <= seen:
                # Training micro-batches run under the trainer's autocast, preparation and evaluation outside it.
                with precision.autocast() if stage == "training" else contextlib.nullcontext():
                    signal = source.signal(batch.to(accelerator.device))
                pair_counts, token_counts = rows_per_window(batch), tokens_per_window(batch)
                rows = {**{name: tensor.split(pair_counts) for name, tensor in layout.encode(signal).items()},
                        **{name: tensor.split(token_counts)
                           for name, tensor in layout.encode_tokens(signal, token_counts).items()}}
                for window, key in enumerate(keys):
                    if key not in seen:
                        seen.add(key)
                        writer.add(key, {name: parts[window] for name, parts in rows.items()},
                                   pair_counts[window], token_counts[window])
            bar.update(1)
            if number + 1 - writer.start == shard_micro_batches or number + 1 == survey["micro_batches"]:
                writer.flush(number + 1, layout)
        bar.close()
        index["complete"] = True
        write_index(cache_dir, index)
    return CacheSummary(cache_dir, survey["micro_batches"], survey["windows"], survey["unique_windows"],
                        survey["positions"], survey["student_tokens"],
                        sum(shard["bytes"] for shard in index["shards"]), time.perf_counter() - started, resumed_at)


def _drop_damaged_shards(cache_dir: Path, index: dict) -> None:
    """Cut the index before its first damaged shard, so that the writer rewrites it and every shard after it
    (shards hold consecutive micro-batches; a later one may lean on the windows of an earlier one)."""
    for number, shard in enumerate(index["shards"]):
        problem = shard_problem(cache_dir, shard)
        if problem is not None:
            print(f"{problem}: rewriting the cache from micro-batch {shard['micro_batches'][0]}", flush=True)
            index["shards"], index["complete"] = index["shards"][:number], False
            write_index(cache_dir, index)
            return


def _plan_difference(existing: dict, planned: dict) -> str | None:
    for section in ("layout", "budget"):
        if existing[section] != planned[section]:
            return f"its {section} differs (cache: {existing[section]}, this run: {planned[section]})"
    if existing["plan"]["window_ids"] != planned["plan"]["window_ids"]:
        return "the windows of the plan differ (window_ids)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Reading


class CachedTeacher:
    """Serves a run's `TeacherSignal` from a cache; the same interface as `OnlineTeacher`."""

    def __init__(self, cache_dir: Path, index: dict):
        self.cache_dir = cache_dir
        self.layout = CacheLayout(**index["layout"])
        self.paths = [cache_dir / shard["file"] for shard in index["shards"]]
        # safe_open maps each shard into memory; rows are read from the map when a window is asked for.
        self.shards = [safe_open(path, framework="pt") for path in self.paths]
        # key -> (shard, its pair rows, its per-token rows)
        self.locations: dict[bytes, tuple[int, slice, slice]] = {}
        for number, shard in enumerate(self.shards):
            offsets = shard.get_tensor("window_offsets").tolist()
            token_offsets = (shard.get_tensor("window_token_offsets").tolist() if self.layout.token_parts
                             else [0] * len(offsets))
            for window, key in enumerate(shard.get_tensor("window_keys").numpy()):
                self.locations[bytes(key)] = (number, slice(offsets[window], offsets[window + 1]),
                                              slice(token_offsets[window], token_offsets[window + 1]))
        self.token_row_names = list(self.layout.token_parts)  # each per-token part is one stored tensor
        self.pair_row_names = [name for name in self.layout.encode_empty() if name not in self.token_row_names]
        self._prefetched: set[int] = set()

    def signal(self, batch: DualBatch, hidden_states: bool = False, attentions: bool = False) -> TeacherSignal:
        if hidden_states or attentions:
            raise TeacherCacheError(
                "a teacher cache holds no intermediate hidden states or attention maps, which a router, layerwise, "
                "contrastive or attention term asked for; run those with teacher.source=online"
            )
        windows = [self._window_rows(key) for key in window_keys(batch)]
        rows = {name: torch.cat([window[name] for window in windows]) for name in self.pair_row_names}
        signal = self.layout.decode(rows, batch.pair_batch.device)
        signal.observed_logprobs = self.layout.decode_tokens(windows, batch.teacher_input_ids.shape[1],
                                                             batch.pair_batch.device)
        return signal

    def _window_rows(self, key: bytes) -> dict[str, torch.Tensor]:
        location = self.locations.get(key)
        if location is None:
            raise TeacherCacheError(
                f"a window of this run is not in the teacher cache {self.cache_dir}: the run reads windows the cache "
                "was not written for (a longer run, a projector run on a cache written without its preparation "
                "windows, or changed windowing code). Re-run `crosskd cache-teacher` with this run's config"
            )
        shard, pair_rows, token_rows = location
        self._prefetch(shard + 1)
        handle = self.shards[shard]
        return {**{name: handle.get_slice(name)[pair_rows] for name in self.pair_row_names},
                **{name: handle.get_slice(name)[token_rows] for name in self.token_row_names}}

    def _prefetch(self, shard: int) -> None:
        """Ask the kernel to read the next shard ahead (windows are read in the order they were written)."""
        if shard >= len(self.paths) or shard in self._prefetched or not hasattr(os, "posix_fadvise"):
            return
        self._prefetched.add(shard)
        descriptor = os.open(self.paths[shard], os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(descriptor)


def open_teacher_cache(config: Config, needs: TeacherNeeds, teacher, student_tokenizer) -> CachedTeacher:
    """The cache `config` names, after checking it was written for exactly this run's teacher signal (`needs`)."""
    cache_dir = cache_dir_of(config)
    index = read_index(cache_dir)
    rerun = "Run `crosskd cache-teacher` with this run's config"
    if index is None:
        raise TeacherCacheError(f"teacher.source is 'cache' but {cache_dir} holds no teacher cache ({INDEX_FILE} is "
                                f"missing). {rerun}, or set teacher.cache_dir to the folder that holds it")
    if index.get("format") != FORMAT_VERSION:
        raise TeacherCacheError(f"the teacher cache {cache_dir} has format {index.get('format')}, this crosskd reads "
                                f"format {FORMAT_VERSION}. {rerun} to rewrite it")
    if not index["complete"]:
        done = index["shards"][-1]["micro_batches"][1] if index["shards"] else 0
        raise TeacherCacheError(f"the teacher cache {cache_dir} is incomplete ({done} of "
                                f"{index['plan']['micro_batches']} micro-batches). {rerun} again: it resumes")
    expected = run_fingerprint(config, needs, teacher, student_tokenizer, load_corpus_documents(config.data))
    difference = fingerprint_difference(index["fingerprint"], expected)
    if difference:
        raise TeacherCacheError(f"the teacher cache {cache_dir} was written for another run: {difference}. {rerun} "
                                "(or point teacher.cache_dir at a cache written for it)")
    _require_budget(Budget(**index["budget"]), config, PartialState().num_processes, cache_dir)
    for shard in index["shards"]:
        problem = shard_problem(cache_dir, shard)
        if problem is not None:
            raise TeacherCacheError(f"the teacher cache {cache_dir} is damaged: {problem}. {rerun} again: it "
                                    "rewrites the damaged shard and those after it")
    return CachedTeacher(cache_dir, index)


def _require_budget(cached: Budget, config: Config, processes: int, cache_dir: Path) -> None:
    """The run must read no training window beyond the cached ones (they are a prefix of the same stream)."""
    training = config.training
    step_windows = windows_per_step(config.training, processes)
    if training.max_steps is not None:
        needed = training.max_steps * step_windows
        if needed <= cached.training_windows:
            return
        reason = (f"this run reads {needed} training windows (training.max_steps {training.max_steps} x "
                  f"{step_windows} windows per step over {processes} process(es)), the cache holds the first "
                  f"{cached.training_windows}")
    elif cached.max_steps is None and (cached.epochs, cached.windows_per_step) == (training.epochs, step_windows):
        return
    else:
        reason = (f"this run reads training.epochs={training.epochs} at {step_windows} windows per step; the cache was "
                  f"written for max_steps={cached.max_steps}, epochs={cached.epochs} at {cached.windows_per_step}")
    raise TeacherCacheError(f"the teacher cache {cache_dir} does not cover this run: {reason}. Run `crosskd "
                            f"cache-teacher` with this run's config (--processes {processes})")
