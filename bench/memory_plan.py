"""The memory planner (`crosskd plan`) against the measured peak of real training steps.

    python bench/memory_plan.py measure --pair tiny        # real runs, one fresh process each
    python bench/memory_plan.py measure --pair reference   # (4 runs, minutes each on 2 CPU cores)
    python bench/memory_plan.py estimate                   # the planner's figure for every recorded run, and ratios
    python bench/memory_plan.py measure --pair reference --device cuda [--override models.teacher=FOLDER ...]

Each case is `crosskd train` (train/recipe.py, unchanged) in a fresh process with `training.max_steps=2` and
`training.eval_every=0`. What is measured is the peak of the TRAINING STEPS alone: the held-out evaluations before
and after training (whole-vocabulary logits of 512-token windows) are phase boundaries, found by wrapping the
`bits_per_byte` the loop calls. Before the first step the peak is reset; on entry to the final evaluation it is read.
- CPU: the process's peak RSS (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs), which also
  holds the Python/torch runtime, the tokenizers and the corpus; the planner's CPU figure adds its measured host
  baseline for that (crosskd.plan).
- CUDA: `torch.cuda.max_memory_allocated()` after `torch.cuda.reset_peak_memory_stats()`: tensors only, which is what
  the planner's GPU figure estimates (no CUDA context, no caching-allocator slack). Not yet run: no GPU so far.

CPU allocator: while it trains, crosskd asks glibc to serve every buffer from its heap and keep freed memory there
(`training.keep_freed_memory`, the default), so RSS during the steps is the heap's high-water mark: the largest live
set so far plus what fragmentation adds. `--allocator pinned` sets `training.keep_freed_memory=false` and fixes the
mmap threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536): every tensor is its own mapping, returned when freed, and RSS
follows the live tensors, which is what the planner estimates. The tiny pair (all tensors a few MiB) is measured
pinned.

`measure` replaces that pair's cases in bench/results/memory_plan.json; `estimate` recomputes the estimate columns
(the planner may change after a measurement; the measured figures do not).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "memory_plan.json"
COMMON = ["training.max_steps=2", "training.eval_every=0", "output.tensorboard=false"]
# Each pair at two micro-batch sizes, with the teacher online (KD) and with KD off (the teacher is not run in steps);
# the tiny pair (free to run) also with gradient checkpointing and with bf16 autocast.
CASES = {
    "tiny": [
        (REPO / "configs" / "tiny.yaml", ["data.window_tokens=256", f"training.batch_size={b}", *kd])
        for b in (16, 64) for kd in ([], ["objective.kd_alpha=0"])
    ] + [
        (REPO / "configs" / "tiny.yaml", ["data.window_tokens=256", "training.batch_size=64", switch])
        for switch in ("training.gradient_checkpointing=true", "training.mixed_precision=bf16")
    ],
    "reference": [
        # A short held-out text keeps the evaluations around the measured steps cheap; it does not enter the steps.
        (REPO / "configs" / "reference.yaml", ["data.eval_max_chars=1500", f"training.batch_size={b}", *kd])
        for b in (2, 4) for kd in ([], ["objective.kd_alpha=0"])
    ],
}


def _rss_peak_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def _reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_case(config_path: str, overrides: list[str], device: str) -> dict:
    """One training run in this process; the peak of its training steps (see the module docstring)."""
    import torch

    import crosskd.train.recipe as recipe
    from crosskd.config import load_config

    torch.set_num_threads(1)  # the machine is shared; memory does not depend on threads, time does
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    run_dir = tempfile.mkdtemp(prefix="crosskd-memory-plan-")
    config = load_config(config_path, [*COMMON, *overrides, f"output.run_dir={run_dir}"])
    marks: list[dict] = []  # one per bits_per_byte call: the peak since the previous call, and the level after it
    measure_peak = torch.cuda.max_memory_allocated if cuda else _rss_peak_bytes
    measure_now = torch.cuda.memory_allocated if cuda else _rss_bytes
    reset_peak = torch.cuda.reset_peak_memory_stats if cuda else _reset_rss_peak
    original = recipe.bits_per_byte

    def bits_per_byte_marking_phases(*args, **kwargs):
        peak_before = measure_peak()
        result = original(*args, **kwargs)
        reset_peak()
        marks.append({"peak_since_previous": peak_before, "after": measure_now()})
        return result

    recipe.bits_per_byte = bits_per_byte_marking_phases
    started = time.perf_counter()
    result = recipe.train(config)
    # Calls: teacher BPB, student BPB (the last before step 1), then the final evaluation's student BPB.
    if len(marks) != 3 or result.steps != 2:
        raise RuntimeError(f"expected 3 evaluations around 2 steps, got {len(marks)} and {result.steps} steps")
    shutil.rmtree(run_dir)
    return {"config": str(Path(config_path).resolve().relative_to(REPO)), "overrides": overrides, "device": device,
            "step_start_bytes": marks[1]["after"], "step_peak_bytes": marks[2]["peak_since_previous"],
            "seconds": round(time.perf_counter() - started, 1)}


PINNED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _case_in_fresh_process(config_path: Path, overrides: list[str], device: str, allocator: str) -> dict:
    environment = dict(os.environ)
    if device == "cpu":
        environment["ACCELERATE_USE_CPU"] = "true"  # accelerate takes the GPU whenever there is one
        if allocator == "pinned":
            environment.update(PINNED_MMAP_THRESHOLD)
            # The trainer would otherwise turn mmap off while it trains (training.keep_freed_memory).
            overrides = [*overrides, "training.keep_freed_memory=false"]
    command = [sys.executable, __file__, "_case", str(config_path), device, *overrides]
    out = subprocess.run(command, capture_output=True, text=True, env=environment)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"cases": []}


def _write_results(report: dict) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")


def _machine() -> str:
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return (f"{cpu.group(1) if cpu else platform.machine()}, {os.cpu_count()} cores (shared with other benchmarks: "
            f"memory does not depend on the load), Linux {platform.release()}")


def measure(pair: str, device: str, allocator: str, extra: list[str]) -> None:
    report = _read_results()
    same = (pair, device, allocator)
    kept = [case for case in report["cases"] if (case["pair"], case["device"], case["allocator"]) != same]
    measured = []
    for config_path, overrides in CASES[pair]:
        case = {"pair": pair, "allocator": allocator,
                **_case_in_fresh_process(config_path, [*overrides, *extra], device, allocator)}
        print(json.dumps(case), flush=True)
        measured.append(case)
    report["cases"] = kept + measured
    report.setdefault("measure_commands", {})[f"{pair}/{device}/{allocator}"] = {
        "command": f"OMP_NUM_THREADS=1 nice -n 10 python bench/memory_plan.py measure --pair {pair} --device {device}"
                   f" --allocator {allocator}" + "".join(f" --override {o}" for o in extra),
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "common_overrides": COMMON,
    }
    _write_results(report)


def estimate() -> None:
    from crosskd.config import load_config
    from crosskd.plan import plan_memory

    report = _read_results()
    for case in report["cases"]:
        config = load_config(REPO / case["config"], [*COMMON, *case["overrides"]])
        plan = plan_memory(config, device=case["device"])
        case["estimate_bytes"] = plan.total_bytes
        case["estimate_over_measured"] = round(plan.total_bytes / case["step_peak_bytes"], 3)
        case["components"] = {component.name: component.bytes for component in plan.components}
        print(f"{case['pair']:9} {case['allocator']:7} {' '.join(case['overrides']):60} "
              f"measured {case['step_peak_bytes'] / 2**20:8.0f} MiB "
              f"estimate {plan.total_bytes / 2**20:8.0f} MiB ratio {case['estimate_over_measured']:.3f}")
    report["estimate_command"] = "python bench/memory_plan.py estimate"
    _write_results(report)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_case":
        config_path, device, *overrides = sys.argv[2:]
        print(json.dumps(run_case(config_path, overrides, device)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    measuring = sub.add_parser("measure")
    measuring.add_argument("--pair", choices=sorted(CASES), required=True)
    measuring.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    measuring.add_argument("--allocator", choices=("default", "pinned"), default="default",
                           help="CPU only: pinned fixes glibc's mmap threshold so that RSS follows the live tensors")
    measuring.add_argument("--override", action="append", default=[],
                           help="an extra dotted override for every case, e.g. models.teacher=FOLDER for a model "
                                "built from the reference config.json with random weights (memory depends on shapes)")
    sub.add_parser("estimate")
    args = parser.parse_args()
    if args.command == "measure":
        measure(args.pair, args.device, args.allocator, args.override)
    else:
        estimate()


if __name__ == "__main__":
    main()
