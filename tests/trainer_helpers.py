"""Shared set-up for the trainer's tests: the tiny config with a small local corpus, and readers for a run's outputs.

Runs use the tiny random pair (`configs/tiny.yaml`) on a few kilobytes of text in a temporary folder, so that a
training step takes a fraction of a second on a shared 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from accelerate.state import AcceleratorState

from crosskd.config import Config, load_config
from crosskd.data.collate import collate_windows
from crosskd.data.corpus import TrainingCorpus
from crosskd.data.stdlib import stdlib_root
from crosskd.models.loading import load_model
from crosskd.schedules import schedule_settings
from crosskd.train.objective import DistillationObjective
from crosskd.train.recipe import TrainResult, train

REPO = Path(__file__).resolve().parents[1]


def launch_command(processes: int) -> list[str]:
    """`accelerate launch` of N CPU processes (gloo; the environment needs ACCELERATE_USE_CPU=true) on a port of its
    own: back-to-back launches on torchrun's default port can collide while the last one's socket is closing."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(port)]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
HELDOUT_NAME = "heldout.txt"
# Real, varied text: consecutive training windows differ, so a wrong data position after resume changes the losses.
TRAINING_SOURCES = ("fractions.py", "textwrap.py", "shlex.py", "json/decoder.py")
DOCUMENT_CHARS = 2_000
HELDOUT_CHARS = 700  # about one BPB window of the tiny student: evaluation stays cheap


def write_corpus(folder: Path) -> Path:
    """A folder of a few training documents (stdlib excerpts) and one held-out document."""
    folder.mkdir(parents=True, exist_ok=True)
    root = stdlib_root()
    for name in TRAINING_SOURCES:
        text = (root / name).read_text(encoding="utf-8")[:DOCUMENT_CHARS]
        (folder / name.replace("/", "_")).with_suffix(".txt").write_text(text)
    (folder / HELDOUT_NAME).write_text((root / "base64.py").read_text(encoding="utf-8")[:HELDOUT_CHARS])
    return folder


def write_single_window_corpus(folder: Path) -> Path:
    """One short training document (a single window of the tiny config, so every step sees the same batch)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 2)
    (folder / HELDOUT_NAME).write_text((stdlib_root() / "base64.py").read_text(encoding="utf-8")[:HELDOUT_CHARS])
    return folder


def tiny_config(tmp_path: Path, *overrides: str, corpus: Path | None = None) -> Config:
    """configs/tiny.yaml on a small local corpus, writing its run under `tmp_path/run`."""
    corpus = corpus or write_corpus(tmp_path / "corpus")
    return load_config(TINY_CONFIG, [
        f"data.source={corpus}",
        f"data.heldout_documents=[{HELDOUT_NAME}]",
        "data.eval_max_chars=null",
        f"output.run_dir={tmp_path / 'run'}",
        *overrides,
    ])


def models_and_batches(config: Config, batch_size: int, count: int):
    """The run's teacher and student, and the first `count` micro-batches of its window stream."""
    teacher = load_model(config.models.teacher, "teacher")
    student = load_model(config.models.student, "student")
    corpus = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    windows = corpus.train_windows(start=0, process_index=0, num_processes=1, batch_size=batch_size)
    return teacher, student, [collate_windows(group, teacher.vocab.pad_id) for group in itertools.islice(windows, count)]


def objective_and_first_batch(config: Config, batch_size: int = 2):
    """The run's objective (built as `train` builds it) and the first micro-batch of its window stream."""
    teacher, student, (batch,) = models_and_batches(config, batch_size, 1)
    return DistillationObjective(config, teacher, student, schedule_settings(config)), batch


def log_records(run_dir: Path, kind: str = "train") -> list[dict]:
    """The run's log.jsonl records of one kind, in order."""
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of the run's exported student."""
    tensors = {}
    for path in sorted((Path(run_dir) / "student").glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def run_training(config: Config, resume: str | None = None, debug: bool = False,
                 overwrite: bool = False) -> TrainResult:
    """`train` in this process, as a fresh `crosskd train` would: accelerate keeps its state (mixed precision
    included) in a process-wide singleton that an earlier run in the same pytest process must not leak into."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return train(config, resume=resume, debug=debug, overwrite=overwrite)


def inject_nan_loss(monkeypatch, nan_calls) -> list[dict[str, torch.Tensor]]:
    """Make the objective's LM term NaN on the given forward calls (one call per step here); return the student's
    weights as seen at the start of every call."""
    original = DistillationObjective.forward
    calls = itertools.count(1)
    weights_seen = []

    def forward(self, *args, **kwargs):
        call = next(calls)
        weights_seen.append({n: p.detach().clone() for n, p in self.student_model.named_parameters()})
        terms = original(self, *args, **kwargs)
        if call in nan_calls:
            terms["lm"] = dataclasses.replace(terms["lm"], value=terms["lm"].value * math.nan)
        return terms

    monkeypatch.setattr(DistillationObjective, "forward", forward)
    return weights_seen
