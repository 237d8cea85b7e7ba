"""How KD's margin over LM-only grows with the training budget, and what it is worth in LM-only tokens.

One run per method, 480 optimizer steps of 4 x 256 tokens (no window repeated: the protocol's window stream continues
past its first 240 windows), evaluated every 60 steps (the curve's points: 60, 120, 240 and 480). The data-limited
case (`--data-limited`) trains 4 epochs over the 240 protocol windows (`data.max_train_windows=240`), evaluated after
each epoch: what a user with a small corpus gets, where LM-only is expected to overfit. With `--teacher-text` the
same 240 windows are joined by the teacher's own continuations of their starts (`crosskd write-teacher-text`,
sequence-level distillation), and the 240 steps read both, shuffled together. The learning rate is constant
after the protocol's 6 warm-up steps and the KD warm-up spans the protocol's first 12 steps whatever the run's length,
so a run's BPB at step s stands for a run of s steps. The teacher comes from a cache of the whole run's windows
(`cache-teacher` resumes, so it can be built over several sittings); every run checkpoints at each evaluation and
resumes where it stopped, so the benchmark can span sessions.

    python bench/budget_curve.py                                  # every method, resuming what is there
    python bench/budget_curve.py --methods lm-only,first-token    # only these
    python bench/budget_curve.py --data-limited                   # 4 epochs over the 240 protocol windows
    python bench/budget_curve.py --data-limited --teacher-text    # ... plus the teacher's continuations of them
    python bench/budget_curve.py --summary                        # summary.json, the tables and docs/budget.png
    python bench/budget_curve.py --methods first-token-chain-rule --steps 240   # the stream's first 240 steps only

A stream run shortened with `--steps` is the first part of the full run, step for step: the same windows in the same
order, the same warm-ups in steps and the same constant rate, and a cache of only the windows it reads. It cannot be
lengthened later (its checkpoints resume to its own last step); remove its folder to run the whole stream.

Methods are named as in bench/quality.py and take its overrides (their teacher cache moved to this run length's).
Writes bench/results/budget/summary.json:
{"untouched_bpb", "teacher_bpb", "methods": {name: {"steps", "bpb", "wall_seconds", "step_seconds", "overrides"}},
 "multiplier": {name: {"<steps>": x}}, "extrapolated": {name: {"<steps>": bool}}, "data_limited": {"methods": ...},
 "data_limited_teacher_text": {"methods": ...}}:
the token multiplier of a method
at s steps is the number of LM-only steps that reach its BPB (log-linear interpolation of the LM-only curve in
log(steps)), divided by s; beyond the LM-only curve's ends it is extrapolated from the nearest two points and flagged.
The data-limited parts add "corpus_multiplier": {name: {"best_bpb", "at_step", "fresh_steps", "multiplier",
"extrapolated"}}, what the 240-window corpus is worth with each method, in epochs of fresh text.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402  (a sibling script)
    BASE_CONFIG, LM_ONLY, METHODS, PROTOCOL_OVERRIDES, REPO, RESULTS_DIR, TEACHER,
)

EVAL_EVERY = 60
PROTOCOL_KD_WARMUP_STEPS = 12  # configs/reference.yaml: KD ramps over the first 20 % of the protocol's 60 steps
RUN_ROOT = REPO / "runs" / "budget"
RESULTS = REPO / "bench" / "results" / "budget"
# LM-only, today's default (teacher from the cache) and the best setting of the 60-step sweeps: the default at lr 1e-4
# (constant after warm-up, 0.7257 at 60 steps against LM-only's 0.7335; bench/results/quality/first-token-lr1e-4.json).
DEFAULT_METHODS = (LM_ONLY, "first-token-cached", "first-token-lr1e-4")
PLOT_PATH = REPO / "docs" / "budget.png"
OVERRIDES_FILE = "budget_overrides.json"  # in a method's run folder: how it was started
WINDOWS_PER_STEP = 4
TOKENS_PER_STEP = WINDOWS_PER_STEP * 256
# The data-limited scenarios' corpus: the protocol's windows, repeated.
CORPUS_WINDOWS = 240


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: int
    curve_steps: tuple[int, ...]  # the evaluations the tables show
    data_overrides: tuple[str, ...] = ()
    title: str = ""  # the plot panel's
    summary_key: str = ""  # its part of summary.json (empty: the top level)

    @property
    def reads_teacher_text(self) -> bool:
        return any(override.startswith("data.teacher_text.dir=") for override in self.data_overrides)


STREAM = Scenario("stream", 480, (60, 120, 240, 480), title="no window repeated")
DATA_LIMITED = Scenario("data-limited", 240, (60, 120, 180, 240), (f"data.max_train_windows={CORPUS_WINDOWS}",),
                        title="4 epochs over the 240 protocol windows", summary_key="data_limited")
# The data-limited corpus plus the teacher's continuations of it (sequence-level KD, docs/TEACHER_TEXT.md): one
# sample of up to 192 teacher tokens from the start (32 student tokens) of each of the 240 windows, at temperature 0.7
# and top_p 0.95 (at temperature 1 the 0.5B instruct teacher drifts from the code into prose in other languages
# within a few lines, docs/TEACHER_TEXT.md).
TEACHER_TEXT_DIR = RUN_ROOT / "data-limited-teacher-text" / "teacher-text"
DATA_LIMITED_TEACHER_TEXT = Scenario(
    "data-limited-teacher-text", 240, (60, 120, 180, 240),
    (f"data.max_train_windows={CORPUS_WINDOWS}", f"data.teacher_text.dir={TEACHER_TEXT_DIR}",
     "data.teacher_text.samples_per_window=1", "data.teacher_text.new_tokens=192",
     "data.teacher_text.temperature=0.7", "data.teacher_text.top_p=0.95", "data.teacher_text.batch_size=80"),
    title="the 240 windows + the teacher's continuations", summary_key="data_limited_teacher_text")
SCENARIOS = (STREAM, DATA_LIMITED, DATA_LIMITED_TEACHER_TEXT)


def run_dir(method: str, scenario: Scenario) -> Path:
    return RUN_ROOT / scenario.name / method


def overrides(method: str, scenario: Scenario, teacher_online: bool = False) -> list[str]:
    """The protocol's overrides for `method` in `scenario`: an evaluation and a checkpoint every 60 steps, the KD
    warm-up as long in steps as the protocol's, the teacher cache of this scenario's windows (with
    `teacher_online`, the teacher runs in the steps instead: the same BPB, and no cache to build first)."""
    result = [*PROTOCOL_OVERRIDES, f"training.max_steps={scenario.steps}", f"training.eval_every={EVAL_EVERY}",
              f"training.checkpoint_every={EVAL_EVERY}", "training.keep_checkpoints=1",
              f"schedule.kd_warmup_end_progress={PROTOCOL_KD_WARMUP_STEPS / scenario.steps}",
              *scenario.data_overrides, f"output.run_dir={run_dir(method, scenario)}"]
    for override in METHODS[method].overrides:
        key, _, value = override.partition("=")
        if teacher_online and key in ("teacher.source", "teacher.cache_dir"):
            continue
        if key == "teacher.cache_dir":
            value = str(RUN_ROOT / scenario.name / Path(value).name)
        result.append(f"{key}={value}")
    return result


def run_overrides(method: str, scenario: Scenario) -> list[str]:
    """The overrides the run of `method` here was started with (online or cached teacher), as `run` wrote them."""
    path = run_dir(method, scenario) / OVERRIDES_FILE
    return json.loads(path.read_text()) if path.exists() else overrides(method, scenario)


def records(method: str, scenario: Scenario) -> list[dict]:
    log = run_dir(method, scenario) / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def finished(method: str, scenario: Scenario) -> bool:
    return any(r["kind"] == "eval" and r["step"] == scenario.steps for r in records(method, scenario)) and \
        (run_dir(method, scenario) / "student").is_dir()


def crosskd(arguments: list[str]) -> None:
    command = [sys.executable, "-m", "crosskd.cli", *arguments]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def shortened(scenario: Scenario, steps: int) -> Scenario:
    """The first `steps` of `scenario`: its evaluations up to there, in the same run folder (so its summary and
    tables show it) with a run length of `steps`, which is what the overrides, the cache and the resumes follow."""
    if steps > scenario.steps or steps % EVAL_EVERY:
        raise ValueError(f"--steps must be a multiple of {EVAL_EVERY} up to {scenario.steps}, got {steps}")
    return replace(scenario, steps=steps, curve_steps=tuple(s for s in scenario.curve_steps if s <= steps))


def started_steps(method: str, scenario: Scenario) -> int | None:
    """The run length the run of `method` in `scenario` was started with, or None when it was not started."""
    if not (run_dir(method, scenario) / OVERRIDES_FILE).exists():
        return None
    lengths = [int(o.partition("=")[2]) for o in run_overrides(method, scenario) if o.startswith("training.max_steps=")]
    return lengths[-1]  # the last of a key's overrides is the one the config takes


def run(method: str, scenario: Scenario, teacher_online: bool = False) -> None:
    if finished(method, scenario):
        print(f"{method} ({scenario.name}): finished already")
        return
    length = started_steps(method, scenario)
    if length is not None and length != scenario.steps:
        raise SystemExit(f"{run_dir(method, scenario)} was started as a {length}-step run and resumes only to its "
                         f"own last step, not to {scenario.steps}: run it with --steps {length}, or remove the folder "
                         f"to start the {scenario.steps}-step run afresh")
    method_overrides = overrides(method, scenario, teacher_online)
    if scenario.reads_teacher_text:  # written once for every method of the scenario; resumes, or finds it finished
        crosskd(["write-teacher-text", str(BASE_CONFIG), *method_overrides])
    if METHODS[method].cached and not teacher_online:
        crosskd(["cache-teacher", str(BASE_CONFIG), *method_overrides])
    folder = run_dir(method, scenario)
    checkpoints = sorted((folder / "checkpoints").glob("step-*")) if (folder / "checkpoints").is_dir() else []
    if checkpoints:
        crosskd(["train", str(folder / "config.yaml"), "--resume"])
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / OVERRIDES_FILE).write_text(json.dumps(method_overrides, indent=1) + "\n")
        crosskd(["train", str(BASE_CONFIG), *method_overrides])


def curve(method: str, scenario: Scenario) -> dict:
    """The evaluations of a run (step 0 excluded) with the wall time spent to reach each, from its log."""
    rows = records(method, scenario)
    train = [r for r in rows if r["kind"] == "train"]
    step_seconds = {r["step"]: TOKENS_PER_STEP / r["tokens_per_second"] for r in train}
    evals = sorted({r["step"]: r for r in rows if r["kind"] == "eval" and r["step"] > 0}.values(),
                   key=lambda r: r["step"])
    return {
        "steps": [r["step"] for r in evals],
        "bpb": [r["bpb"] for r in evals],
        "wall_seconds": [sum(seconds for step, seconds in step_seconds.items() if step <= r["step"]) for r in evals],
        "step_seconds": [statistics.median([s for step, s in step_seconds.items() if step <= r["step"]] or [0])
                         for r in evals],
    }


def lm_only_steps_for(bpb: float, lm_steps: list[int], lm_bpb: list[float]) -> tuple[float, bool]:
    """LM-only steps that reach `bpb`, interpolated linearly in log(steps) between the two curve points around it;
    (steps, extrapolated)."""
    points = sorted(zip(lm_steps, lm_bpb))
    for (s0, b0), (s1, b1) in zip(points, points[1:]):
        if min(b0, b1) <= bpb <= max(b0, b1) and b0 != b1:
            fraction = (b0 - bpb) / (b0 - b1)
            return math.exp(math.log(s0) + fraction * (math.log(s1) - math.log(s0))), False
    # Outside the measured curve: the nearest end's two points give the slope.
    (s0, b0), (s1, b1) = points[-2:] if bpb < min(lm_bpb) else points[:2]
    slope = (math.log(s1) - math.log(s0)) / (b1 - b0) if b1 != b0 else math.inf
    if not math.isfinite(slope) or slope >= 0:  # LM-only stopped improving: no number of its steps reaches bpb
        return math.inf, True
    return math.exp(math.log(s1) + (bpb - b1) * slope), True


def never_rising(bpb: list[float]) -> list[float]:
    """The closest curve to `bpb` (least squares) that never rises with more steps: each run of evaluations where
    BPB went up is replaced by its mean (pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in bpb:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (mean, count), (last, last_count) = blocks[-2], blocks.pop()
            blocks[-1] = [(mean * count + last * last_count) / (count + last_count), count + last_count]
    return [mean for mean, count in blocks for _ in range(count)]


def lm_only_steps_smoothed(bpb: float, lm_steps: list[int], lm_bpb: list[float]) -> tuple[float, bool]:
    """`lm_only_steps_for` on the never-rising LM-only curve. Point-to-point interpolation follows each evaluation's
    noise: where LM-only's BPB rose from one evaluation to the next, its own later BPB is found at an earlier step
    (a multiplier below 1 for LM-only against itself); on the smoothed curve that cannot happen."""
    return lm_only_steps_for(bpb, lm_steps, never_rising(lm_bpb))


# Each token multiplier in summary.json: its key, the key of its extrapolation flags, how LM-only's steps are read.
MULTIPLIERS = (("multiplier", "extrapolated", lm_only_steps_for),
               ("multiplier_smoothed", "extrapolated_smoothed", lm_only_steps_smoothed))


# The issue's two targets for the best setting: a token multiplier of TARGET_MULTIPLIER from 120 steps on, and a
# third of the LM-only -> teacher gap at the last step. LM-only's trend past its first steps (where it adapts to the
# corpus's format) is fitted from TREND_FROM_STEP on.
TARGET_MULTIPLIER = 3
TARGET_GAP_SHARE = 1 / 3
TREND_FROM_STEP = 120


def log_linear_trend(steps: list[int], bpb: list[float], from_step: int = TREND_FROM_STEP) -> tuple[float, float]:
    """Least-squares line bpb = intercept + slope * log2(steps) through the points from `from_step` on; (intercept,
    slope: BPB per doubling of the steps)."""
    points = [(math.log2(s), b) for s, b in zip(steps, bpb) if s >= from_step]
    if len(points) < 2:
        raise ValueError(f"the trend needs two or more LM-only points from step {from_step} on, got {len(points)}")
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def issue_targets(lm: dict, teacher_bpb: float, curve_steps: tuple[int, ...]) -> dict:
    """What the two targets ask in each other's terms, on LM-only's log-linear trend: the BPB a TARGET_MULTIPLIER x
    multiplier means at each curve point from TREND_FROM_STEP on (LM-only's trend at that many times the steps), and
    the multiplier the gap target means at the last point (the steps at which the trend reaches it)."""
    intercept, slope = log_linear_trend(lm["steps"], lm["bpb"])
    at_multiplier = {s: intercept + slope * math.log2(TARGET_MULTIPLIER * s)
                     for s in curve_steps if s >= TREND_FROM_STEP}
    last = curve_steps[-1]
    measured_last = dict(zip(lm["steps"], lm["bpb"]))[last]
    gap = measured_last - teacher_bpb
    gap_bpb = measured_last - TARGET_GAP_SHARE * gap
    steps_for_gap = 2 ** ((gap_bpb - intercept) / slope) if slope < 0 else math.inf
    return {
        "trend": {"from_step": TREND_FROM_STEP, "bpb_per_doubling": slope, "intercept_at_1_step": intercept},
        f"bpb_at_{TARGET_MULTIPLIER}x": {str(s): bpb for s, bpb in at_multiplier.items()},
        f"gap_closed_by_{TARGET_MULTIPLIER}x_at_{last}": (measured_last - at_multiplier[last]) / gap,
        f"third_of_gap_at_{last}": {"bpb": gap_bpb, "multiplier_it_means": steps_for_gap / last},
    }


def scenario_summary(scenario: Scenario, committed: dict, fresh_data_lm_only: dict | None = None) -> dict:
    """The scenario's curves: from the runs on this machine, and for a method with no run here, the curve of the
    committed summary (`committed`, this scenario's part of it: runs/ is not kept between machines). Multipliers are
    read on `fresh_data_lm_only` when given (for the data-limited scenario, the stream's LM-only curve: how many
    steps of fresh text a run over repeated text is worth; its own LM-only curve rises once it overfits, and
    reaches nothing below its best), else on this scenario's LM-only curve."""
    methods = {m: curve(m, scenario) | {"overrides": run_overrides(m, scenario)} for m in METHODS
               if records(m, scenario)}
    for method, data in committed.get("methods", {}).items():
        if method not in methods or len(data["steps"]) > len(methods[method]["steps"]):
            methods[method] = data
    summary = {"steps_per_run": scenario.steps, "curve_steps": list(scenario.curve_steps), "methods": methods,
               "multiplier": {}, "extrapolated": {}, "multiplier_smoothed": {}, "extrapolated_smoothed": {}}
    lm = fresh_data_lm_only or methods.get(LM_ONLY)
    if lm and len(lm["steps"]) >= 2:
        for method, data in methods.items():
            for multiplier, flags, reach in MULTIPLIERS:
                summary[multiplier][method], summary[flags][method] = {}, {}
                for step, bpb in zip(data["steps"], data["bpb"]):
                    reached, extrapolated = reach(bpb, lm["steps"], lm["bpb"])
                    summary[multiplier][method][str(step)] = reached / step
                    summary[flags][method][str(step)] = extrapolated
        if fresh_data_lm_only is not None:
            summary["corpus_multiplier"] = {method: corpus_multiplier(data, lm) for method, data in methods.items()}
    return summary


def corpus_multiplier(data: dict, fresh_lm_only: dict) -> dict:
    """What a small corpus is worth with a method, the figure a user with one reads: the best BPB its run reached over
    the epochs, and the steps of fresh text LM-only needs for it, as a multiple of one epoch of the corpus (1 = the
    corpus is worth itself; LM-only over repeated text cannot exceed it by much)."""
    best = min(range(len(data["bpb"])), key=lambda index: data["bpb"][index])
    fresh_steps, extrapolated = lm_only_steps_smoothed(data["bpb"][best], fresh_lm_only["steps"],
                                                       fresh_lm_only["bpb"])
    return {"best_bpb": data["bpb"][best], "at_step": data["steps"][best], "fresh_steps": fresh_steps,
            "multiplier": fresh_steps / (CORPUS_WINDOWS / WINDOWS_PER_STEP), "extrapolated": extrapolated}


def summarise() -> dict:
    # The untouched student and the teacher on the same held-out text: the protocol's result files.
    untouched = json.loads((RESULTS_DIR / f"{LM_ONLY}.json").read_text())["bpb_student_before"]
    teacher = json.loads((RESULTS_DIR / f"{TEACHER}.json").read_text())["bpb_final"]
    path = RESULTS / "summary.json"
    committed = json.loads(path.read_text()) if path.exists() else {}
    stream = scenario_summary(STREAM, committed)
    summary = {"untouched_bpb": untouched, "teacher_bpb": teacher, **stream,
               **{scenario.summary_key: scenario_summary(scenario, committed.get(scenario.summary_key, {}),
                                                         fresh_data_lm_only=stream["methods"].get(LM_ONLY))
                  for scenario in SCENARIOS if scenario.summary_key},
               "command": "python bench/budget_curve.py"}
    if LM_ONLY in stream["methods"]:
        summary["issue_targets"] = issue_targets(stream["methods"][LM_ONLY], teacher, STREAM.curve_steps)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def table(summary: dict, scenario: Scenario) -> str:
    """BPB at each curve point, with the token multiplier interpolated between LM-only's points and, after "smoothed",
    on LM-only's never-rising curve (* extrapolated beyond the LM-only curve)."""
    lines = [f"{scenario.name} ({scenario.steps} steps):", "",
             "| method | " + " | ".join(f"{s} steps" for s in scenario.curve_steps) + " |",
             "|---|" + "---|" * len(scenario.curve_steps)]
    for method, data in summary["methods"].items():
        cells = []
        for step in scenario.curve_steps:
            if step not in data["steps"]:
                cells.append("not run yet")
                continue
            bpb = data["bpb"][data["steps"].index(step)]
            multipliers = [f"{summary[kind][method][str(step)]:.2f}x"
                           + ("*" if summary[flags][method][str(step)] else "")
                           for kind, flags, _ in MULTIPLIERS
                           if str(step) in summary.get(kind, {}).get(method, {})]
            cells.append(f"{bpb:.4f}" + (f" ({multipliers[0]}; smoothed {multipliers[1]})" if multipliers else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path = PLOT_PATH) -> None:
    """Held-out BPB against optimizer steps (log scale), one panel per scenario, untouched student and teacher as
    lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [(scenario, summary[scenario.summary_key] if scenario.summary_key else summary)
                 for scenario in SCENARIOS]
    figure, panels = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 4.4))
    for axes, (scenario, data) in zip(panels, scenarios):
        for method, curve_data in data["methods"].items():
            colour = f"C{list(METHODS).index(method) % 10}"  # one colour per method in both panels
            axes.plot(curve_data["steps"], curve_data["bpb"], marker="o", label=method, color=colour)
        for value, label, style in ((summary["untouched_bpb"], "untouched student", ":"),
                                    (summary["teacher_bpb"], "teacher", "--")):
            axes.axhline(value, linestyle=style, color="black", linewidth=1, label=f"{label} {value:.3f}")
        if not data["methods"]:
            axes.text(0.5, 0.5, "not run yet", transform=axes.transAxes, ha="center")
        axes.set_xscale("log")
        axes.set_xlim(scenario.curve_steps[0] / 1.2, scenario.curve_steps[-1] * 1.2)
        axes.minorticks_off()  # the curve's steps label the axis, not powers of ten
        axes.set_xticks(scenario.curve_steps, [str(s) for s in scenario.curve_steps])
        axes.set_ylim(summary["teacher_bpb"] - 0.02, summary["untouched_bpb"] + 0.02)
        axes.set_xlabel("optimizer steps of 4 x 256 tokens")
        axes.set_ylabel("held-out bits per byte (lower is better)")
        axes.set_title(f"{scenario.name}:\n{scenario.title}", fontsize=10)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from: {', '.join(METHODS)}")
    parser.add_argument("--data-limited", action="store_true", help="4 epochs over the 240 protocol windows")
    parser.add_argument("--teacher-text", action="store_true",
                        help="with --data-limited: the 240 windows plus the teacher's continuations of their starts "
                             "(crosskd write-teacher-text runs first), 240 steps over both")
    parser.add_argument("--teacher-online", action="store_true",
                        help="run the teacher in the steps instead of from a cache: the same BPB; for one method in "
                             "a sitting, building the cache first costs as much as the teacher's forwards in training")
    parser.add_argument("--steps", type=int,
                        help=f"run the stream's first STEPS steps only (a multiple of {EVAL_EVERY} up to "
                             f"{STREAM.steps}): the same run, stopped there")
    parser.add_argument("--summary", action="store_true", help="only rebuild summary.json and the tables")
    args = parser.parse_args()
    if args.teacher_text and not args.data_limited:
        parser.error("--teacher-text goes with --data-limited")
    if args.steps is not None and args.data_limited:
        parser.error("--steps shortens the stream; the data-limited runs are 4 epochs")
    if not args.summary:
        scenario = (DATA_LIMITED_TEACHER_TEXT if args.teacher_text else DATA_LIMITED) if args.data_limited else STREAM
        if args.steps is not None:
            try:
                scenario = shortened(scenario, args.steps)
            except ValueError as error:
                parser.error(str(error))
        for method in [name.strip() for name in args.methods.split(",") if name.strip()]:
            if method not in METHODS:
                parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            run(method, scenario, args.teacher_online)
    summary = summarise()
    plot(summary)
    for scenario in SCENARIOS:
        print(table(summary[scenario.summary_key] if scenario.summary_key else summary, scenario))
    return 0


if __name__ == "__main__":
    sys.exit(main())
