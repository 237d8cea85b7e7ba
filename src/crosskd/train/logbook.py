"""Honest logs: one compact line every N steps, the same records in JSONL and TensorBoard, a progress bar with ETA.

Weighted components are logged next to the total they add up to; `check_sum` makes the debug switch assert it.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch
from tqdm.auto import tqdm


LOG_FILE = "log.jsonl"


class Logbook:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, enabled: bool, initial_step: int = 0,
                 evaluated_steps: set[int] | None = None):
        """`evaluated_steps`: on resume, the evaluations the checkpoint holds; the log forgets the records the
        resumed run writes again (steps after `initial_step`, evaluations the checkpoint lacks), so it keeps one row
        per step."""
        self.enabled = enabled  # only the main process writes
        self.jsonl = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if evaluated_steps is not None and (run_dir / LOG_FILE).is_file():
            _forget_records_after(run_dir / LOG_FILE, initial_step, evaluated_steps)
        self.jsonl = open(run_dir / LOG_FILE, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        # disable=None: a bar on a terminal; in a pipe or CI log the step lines alone show progress.
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="distilling", unit="step", dynamic_ncols=True,
                        disable=None)

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def line(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _forget_records_after(path: Path, step: int, evaluated_steps: set[int]) -> None:
    def kept(record: dict) -> bool:
        if record["kind"] == "eval":
            return record["step"] in evaluated_steps
        return record["kind"] == "start" or record["step"] <= step

    lines = [line for line in path.read_text().splitlines() if line.strip() and kept(json.loads(line))]
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text("".join(f"{line}\n" for line in lines))
    os.replace(partial, path)


def format_step_line(step: int, total: int, values: dict) -> str:
    """`step 12/25 (48%) total 2.314 = lm 1.802 + kd 0.512 | T 1.82 lr 1.600e-05 | 512 tok/s | skipped 0`."""
    components = " + ".join(f"{name} {value:.3f}" for name, value in values["weighted"].items())
    return (
        f"step {step}/{total} ({100 * step / total:.0f}%) total {values['total']:.3f} = {components} | "
        f"T {values['temperature']:.2f} lr {values['lr']:.3e} | {values['tokens_per_second']:.0f} tok/s | "
        f"skipped {values['nonfinite_skipped']}+{values['overflow_skipped']} overflow"
    )


def check_sum(total: float, weighted: dict[str, float], tolerance: float = 1e-4) -> None:
    """The logged components must add up to the logged total (the debug switch asserts it every step)."""
    summed = sum(weighted.values())
    if not math.isclose(summed, total, rel_tol=tolerance, abs_tol=tolerance):
        raise AssertionError(f"weighted components sum to {summed:.6f} but the total is {total:.6f}: {weighted}")


def peak_memory_bytes(device: torch.device) -> int:
    """The process's peak memory so far: allocated GPU memory on CUDA, else the resident set (host memory is where
    the models live)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
