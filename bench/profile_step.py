"""Where a distillation step's time goes: `torch.profiler` over optimizer steps of configs/reference.yaml on the CPU.

Three modes of the same run (first-token, forward KL, batch 4 x 256 tokens, fp32): `cached` (teacher signal read
from a k=256 cache written first), `online` (the teacher runs in the step) and `lm_only` (objective.kd_alpha=0: the
floor a cache can approach). Each trains WARMUP + ACTIVE steps; the profiler skips the warm-up steps (allocations,
lazy initialisation) and records the rest with input shapes. Reported per mode, per profiled step:

- `regions`: the trainer's own `crosskd.*` ranges (torch.profiler.record_function in train/recipe.py and
  train/objective.py: data, teacher signal, student forward, KD target, the fused LM + KD chunk loop, backward,
  optimizer), inclusive time;
- `top_ops`: the operators with the most self time, with their input shapes, and their share of the step;
- `kd_over_lm_only`: for each operator (and shape), the self time a KD mode spends beyond LM-only's: what KD adds.

    python bench/profile_step.py                                  # ~5 minutes on 2 cores, quiet machine
    python bench/profile_step.py --config configs/tiny.yaml --modes cached,lm_only   # the harness in seconds

Writes bench/results/profile_step.json (tiny runs write bench/results/profile_step-tiny.json; `--output PATH` writes
elsewhere). Run it alone: a contended machine changes every share.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from torch.profiler import ProfilerActivity, profile, schedule

from crosskd.api import cache_teacher
from crosskd.config import load_config
from crosskd.train import recipe
from crosskd.train.logbook import Logbook
from cache_speed import load_averages  # bench/, the directory of this script

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
WARMUP, ACTIVE = 2, 3
TOP_OPS = 25
MODES = {"cached": ("teacher.source=cache",), "online": (), "lm_only": ("objective.kd_alpha=0",)}
REGION_PREFIX = "crosskd."


def profiled_run(config) -> dict:
    """Train `config` under the profiler, one profiler step per optimizer step (the trainer's per-step log record)."""
    record = Logbook.record
    cycles = []  # the profiler clears its events after each cycle: they are read as the cycle ends
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=WARMUP, active=ACTIVE),
                 record_shapes=True,
                 on_trace_ready=lambda done: cycles.append(done.key_averages(group_by_input_shape=True))) as profiler:
        def stepped(self, kind, step, values):
            record(self, kind, step, values)
            if kind == "train":
                profiler.step()

        Logbook.record = stepped
        AcceleratorState._reset_state(reset_partial_state=True)  # as a fresh `crosskd train` process would start
        try:
            recipe.train(config)
        finally:
            Logbook.record = record
    if not cycles:
        raise RuntimeError(f"the run logged fewer than {WARMUP + ACTIVE} steps: nothing was profiled")
    return summarise(cycles[0])


def summarise(averages) -> dict:
    """Per profiled step: the trainer's regions (inclusive) and the operators by self time (microseconds -> ms)."""
    regions = {event.key: event.cpu_time_total / 1000 / ACTIVE for event in averages
               if event.key.startswith(REGION_PREFIX)}
    operators = [event for event in averages if not event.key.startswith(REGION_PREFIX)
                 and not event.key.startswith("ProfilerStep")]
    step_ms = sum(event.self_cpu_time_total for event in operators) / 1000 / ACTIVE
    by_self = sorted(operators, key=lambda event: event.self_cpu_time_total, reverse=True)
    return {
        "step_ms": round(step_ms, 1),
        "regions_ms": {name: round(ms, 1) for name, ms in sorted(regions.items(), key=lambda item: -item[1])},
        "top_ops": [{"op": event.key, "shapes": str(event.input_shapes), "calls_per_step": event.count / ACTIVE,
                     "self_ms": round(event.self_cpu_time_total / 1000 / ACTIVE, 1),
                     "share": round(event.self_cpu_time_total / 1000 / ACTIVE / step_ms, 4)}
                    for event in by_self[:TOP_OPS]],
        "self_ms_by_op": op_self_times(operators),
    }


def op_self_times(operators) -> dict[str, float]:
    """Self time per operator and input shapes, ms per step (the key of the differences between modes)."""
    times: dict[str, float] = defaultdict(float)
    for event in operators:
        times[f"{event.key} {event.input_shapes}"] += event.self_cpu_time_total / 1000 / ACTIVE
    return dict(times)


def kd_over_lm_only(mode: dict, lm_only: dict) -> list[dict]:
    """The operators (with shapes) whose self time a KD mode spends beyond LM-only's, largest first."""
    extra = {key: ms - lm_only["self_ms_by_op"].get(key, 0.0) for key, ms in mode["self_ms_by_op"].items()}
    return [{"op": key, "extra_ms": round(ms, 1)}
            for key, ms in sorted(extra.items(), key=lambda item: -item[1])[:TOP_OPS] if ms > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "reference.yaml"))
    parser.add_argument("--modes", default=",".join(MODES), help=f"from: {', '.join(MODES)}")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the result (default bench/results/profile_step.json, or "
                             "profile_step-tiny.json for configs/tiny.yaml): a profile of new code beside the quoted one")
    args = parser.parse_args()
    modes = [name.strip() for name in args.modes.split(",") if name.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    tiny = Path(args.config).stem == "tiny"
    result: dict = {"config": args.config, "steps": {"warmup": WARMUP, "profiled": ACTIVE},
                    "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "torch": torch.__version__, "load_average_before": load_averages()},
                    "modes": {}}
    with tempfile.TemporaryDirectory(prefix="crosskd-profile-") as scratch:
        common = [f"training.max_steps={WARMUP + ACTIVE}", "training.log_every=1", "training.eval_every=0",
                  "data.eval_max_chars=2000", "output.tensorboard=false", f"teacher.cache_dir={scratch}/cache"]
        for mode in modes:
            config = load_config(args.config, [*common, f"output.run_dir={scratch}/{mode}", *MODES[mode]])
            if mode == "cached":
                cache_teacher(config, progress=False)
            result["modes"][mode] = profiled_run(config)
    result["machine"]["load_average_after"] = load_averages()
    if "lm_only" in result["modes"]:
        for mode in set(result["modes"]) - {"lm_only"}:
            result["modes"][mode]["kd_over_lm_only"] = kd_over_lm_only(result["modes"][mode],
                                                                       result["modes"]["lm_only"])
    for data in result["modes"].values():
        del data["self_ms_by_op"]  # thousands of entries; the differences above are what is read
    path = args.output or RESULTS_DIR / ("profile_step-tiny.json" if tiny else "profile_step.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    for mode, data in result["modes"].items():
        print(f"{mode}: {data['step_ms']:.0f} ms per step; regions {data['regions_ms']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
