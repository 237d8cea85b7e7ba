"""A run folder's own records, read back: the resolved config, the log's start, train and eval records, and the
newest checkpoint's state. Everything the report and the model card show comes from here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from crosskd.train.checkpoint import STATE_FILE, list_checkpoints


class NotARunFolder(ValueError):
    """The folder given is not a crosskd run folder, or lacks the records a report is made from."""


@dataclass
class RunRecords:
    run_dir: Path
    config: dict  # the resolved config as written by `crosskd train` (plain YAML: old runs still read)
    starts: list[dict]  # one per process start: the student's and teacher's BPB then, and the command
    train: list[dict]  # one per logged optimizer step
    evals: list[dict]  # one per held-out evaluation
    checkpoint_state: dict | None  # the newest checkpoint's state.json (which student is the best), if any is kept
    name: str = field(init=False)

    def __post_init__(self):
        self.name = self.run_dir.name


@dataclass
class Summary:
    before_bpb: float | None  # the untouched student
    best_bpb: float | None  # the student that is exported
    best_step: int | None
    final_bpb: float | None
    final_step: int | None
    teacher_bpb: float | None
    gap_closed: float | None  # (before - best) / (before - teacher)
    steps: int
    wall_seconds: float | None  # summed over the processes that trained it (a resume is a second one)
    peak_memory_bytes: int | None
    commands: list[str]


def read_run(run_dir: str | Path) -> RunRecords:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARunFolder(f"{run_dir} is not a folder; give the run folder of a `crosskd train` run "
                            "(its output.run_dir)")
    log, config_file = run_dir / "log.jsonl", run_dir / "config.yaml"
    missing = [path.name for path in (log, config_file) if not path.is_file()]
    if missing:
        raise NotARunFolder(f"{run_dir} is not a crosskd run folder: {' and '.join(missing)} missing. Give the folder "
                            "`crosskd train` wrote (its output.run_dir); a run writes log.jsonl from its first step")
    by_kind: dict[str, dict[int, dict]] = {"start": {}, "train": {}, "eval": {}}
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind, step = record["kind"], int(record["step"])
        except (ValueError, KeyError, TypeError) as error:
            raise NotARunFolder(f"{log}:{number} is not a crosskd log record ({error}); the file is damaged or "
                                "not crosskd's log") from None
        if kind == "start" and step == 0:
            # The logbook appends: a fresh run in a used run folder starts the story again.
            by_kind = {name: {} for name in by_kind}
        if kind in by_kind:
            # A resumed run repeats the steps after its checkpoint; the repeat is what the exported student saw.
            by_kind[kind][step] = record
    if not by_kind["train"]:
        raise NotARunFolder(f"{log} holds no training step yet; report on the run after its first logged step "
                            "(training.log_every)")
    with open(config_file) as handle:
        config = yaml.safe_load(handle)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    state = json.loads((checkpoints[-1] / STATE_FILE).read_text()) if checkpoints else None
    ordered = {kind: [records[step] for step in sorted(records)] for kind, records in by_kind.items()}
    return RunRecords(run_dir, config, ordered["start"], ordered["train"], ordered["eval"], state)


def summarise(run: RunRecords) -> Summary:
    fresh_start = run.starts[0] if run.starts and run.starts[0]["step"] == 0 else None
    before = fresh_start["bpb"] if fresh_start else None
    teacher = run.starts[-1]["teacher_bpb"] if run.starts else None
    if run.checkpoint_state is not None and run.checkpoint_state.get("best_bpb") is not None:
        # The trainer's own choice (early stopping's min_delta decides what counts as an improvement).
        best, best_step = run.checkpoint_state["best_bpb"], run.checkpoint_state["best_step"]
    else:  # checkpoints not kept (a copied run folder): the lowest held-out BPB measured
        candidates = [(e["bpb"], e["step"]) for e in run.evals] + ([(before, 0)] if before is not None else [])
        best, best_step = min(candidates) if candidates else (None, None)
    final = run.evals[-1] if run.evals else None
    gap = None
    if before is not None and teacher is not None and best is not None and before != teacher:
        gap = (before - best) / (before - teacher)
    return Summary(
        before_bpb=before, best_bpb=best, best_step=best_step,
        final_bpb=final["bpb"] if final else None, final_step=final["step"] if final else None,
        teacher_bpb=teacher, gap_closed=gap, steps=run.train[-1]["step"],
        wall_seconds=_wall_seconds(run), peak_memory_bytes=_largest(run.train, "peak_memory_bytes"),
        commands=[start["command"] for start in run.starts],
    )


def _wall_seconds(run: RunRecords) -> float | None:
    """Each process logs the seconds since it started; a resumed run adds its own process's time to the first's."""
    boundaries = [start["step"] for start in run.starts[1:]] + [math.inf]
    total, segment_start, found = 0.0, -1, False
    for boundary in boundaries:
        seconds = _largest([r for r in run.train if segment_start < r["step"] <= boundary], "wall_seconds")
        if seconds is not None:
            total, found = total + seconds, True
        segment_start = boundary
    return total if found else None


def _largest(records: list[dict], key: str):
    values = [record[key] for record in records if key in record]
    return max(values) if values else None


def summary_rows(summary: Summary) -> list[tuple[str, str]]:
    """The summary as (what, value) rows, shared by the report's table and the model card."""
    best_at = f" (step {summary.best_step})" if summary.best_step is not None else ""
    final_at = f" (step {summary.final_step})" if summary.final_step is not None else ""
    memory = None if summary.peak_memory_bytes is None else f"{summary.peak_memory_bytes / 2**30:.2f} GiB"
    gap = None if summary.gap_closed is None else f"{100 * summary.gap_closed:.1f} %"
    return [
        ("held-out BPB before (untouched student)", _bpb(summary.before_bpb)),
        (f"best BPB, the exported student{best_at}", _bpb(summary.best_bpb)),
        (f"final BPB{final_at}", _bpb(summary.final_bpb)),
        ("teacher BPB", _bpb(summary.teacher_bpb)),
        ("gap to the teacher closed", gap or "n/a"),
        ("optimizer steps", str(summary.steps)),
        ("wall time", _duration(summary.wall_seconds)),
        ("peak memory", memory or "n/a"),
        ("command", "\n".join(summary.commands) or "n/a"),
    ]


def _bpb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
