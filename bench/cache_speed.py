"""Step time of cached vs online KD vs LM-only fine-tuning on the reference pair, and the cache's bytes per token.

Three short runs of configs/reference.yaml (first-token, forward KL, batch 4 x 256 tokens, fp32 on the CPU), each
timed per optimizer step from the trainer's own per-step log records; the first step is skipped (allocations, lazy
initialisation) and the median of the rest reported (cache and lm_only: pooled over two alternating rounds):

- online: the teacher runs in every step (teacher.source=online);
- cache: the teacher's signal is read from a cache written just before by `crosskd.cache_teacher` (k=256);
- lm_only: objective.kd_alpha=0, so the trainer skips the teacher entirely: the floor a cache can approach.

A k=64 cache of the same run is written too, for its size. The held-out BPB cost of k=64 needs full quality runs and
is left to the quality benchmark (bench/quality.py). The machine is shared: load averages are recorded around every
run, and the figures are contended when they exceed the core count by more than `CONTENTION_MARGIN`.

    python bench/cache_speed.py            # 10-20 minutes on 2 cores; writes bench/results/cache_speed.json
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from crosskd.api import cache_teacher
from crosskd.config import load_config
from crosskd.train import recipe
from crosskd.train.logbook import Logbook

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "cache_speed.json"
STEPS = 6
# Short held-out text: the trainer's before/after BPB evaluation is not what is measured here.
COMMON = [f"training.max_steps={STEPS}", "training.log_every=1", "data.eval_max_chars=2000", "output.tensorboard=false"]


# This benchmark's own threads keep the load average at about the core count (1.8-2.2 measured here alone on 2
# cores); another job on the machine shows as a load well above it (4-6 when it was contended).
CONTENTION_MARGIN = 0.5


def load_averages() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def timed_run(config) -> dict:
    """Train `config`; the time between consecutive per-step log records is a step's duration. The first step has no
    record before it, so it is skipped (it also pays for allocations and lazy initialisation)."""
    stamps: list[float] = []
    record = Logbook.record

    def stamped(self, kind, step, values):
        if kind == "train":
            stamps.append(time.perf_counter())
        record(self, kind, step, values)

    Logbook.record = stamped
    AcceleratorState._reset_state(reset_partial_state=True)  # as a fresh `crosskd train` process would start
    load_before = load_averages()
    try:
        recipe.train(config)
    finally:
        Logbook.record = record
    steps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return {"median_step_seconds": round(statistics.median(steps), 3), "step_seconds": [round(s, 3) for s in steps],
            "load_average_before": load_before, "load_average_after": load_averages()}


def pooled(rounds: list[dict]) -> dict:
    """The median over the steps of every round, with each round kept for inspection."""
    steps = [step for measured in rounds for step in measured["step_seconds"]]
    return {"median_step_seconds": round(statistics.median(steps), 3), "rounds": rounds}


def cache_figures(config) -> dict:
    summary = cache_teacher(config, progress=False)
    return {"k": config.objective.kd_top_k, "bytes": summary.bytes, "aligned_positions": summary.positions,
            "student_tokens": summary.student_tokens, "windows": summary.unique_windows,
            "bytes_per_aligned_position": round(summary.bytes_per_position, 1),
            "bytes_per_student_token": round(summary.bytes_per_student_token, 1),
            "write_seconds": round(summary.seconds, 1), "micro_batches": summary.micro_batches}


def main() -> None:
    base = REPO / "configs" / "reference.yaml"
    with tempfile.TemporaryDirectory(prefix="crosskd-cache-bench-") as scratch:
        def config(name: str, *overrides: str, run: str | None = None):
            return load_config(base, [*COMMON, f"output.run_dir={scratch}/{run or name}",
                                      f"teacher.cache_dir={scratch}/cache-{name}", *overrides])

        caches = {f"k{k}": cache_figures(config(f"k{k}", f"objective.kd_top_k={k}")) for k in (64, 256)}
        modes = {"online": ("online",), "cache": ("k256", "teacher.source=cache"),
                 "lm_only": ("lm_only", "objective.kd_alpha=0")}
        # cache and lm_only, whose ratio is the question, alternate over two rounds so that a change in the load
        # of the shared machine falls on both; the costlier online run is measured once.
        order = ["lm_only", "cache", "online", "lm_only", "cache"]
        rounds: dict[str, list[dict]] = {name: [] for name in modes}
        for name in order:
            rounds[name].append(timed_run(config(*modes[name], run=f"{name}-{len(rounds[name])}")))
    runs = {name: pooled(measured) for name, measured in rounds.items()}
    lm_only = runs["lm_only"]["median_step_seconds"]
    result = {
        "what": "median optimizer-step time (s) over steps 2-6 of every round of configs/reference.yaml "
                "(first-token, forward KL, k=256, batch 4 x 256 student tokens, fp32), and teacher-cache sizes of the "
                "same run",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "contended": any(max(measured["load_average_before"] + measured["load_average_after"])
                                     > os.cpu_count() + CONTENTION_MARGIN
                                     for run in runs.values() for measured in run["rounds"])},
        "runs": runs,
        "ratio_to_lm_only": {name: round(run["median_step_seconds"] / lm_only, 3) for name, run in runs.items()},
        "caches": caches,
        "k64_heldout_bpb_cost": None,
        "k64_heldout_bpb_cost_note": "needs full quality runs; left to the quality benchmark (bench/quality.py)",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
