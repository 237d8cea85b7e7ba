"""KD's own cost per optimizer step, measured in pairs: a cached-KD step and an LM-only step of the same student on the
same windows, alternated in one process, so that whatever slows the shared machine falls on both sides of each pair.

bench/cache_speed.py times separate runs minutes apart (fresh processes, 5 steps each), and one round's ratio swings
by about ±0.1 on a 2-core machine. Here one process builds the reference run (configs/reference.yaml: first-token,
`merge`, forward KL, k=256 cache, batch 4 x 256 student tokens, fp32) once, with a second objective beside it that has
kd_alpha 0 (the trainer's LM-only path: no teacher signal, LM cross-entropy alone) and shares its student and
optimizer. For each of the run's first `--pairs` steps the same windows are collated and trained on twice, once per
objective, the order alternating (AB, BA, ...) against any order effect. A step is timed the way the trainer runs it:
collation, teacher signal (from the cache), student forward, the terms, backward, clipping and the optimizer step.
The optimizer moves the student twice per pair, which changes no step's shape.

Reported: each objective's median step (wall, this process's CPU seconds, of them in the kernel, and minor page
faults: a fresh [256, 49152] float32 buffer is 12k pages the kernel zeroes), the median over pairs of the ratio
cached / LM-only and of KD's own seconds (the difference), their spread, and the load averages around the run.

    python bench/step_pairs.py                     # 12 pairs, ~6 minutes on 2 cores (the cache is written first)
    python bench/step_pairs.py --label after --output bench/results/step_pairs.json

Results go under `--label` in the output file, so runs of old and new code sit side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from crosskd.api import cache_teacher
from crosskd.config import load_config
from crosskd.data.collate import collate_windows
from crosskd.models.allocator import freed_memory_kept
from crosskd.models.precision import MixedPrecision
from crosskd.schedules import schedule_settings
from crosskd.train.objective import DistillationObjective
from crosskd.train.recipe import accumulate_gradients, apply_update, build_training, schedule_at
from cache_speed import load_averages  # bench/, the directory of this script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "step_pairs.json"


def timed_step(objective, setup, precision, accelerator, windows, pad_id, weights, tau,
               grad_clip) -> tuple[float, float, float, int]:
    """(wall seconds, process CPU seconds, of them in the kernel, minor page faults) of one optimizer step of
    `objective` on `windows`, as the trainer runs it."""
    start, cpu_start, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    micro_batches = [collate_windows(windows, pad_id).to(accelerator.device)]
    setup.optimizer.zero_grad(set_to_none=True)
    objective_forward = setup.objective_forward if objective is setup.objective else objective
    losses = accumulate_gradients(objective, setup.student_forward, objective_forward, precision, accelerator,
                                  micro_batches, weights, tau)
    apply_update(precision, accelerator, setup.optimizer, objective.all_trainable(setup.student.model), grad_clip,
                 losses.total)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (time.perf_counter() - start, time.process_time() - cpu_start, after.ru_stime - usage.ru_stime,
            after.ru_minflt - usage.ru_minflt)


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def summarise(pairs: list[dict[str, tuple]]) -> dict:
    """Per quantity of `timed_step` (pairs: {"cached": (...), "lm_only": (...)}): each side's median and range, KD's
    own share (cached - lm_only, pair by pair) and, for the two clocks, the ratio cached / lm_only pair by pair."""
    summary = {}
    for index, quantity in enumerate(("wall_seconds", "cpu_seconds", "kernel_cpu_seconds", "minor_page_faults")):
        cached = [pair["cached"][index] for pair in pairs]
        lm_only = [pair["lm_only"][index] for pair in pairs]
        summary[quantity] = {"cached_step": spread(cached), "lm_only_step": spread(lm_only),
                             "kd_own": spread([c - b for c, b in zip(cached, lm_only)])}
        if index < 2:  # the clocks a step is judged by
            summary[quantity]["cached_over_lm_only"] = spread([c / b for c, b in zip(cached, lm_only)])
    return summary


def paired_steps(config, lm_only_config, steps: int, scratch: Path) -> list[dict[str, tuple]]:
    """The run of `config` (cached KD) for `steps` steps, each step's windows trained on by both objectives in
    alternating order: [{"cached": timed_step(...), "lm_only": timed_step(...)}, ...]."""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=config.training.mixed_precision)
    precision = MixedPrecision(accelerator, config.training.mixed_precision)
    setup = build_training(config, accelerator, stats_path=scratch / "stats.safetensors", resuming=False)
    # The trainer's LM-only path on the same student (a teacher held but never run), no parameters of its own.
    lm_only = DistillationObjective(lm_only_config, setup.teacher, setup.student,
                                    schedule_settings(lm_only_config)).to(accelerator.device)
    windows = setup.corpus.train_windows(start=0, process_index=0, num_processes=1,
                                         batch_size=config.training.batch_size)
    pairs = []
    for step in range(steps):
        weights, tau = schedule_at(step, setup.total_steps, setup.settings)
        step_windows = next(windows)
        order = [("cached", setup.objective), ("lm_only", lm_only)]
        if step % 2:
            order.reverse()
        times = {name: timed_step(objective, setup, precision, accelerator, step_windows, setup.teacher.vocab.pad_id,
                                  weights, tau, config.optimizer.grad_clip)
                 for name, objective in order}
        print(f"pair {step}: cached {times['cached'][0]:.2f} s ({times['cached'][3]} page faults), lm_only "
              f"{times['lm_only'][0]:.2f} s ({times['lm_only'][3]}), first {order[0][0]}", flush=True)
        pairs.append(times)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12, help="steps of the run, each trained by both objectives")
    parser.add_argument("--label", default="current", help="the key of this run in the output file")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"result file (default {RESULTS})")
    parser.add_argument("--config", default=str(REPO / "configs" / "reference.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides of both objectives' config, e.g. "
                                                     "training.keep_freed_memory=false")
    args = parser.parse_args()
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (the first pair only warms up)")
    common = [*args.overrides, f"training.max_steps={args.pairs}", "output.tensorboard=false"]
    with tempfile.TemporaryDirectory(prefix="crosskd-step-pairs-") as scratch:
        config = load_config(args.config, [*common, f"output.run_dir={scratch}/run",
                                           f"teacher.cache_dir={scratch}/cache", "teacher.source=cache"])
        lm_only_config = load_config(args.config, [*common, "objective.kd_alpha=0", "teacher.source=online"])
        print(f"writing the k={config.objective.kd_top_k} cache of {args.pairs} steps", flush=True)
        cache_teacher(config, progress=False)
        load_before = load_averages()
        with freed_memory_kept(config.training.keep_freed_memory) as memory_kept:
            pairs = paired_steps(config, lm_only_config, args.pairs, Path(scratch))
    measured = pairs[1:]  # the first pair pays for allocations and lazy initialisation
    result = {
        "what": "one process, the reference run's first steps each trained by cached KD and by LM-only (kd_alpha 0) "
                "on the same windows, order alternating; per optimizer step: wall and process-CPU seconds, kernel CPU "
                "seconds and minor page faults; kd_own = cached - lm_only of each pair",
        "pairs_measured": len(measured),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "freed_memory_kept": memory_kept,
                    "load_average_before": load_before, "load_average_after": load_averages()},
        **summarise(measured),
    }
    results = json.loads(args.output.read_text()) if args.output.is_file() else {}
    results[args.label] = result
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
