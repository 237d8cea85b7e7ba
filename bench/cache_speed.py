"""Step time of cached vs online KD vs LM-only fine-tuning on the reference pair, and the cache's bytes per token.

Three kinds of short runs of configs/reference.yaml (first-token, forward KL, batch 4 x 256 tokens, fp32 on the CPU),
each timed per optimizer step from the trainer's own per-step log records; the first step is skipped (allocations,
lazy initialisation) and the median of the rest kept:

- online: the teacher runs in every step (teacher.source=online);
- cache: the teacher's signal is read from a cache written just before by `crosskd.cache_teacher` (k=256);
- lm_only: objective.kd_alpha=0, so the trainer skips the teacher entirely: the floor a cache can approach.

The runs alternate over `--rounds` rounds (default 4): every round runs lm_only and cache, lm_only first in even
rounds and last in odd ones (ABBA...), and every other round (the first, the third, ...) also times the teacher's
forward on the trainer's first 4 x 256 batch once and runs online, which is slow. Each round gives its own ratios,
cache / lm_only and online / (teacher forward + lm_only step), from runs minutes apart, so that a change in the shared
machine's load falls on both sides of a ratio; the file reports them per round (`ratio_rounds`), their median
(`ratio_median`) and their spread (`ratio_spread`: min and max over rounds), beside the pooled medians of every run
(`runs`, `ratio_to_lm_only`). bench/step_pairs.py measures KD's own cost more finely: both objectives in one process,
step by step on the same windows.

A k=64 cache of the same run is written too, for its size. The held-out BPB cost of k=64 needs full quality runs and
is left to the quality benchmark (bench/quality.py). The machine is shared: load averages are recorded around every
run, and the figures are contended when they exceed the core count by more than `CONTENTION_MARGIN`.

The targets of issue 16 are held to the same bound: `--transfers` names cached methods of bench/quality.py
(`first-token-chain-rule`, `chunk-likelihood`, ...) that join every round after `cache`, each with its own cache of
the same run (the parts of the teacher signal it reads), and each round gives `<method>_over_lm_only` too.

    python bench/cache_speed.py                # ~30-40 minutes on 2 cores; writes bench/results/cache_speed.json
    python bench/cache_speed.py --rounds 2     # shorter
    python bench/cache_speed.py --transfers first-token-chain-rule,chunk-likelihood --no-online \
        --output bench/results/cache_speed_transfers.json
"""

from __future__ import annotations

import argparse
import gc
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
from crosskd.data.collate import collate_windows
from crosskd.models.loading import load_model, load_tokenizer
from crosskd.train import recipe
from crosskd.train.logbook import Logbook
from quality import METHODS, first_trainer_windows, teacher_forward_seconds  # bench/, the directory of this script

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


def is_contended(measured: dict, cpus: int) -> bool:
    """Whether a run's load averages, before or after it, exceed the core count by more than the margin."""
    return max(measured["load_average_before"] + measured["load_average_after"]) > cpus + CONTENTION_MARGIN


def round_ratios(lm_only: dict, cache: dict, online: dict | None, teacher_forward_seconds: float | None,
                 cpus: int, transfers: dict[str, dict] | None = None) -> dict:
    """One round's ratios from its runs (each `timed_run`'s record): cache / lm_only, each of `transfers` (cached
    runs by method name) / lm_only, and where the round ran online, online / (teacher forward + lm_only step), the
    cost of online KD over the least any online step can cost."""
    lm_step = lm_only["median_step_seconds"]
    ratios = {"cache_over_lm_only": round(cache["median_step_seconds"] / lm_step, 4)}
    measured = [lm_only, cache]
    for method, transfer in (transfers or {}).items():
        ratios[f"{method}_over_lm_only"] = round(transfer["median_step_seconds"] / lm_step, 4)
        measured.append(transfer)
    if online is not None:
        ratios["online_over_teacher_plus_lm_only"] = round(
            online["median_step_seconds"] / (teacher_forward_seconds + lm_step), 4)
        ratios["teacher_forward_seconds"] = round(teacher_forward_seconds, 3)
        measured.append(online)
    ratios["contended"] = any(is_contended(m, cpus) for m in measured)
    return ratios


def round_order(index: int, transfers: list[str]) -> list[str]:
    """The cached runs of round `index` in the order they run: LM-only first in even rounds and last in odd ones
    (ABBA), so that whatever a run leaves behind in the process (allocator state, a warm cache) or a drift of the
    machine's speed during the round falls on both sides of the ratios."""
    order = ["lm_only", "cache", *transfers]
    return order if index % 2 == 0 else order[::-1]


def median_and_spread(rounds: list[dict]) -> tuple[dict, dict]:
    """({ratio: median over the rounds that have it}, {ratio: {"min", "max", "rounds"}}) of each ratio the rounds
    hold (the `*_over_*` keys of `round_ratios`)."""
    median, spread = {}, {}
    names = dict.fromkeys(name for ratios in rounds for name in ratios if "_over_" in name)  # first-seen order
    for name in names:
        values = [ratios[name] for ratios in rounds if name in ratios]
        if values:
            median[name] = round(statistics.median(values), 4)
            spread[name] = {"min": min(values), "max": max(values), "rounds": len(values)}
    return median, spread


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


def first_batch_teacher_seconds(config) -> float:
    """The teacher's forward (no grad, one warm-up then one timed call) on the trainer's first batch of `config`."""
    student_tokenizer = load_tokenizer(config.models.student, "student")
    teacher_tokenizer = load_tokenizer(config.models.teacher, "teacher")
    windows = first_trainer_windows(config, student_tokenizer, teacher_tokenizer, steps=1)
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    seconds = teacher_forward_seconds(teacher, collate_windows(windows, teacher.vocab.pad_id), repeats=1)
    del teacher
    gc.collect()
    return seconds


def cache_figures(config) -> dict:
    summary = cache_teacher(config, progress=False)
    return {"k": config.objective.kd_top_k, "bytes": summary.bytes, "aligned_positions": summary.positions,
            "student_tokens": summary.student_tokens, "windows": summary.unique_windows,
            "bytes_per_aligned_position": round(summary.bytes_per_position, 1),
            "bytes_per_student_token": round(summary.bytes_per_student_token, 1),
            "write_seconds": round(summary.seconds, 1), "micro_batches": summary.micro_batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of lm_only, cache (online every other round)")
    parser.add_argument("--transfers", default="",
                        help="cached methods of bench/quality.py timed after `cache` in every round, comma-separated")
    parser.add_argument("--no-online", action="store_true", help="leave out the online runs (cached ratios only)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"result file (default {RESULTS})")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    transfers = [name.strip() for name in args.transfers.split(",") if name.strip()]
    for name in transfers:
        if name not in METHODS or not METHODS[name].cached:
            parser.error(f"--transfers: {name!r} is not a cached method of bench/quality.py; choose from "
                         f"{', '.join(m for m, method in METHODS.items() if method.cached)}")
    cpus = os.cpu_count() or 1
    base = REPO / "configs" / "reference.yaml"
    with tempfile.TemporaryDirectory(prefix="crosskd-cache-bench-") as scratch:
        def config(name: str, *overrides: str, run: str | None = None):
            return load_config(base, [*COMMON, f"output.run_dir={scratch}/{run or name}",
                                      f"teacher.cache_dir={scratch}/cache-{name}", *overrides])

        caches = {f"k{k}": cache_figures(config(f"k{k}", f"objective.kd_top_k={k}")) for k in (64, 256)}
        modes = {"online": ("online",), "cache": ("k256", "teacher.source=cache"),
                 "lm_only": ("lm_only", "objective.kd_alpha=0")}
        for name in transfers:  # the method's own settings, its cache in the scratch folder under its own name
            modes[name] = (name, *(o for o in METHODS[name].overrides if not o.startswith("teacher.cache_dir=")))
            caches[name] = cache_figures(config(*modes[name]))
        rounds: dict[str, list[dict]] = {name: [] for name in modes}
        ratio_rounds = []

        def timed(name: str) -> dict:
            measured = timed_run(config(*modes[name], run=f"{name}-{len(rounds[name])}"))
            rounds[name].append(measured)
            return measured

        for index in range(args.rounds):
            measured = {name: timed(name) for name in round_order(index, transfers)}
            lm_only, cache = measured["lm_only"], measured["cache"]
            transfer_runs = {name: measured[name] for name in transfers}
            online = teacher_seconds = None
            if index % 2 == 0 and not args.no_online:
                teacher_seconds = first_batch_teacher_seconds(config(*modes["online"]))
                online = timed("online")
            ratio_rounds.append({"round": index, **round_ratios(lm_only, cache, online, teacher_seconds, cpus,
                                                                transfer_runs)})
    runs = {name: pooled(measured) for name, measured in rounds.items() if measured}
    lm_only_step = runs["lm_only"]["median_step_seconds"]
    ratio_median, ratio_spread = median_and_spread(ratio_rounds)
    result = {
        "what": "median optimizer-step time (s) over steps 2-6 of every run of configs/reference.yaml "
                "(first-token, forward KL, k=256, batch 4 x 256 student tokens, fp32), alternated over rounds "
                "(lm_only, cache, the --transfers, and online every other round unless --no-online), per-round "
                "ratios, and teacher-cache sizes of the same run",
        "transfers": transfers,
        "online": not args.no_online,
        "machine": {"cpus": cpus, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "contended": any(is_contended(measured, cpus)
                                     for run in runs.values() for measured in run["rounds"])},
        "rounds": args.rounds,
        "runs": runs,
        "ratio_to_lm_only": {name: round(run["median_step_seconds"] / lm_only_step, 3) for name, run in runs.items()},
        "ratio_rounds": ratio_rounds,
        "ratio_median": ratio_median,
        "ratio_spread": ratio_spread,
        "caches": caches,
        "k64_heldout_bpb_cost": None,
        "k64_heldout_bpb_cost_note": "needs full quality runs; left to the quality benchmark (bench/quality.py)",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
