"""The teacher writes training text: `crosskd write-teacher-text`, sequence-level distillation's data.

Per-token KD teaches the student the teacher's distribution at the text's own positions only; the teacher's own
continuations are text the corpus does not have, drawn from the teacher's distribution over whole sequences. With
temperature 1 and top_p 1 (the defaults), the language-model loss on them is a sample of sequence-level forward KL
from the teacher; KD on them adds the teacher's per-token distribution along its own text (Kim & Rush's word- plus
sequence-level KD). For a small corpus they are also fresh text where repeating the corpus overfits.

Prompts are the starts of the first training windows (`data.teacher_text.prompt_tokens` student tokens of each,
decoded to text, separators dropped); each prompt gets `samples_per_window` sampled continuations. Writing resumes
where it stopped: a generate call's continuations become one part, seeded by its first continuation's number, so a
resumed folder is the one a straight run writes. The folder format is data/teacher_text.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from crosskd.config import Config
from crosskd.data.corpus import TrainingCorpus
from crosskd.data.teacher_text import FORMAT_VERSION, INDEX_FILE, TeacherTextError, part_name, read_index
from crosskd.data.windows import DualWindow, window_ids_sha256
from crosskd.models.fingerprints import tokenizer_hash, weights_hash
from crosskd.models.loading import load_model, load_tokenizer


@dataclass(frozen=True)
class Prompt:
    window: int  # the window's place in the training stream
    text: str


@dataclass(frozen=True)
class WritingSummary:
    folder: Path
    prompts: int
    samples: int
    teacher_tokens: int
    stopped_early: int  # continuations that ended with the teacher's end-of-text token
    seconds: float
    resumed_at: int  # continuations already written when this call started

    def describe(self) -> str:
        resumed = f", resumed after {self.resumed_at}" if self.resumed_at else ""
        return (f"teacher text in {self.folder}: {self.samples} continuations of {self.prompts} prompts, "
                f"{self.teacher_tokens:,} teacher tokens ({self.stopped_early} ended early){resumed}, "
                f"{self.seconds:.0f} s")


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def prompts_of(windows: list[DualWindow], student_tokenizer, prompt_tokens: int) -> list[Prompt]:
    """The starts of the training `windows` as text. A start that is all separators or whitespace gives no prompt
    (it is left out with a warning)."""
    prompts, empty, count = [], 0, len(windows)
    for place, window in enumerate(windows):
        text = student_tokenizer.decode(list(window.student_ids[:prompt_tokens]), skip_special_tokens=True)
        if text.strip():
            prompts.append(Prompt(place, text))
        else:
            empty += 1
    if empty:
        warnings.warn(f"{empty} of {count} prompt windows start with no text (separators or whitespace only) and "
                      "prompt nothing", stacklevel=2)
    if not prompts:
        raise TeacherTextError(f"none of the first {count} training windows gives a prompt; raise "
                               "data.teacher_text.prompt_tokens or check data.source")
    return prompts


def _stop_ids(teacher) -> list[int]:
    """The teacher's end-of-text tokens: its eos and its document separator (Qwen2.5 ends chat turns with the one
    and documents with the other)."""
    return sorted({i for i in (teacher.vocab.eos_id, teacher.vocab.separator_id) if i is not None})


def _continue(teacher, prompts: list[str], settings, stop_ids: list[int], seed: int) -> list[tuple[str, int, bool]]:
    """One generate call: (continuation text, its teacher tokens, whether it ended on a stop token) per prompt."""
    tokenizer = teacher.tokenizer
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    inputs = inputs.to(next(teacher.model.parameters()).device)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = teacher.model.generate(
            **inputs, do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
            max_new_tokens=settings.new_tokens, eos_token_id=stop_ids, pad_token_id=teacher.vocab.pad_id,
            # Logit ids past the tokenizer's (padding of the output layer) are no tokens: never sample them.
            suppress_tokens=torch.nonzero(~teacher.vocab.valid_mask).flatten().tolist() or None)
    continuations = []
    for row in output[:, inputs["input_ids"].shape[1]:].tolist():
        ends = [place for place, token in enumerate(row) if token in stop_ids]
        kept = row[: ends[0]] if ends else row
        continuations.append((tokenizer.decode(kept, skip_special_tokens=True), len(kept), bool(ends)))
    return continuations


def _planned_index(config: Config, teacher, student_tokenizer, windows: list[DualWindow], prompts) -> dict:
    settings = dataclasses.asdict(config.data.teacher_text)
    del settings["dir"]  # a moved folder is the same teacher text
    return {
        "format": FORMAT_VERSION,
        "settings": settings,
        "fingerprint": {
            "teacher_weights": weights_hash(teacher.model),
            "models.teacher_dtype": config.models.teacher_dtype,
            "teacher_tokenizer": tokenizer_hash(teacher.tokenizer),
            "student_tokenizer": tokenizer_hash(student_tokenizer),
            "prompt_windows": window_ids_sha256(windows),
        },
        "teacher": config.models.teacher,  # informative only
        "prompts": len(prompts),
        "samples_planned": len(prompts) * config.data.teacher_text.samples_per_window,
        "samples_written": 0, "teacher_tokens": 0, "stopped_early": 0, "parts": [], "complete": False,
    }


def _difference(existing: dict, planned: dict) -> str | None:
    """The first setting or fingerprint that differs between a folder's index and this call's plan."""
    for section, cause in (("settings", "data.teacher_text.{}"), ("fingerprint", "{}")):
        for key, value in planned[section].items():
            if existing[section].get(key) != value:
                return f"{cause.format(key)} differs (folder: {existing[section].get(key)!r}, this config: {value!r})"
    return None


def write_teacher_text(config: Config, progress: bool = True) -> WritingSummary:
    """Sample the teacher's continuations of the training windows' starts into `data.teacher_text.dir`, resuming
    what is there (module docstring)."""
    settings = config.data.teacher_text
    if settings.dir is None:
        raise TeacherTextError("data.teacher_text.dir is null: set it to the folder the teacher text goes to")
    started = time.perf_counter()
    folder = Path(settings.dir).expanduser()
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    teacher.model.to(PartialState().device)
    student_tokenizer = load_tokenizer(config.models.student, "student")
    # The prompts come from the corpus's own windows: the same data config with no teacher text in it.
    corpus_data = dataclasses.replace(config.data, teacher_text=dataclasses.replace(settings, dir=None))
    corpus = TrainingCorpus(corpus_data, student_tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    windows = corpus.stream_windows(settings.prompt_windows or config.data.max_train_windows)
    prompts = prompts_of(windows, student_tokenizer, settings.prompt_tokens)
    index = _planned_index(config, teacher, student_tokenizer, windows, prompts)
    existing = read_index(folder)
    if existing is not None:
        difference = _difference(existing, index)
        if difference:
            raise TeacherTextError(f"{folder} already holds teacher text written otherwise: {difference}. Delete that "
                                   "folder, or set data.teacher_text.dir to another folder")
        index = existing
    folder.mkdir(parents=True, exist_ok=True)
    for partial in folder.glob(".*.tmp"):  # left by a killed writer; only renamed files count
        partial.unlink()
    resumed_at = index["samples_written"]
    samples = [(prompt, sample) for prompt in prompts for sample in range(settings.samples_per_window)]
    stop_ids = _stop_ids(teacher)
    bar = tqdm(total=len(samples), initial=resumed_at, unit="text", desc="teacher writes", disable=not progress)
    for first in range(resumed_at, len(samples), settings.batch_size):
        batch = samples[first : first + settings.batch_size]
        written = _continue(teacher, [prompt.text for prompt, _ in batch], settings, stop_ids, settings.seed + first)
        rows = [{"name": f"teacher-text/{prompt.window}/{sample}", "window": prompt.window, "sample": sample,
                 "prompt": prompt.text, "text": text, "teacher_tokens": tokens, "stop": "end" if ended else "length"}
                for (prompt, sample), (text, tokens, ended) in zip(batch, written)]
        name = part_name(len(index["parts"]))
        _atomic_write(folder / name, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        index["parts"].append(name)
        index["samples_written"] += len(rows)
        index["teacher_tokens"] += sum(row["teacher_tokens"] for row in rows)
        index["stopped_early"] += sum(row["stop"] == "end" for row in rows)
        index["complete"] = index["samples_written"] == len(samples)
        _atomic_write(folder / INDEX_FILE, json.dumps(index, indent=1) + "\n")
        bar.update(len(rows))
    bar.close()
    return WritingSummary(folder, len(prompts), index["samples_written"], index["teacher_tokens"],
                          index["stopped_early"], time.perf_counter() - started, resumed_at)
