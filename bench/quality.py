"""Distillation quality and speed on the reference pair, one method at a time, under the fixed protocol of issue 7.

Every method trains the student with crosskd's trainer on the same 240 protocol windows (60 optimizer steps of 4
windows of 256 tokens, AdamW lr 2e-5 constant after 6 warm-up steps, clipping 1.0, seed 0, fp32, evaluation only at
the end) and differs only by the dotted overrides in METHODS. Each method runs in a fresh process (its own peak RSS,
no accelerate state carried over) and writes bench/results/quality/<method>.json; a method whose file exists is
skipped unless --force. The summary table and docs/quality.png are rebuilt from all result files at the end.

    python bench/quality.py                                   # every method not measured yet, then the summary
    python bench/quality.py --methods lm-only,first-token     # only these
    python bench/quality.py --summary                         # table and plot from the files already there

Recorded per method: held-out BPB (best and final, crosskd.evaluate.bits_per_byte), gap closed
(BPB_lm-only - BPB_method) / (BPB_lm-only - BPB_teacher), median seconds per optimizer step and tokens/s (from the
run's log.jsonl), peak RSS, the floor (teacher forward + student forward/backward on the first 4x256 protocol batch,
measured in the same process before training) and step/floor, the sha256 of the trainer's windows checked against
`protocol_train_windows`, the machine, and the command that reproduces the file.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from crosskd.config import Config, load_config
from crosskd.data.collate import IGNORE_INDEX, collate_windows
from crosskd.data.corpus import TrainingCorpus
from crosskd.data.windows import protocol_train_windows, window_ids_sha256
from crosskd.evaluate import bits_per_byte
from crosskd.models.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "reference.yaml"
RESULTS_DIR = REPO / "bench" / "results" / "quality"
RUNS_DIR = REPO / "runs" / "bench-quality"
PLOT_PATH = REPO / "docs" / "quality.png"

PROTOCOL_STEPS = 60
PROTOCOL_OVERRIDES = (
    "data.window_tokens=256",
    "data.seed=0",
    "training.batch_size=4",
    "training.gradient_accumulation_steps=1",
    "optimizer.lr=2e-5",
    "optimizer.scheduler=constant",
    "optimizer.warmup_steps=6",
    "optimizer.grad_clip=1.0",
    "training.seed=0",
    'training.mixed_precision="no"',  # quoted: YAML reads a bare no as false
    "models.teacher_dtype=float32",
    "training.eval_every=0",
    "training.log_every=1",  # one log.jsonl record per step: the step times come from it
    "output.tensorboard=false",
)
FLOOR_REPEATS = 3  # timed repetitions after one warm-up; the median is kept (the machine is shared)

# The baseline of "gap closed" and the reference point at the other end.
LM_ONLY, TEACHER = "lm-only", "teacher"
GOLD = "gold"  # written by bench/gold_baseline.py, not run from here


@dataclass(frozen=True)
class Method:
    group: str  # the issue's letter: A lm-only, B TRL GOLD, C crosskd, D teacher
    overrides: tuple[str, ...]  # dotted overrides of configs/reference.yaml on top of PROTOCOL_OVERRIDES
    description: str
    off_protocol: bool = False  # overrides a protocol setting (marked in the table, never a default candidate)

    @property
    def cached(self) -> bool:
        return "teacher.source=cache" in self.overrides


def from_cache(top_k: int = 256, observed: bool = False) -> tuple[str, ...]:
    """Overrides that train from a teacher cache of the protocol windows. Methods that read the same parts of the
    teacher signal share one cache folder (its fingerprint has no temperature, weight or divergence in it): the top-k,
    and with `observed` the observed-token log-probabilities too (chain-rule, chunk-likelihood); the worker writes it
    when missing."""
    folder = f"teacher-cache-k{top_k}{'-observed' if observed else ''}"
    return ("teacher.source=cache", f"objective.kd_top_k={top_k}", f"teacher.cache_dir={RUNS_DIR / folder}")


NO_KD_WARMUP = ("schedule.kd_warmup_start=1.0",)
# The defaults before this benchmark chose new ones (docs/BENCHMARKS.md, Defaults).
EXCLUDE = ("objective.mismatch_policy=exclude",)
ANNEAL = ("schedule.temperature_start=2.0", "schedule.temperature_end=1.5")

METHODS: dict[str, Method] = {
    LM_ONLY: Method("A", ("objective.kd_alpha=0",), "LM-only fine-tuning of the student"),
    "first-token": Method("C", (), "crosskd default: first-token map with merged run-past tokens, forward KL, τ 1"),
    "first-token-cached": Method("C", from_cache(), "crosskd default, teacher signal read from the cache"),
    "first-token-cached-k64": Method("C", from_cache(top_k=64), "crosskd default from a cache of the top-64 only"),
    "first-token-exclude-anneal": Method("C", (*EXCLUDE, *ANNEAL),
                                         "first-token, run-past pairs excluded, τ 2 -> 1.5 (the first default)"),
    "first-token-exclude": Method("C", (*from_cache(), *EXCLUDE), "first-token, run-past pairs excluded (cached)"),
    "first-token-kd-only": Method("C", (*from_cache(), *EXCLUDE, *NO_KD_WARMUP, "objective.lm_alpha=0"),
                                  "first-token, run-past pairs excluded, no LM term, no KD warm-up (cached)"),
    "first-token-kd-only-merge": Method("C", (*from_cache(), *NO_KD_WARMUP, "objective.lm_alpha=0"),
                                        "crosskd default's target (merge), no LM term, no KD warm-up (cached)"),
    "first-token-kd-balance": Method("C", (*from_cache(), "objective.kd_balance=gradient-norm"),
                                     "crosskd default, KD scaled to the LM term's gradient norm (cached)"),
    "first-token-kd3": Method("C", (*from_cache(), *NO_KD_WARMUP, "objective.kd_alpha=3"),
                              "crosskd default with KD weight 3 from step 0 (cached)"),
    "first-token-rkl": Method("C", (*from_cache(), "objective.divergence=reverse_kl"),
                              "first-token map, reverse KL (cached)"),
    "jsd": Method("C", (*from_cache(), "objective.divergence=generalized_jsd"),
                  "first-token map, generalized JSD β 0.5 (cached)"),
    "projector": Method("C", ("objective.strategy=projector",),
                        "residual logit projector (pre-fitted, anchored), forward KL"),
    "projector-topk": Method("C", ("objective.strategy=projector", "objective.projector_features=topk_embeddings"),
                             "residual logit projector reading top-k weighted teacher embeddings"),
    # ULD is a distance of its own: the reference config's divergence must be unset. It reads the teacher's top-k only.
    "uld": Method("C", (*from_cache(), "objective.strategy=uld", "objective.divergence=null"),
                  "ULD (sorted-probability L1, cached)"),
    "router": Method("C", ("router.enabled=true",), "crosskd default + student-aware router feature term"),
    "router-dense": Method("C", ("router.enabled=true", "router.dense=true"),
                           "crosskd default + dense matching of every teacher layer group (the router's parameters)"),
    "intermediate": Method("C", ("router.enabled=true", "router.layerwise_alpha=0.1", "router.contrastive_alpha=0.1"),
                           "crosskd default + router + layerwise + contrastive terms"),
    # The targets that carry more (issue 16): exact run-past mass, chunk likelihood beside the first-token KD, and the
    # student's distribution moved into the teacher's vocabulary.
    "first-token-chain-rule": Method("C", (*from_cache(observed=True), "objective.mismatch_policy=chain-rule"),
                                     "first-token map, run-past tokens split by the chain rule (cached)"),
    "chunk-likelihood": Method("C", (*from_cache(observed=True), "objective.strategy=chunk-likelihood"),
                               "crosskd default + chunk likelihood matching (BCE on p^(1/100), weight 1; cached)"),
    "chunk-likelihood-squared": Method("C", (*from_cache(observed=True), "objective.strategy=chunk-likelihood",
                                             "objective.chunk_likelihood_loss=squared"),
                                       "crosskd default + chunk likelihood matching (squared log-likelihood "
                                       "difference, weight 1; cached)"),
    # BCE at τ 100 moves a chunk's log-likelihood by at most ~1/τ per nat: weight τ puts its gradient on the LM term's
    # scale.
    "chunk-likelihood-w100": Method("C", (*from_cache(observed=True), "objective.strategy=chunk-likelihood",
                                          "objective.chunk_likelihood_weight=100"),
                                    "crosskd default + chunk likelihood matching (BCE on p^(1/100), weight 100; "
                                    "cached)"),
    "student-projection": Method("C", (*from_cache(), "objective.strategy=student-projection"),
                                 "student distribution projected into the teacher's vocabulary, forward KL on its "
                                 "top-k + tail (cached)"),
    # Off the protocol (its lr is 2e-5): how much more KD gives when the student is allowed to move further.
    "lm-only-lr1e-4": Method("A", ("objective.kd_alpha=0", "optimizer.lr=1e-4"),
                             "LM-only fine-tuning at lr 1e-4 (off-protocol)", off_protocol=True),
    "first-token-lr1e-4": Method("C", (*from_cache(), "optimizer.lr=1e-4"),
                                 "crosskd default at lr 1e-4 (off-protocol, cached)", off_protocol=True),
    # Off the protocol: twice the windows per step, the same 60 steps. It reads the 480 windows of the budget curve's
    # first 120 steps, so it says whether this budget is limited by tokens (it then matches LM-only's 120-step BPB)
    # or by optimizer steps (it stays near the 60-step BPB), and so how much a richer target per token can give.
    "lm-only-batch8": Method("A", ("objective.kd_alpha=0", "training.batch_size=8"),
                             "LM-only fine-tuning, 8 windows per step (off-protocol)", off_protocol=True),
    TEACHER: Method("D", (), "the teacher, evaluated only"),
}
SWEEP_LEARNING_RATES = ("2e-5", "5e-5", "1e-4", "2e-4")


def learning_rate_sweep() -> dict[str, Method]:
    """Off the protocol: does KD take a larger step than LM-only can? Each learning rate with the protocol's 6
    warm-up steps, then cosine decay to 0 at the last step, for LM-only and for the default (from the cache)."""
    methods = {}
    for lr in SWEEP_LEARNING_RATES:
        cosine = (f"optimizer.lr={lr}", "optimizer.scheduler=cosine")
        methods[f"lm-only-cosine-lr{lr}"] = Method("A", ("objective.kd_alpha=0", *cosine),
                                                   f"LM-only at lr {lr}, cosine decay (off-protocol)",
                                                   off_protocol=True)
        methods[f"first-token-cosine-lr{lr}"] = Method("C", (*from_cache(), *cosine),
                                                       f"crosskd default at lr {lr}, cosine decay (off-protocol, "
                                                       "cached)", off_protocol=True)
    return methods


METHODS.update(learning_rate_sweep())
DEFAULT_ORDER = (LM_ONLY, "first-token", "uld", "projector", "router", "router-dense", "first-token-rkl", "jsd",
                 TEACHER)


def result_path(method: str) -> Path:
    return RESULTS_DIR / f"{method}.json"


def is_current(method: str) -> bool:
    """A result file counts as done unless it was trained on windows other than the protocol's (files written
    before the trainer's windows were fixed to match it are re-measured)."""
    path = result_path(method)
    return path.exists() and json.loads(path.read_text()).get("windows", {}).get("match", True)


def reproduce_command(method: str, steps: int) -> str:
    steps_flag = "" if steps == PROTOCOL_STEPS else f" --steps {steps}"
    return f"python bench/quality.py --methods {method}{steps_flag} --force"


def protocol_config(method: str, steps: int, base_config: Path = BASE_CONFIG, run_root: Path = RUNS_DIR,
                    extra_overrides: tuple[str, ...] = ()) -> Config:
    overrides = [*method_overrides(method, steps), f"output.run_dir={run_root / method}", *extra_overrides]
    return load_config(base_config, overrides)


def method_overrides(method: str, steps: int) -> list[str]:
    return [*PROTOCOL_OVERRIDES, f"training.max_steps={steps}", *METHODS[method].overrides]


def machine() -> dict:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def first_trainer_windows(config: Config, student_tokenizer, teacher_tokenizer, steps: int) -> list:
    """The windows of the trainer's first `steps` batches (epoch 0, one process), in order."""
    corpus = TrainingCorpus(config.data, student_tokenizer, teacher_tokenizer, teacher_tokenizer.pad_token_id)
    batches = corpus.train_windows(start=0, process_index=0, num_processes=1, batch_size=config.training.batch_size)
    return [window for batch in itertools.islice(batches, steps) for window in batch]


def verify_windows(config: Config, steps: int) -> tuple[dict, list]:
    """The trainer's first steps x batch windows against `protocol_train_windows`: same ids, same order?

    Returns the record and the protocol windows (the floor is measured on their first batch).
    """
    student_tokenizer = load_tokenizer(config.models.student, "student")
    teacher_tokenizer = load_tokenizer(config.models.teacher, "teacher")
    batch_size = config.training.batch_size
    trainer_windows = first_trainer_windows(config, student_tokenizer, teacher_tokenizer, steps)
    protocol_windows = protocol_train_windows(student_tokenizer, teacher_tokenizer, count=steps * batch_size,
                                              window_tokens=config.data.window_tokens)
    trainer_sha, protocol_sha = window_ids_sha256(trainer_windows), window_ids_sha256(protocol_windows)
    first_difference = next((index for index, (ours, theirs) in enumerate(zip(trainer_windows, protocol_windows))
                             if not (ours.student_ids == theirs.student_ids).all()), None)
    record = {
        "count": len(trainer_windows),
        "trainer_sha256": trainer_sha,
        "protocol_sha256": protocol_sha,
        "match": trainer_sha == protocol_sha,
        "first_differing_window": first_difference,
    }
    return record, protocol_windows


def median_seconds(work, repeats: int = FLOOR_REPEATS) -> float:
    """Median wall time of `repeats` calls of `work` after one warm-up call (first-call allocations)."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def teacher_forward_seconds(teacher, batch, repeats: int = FLOOR_REPEATS) -> float:
    """The teacher's forward (no grad) on `batch`, timed like `median_seconds`."""
    def teacher_forward() -> None:
        with torch.no_grad():
            teacher.model(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask)

    return median_seconds(teacher_forward, repeats)


def measure_floor(config: Config, windows: list) -> dict:
    """Teacher forward (no grad) + student forward/backward with the LM loss on one protocol batch: what any
    online distillation step must at least cost on this machine."""
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    student = load_model(config.models.student, "student")
    batch = collate_windows(windows[: config.training.batch_size], teacher.vocab.pad_id)

    def student_forward_backward() -> None:
        logits = student.model(input_ids=batch.student_input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.student_targets.flatten(),
                                                 ignore_index=IGNORE_INDEX)
        loss.backward()
        student.model.zero_grad(set_to_none=True)

    teacher_seconds = teacher_forward_seconds(teacher, batch)
    student_seconds = median_seconds(student_forward_backward)
    del teacher, student
    gc.collect()
    return {
        "teacher_forward_seconds": teacher_seconds,
        "student_forward_backward_seconds": student_seconds,
        "seconds": teacher_seconds + student_seconds,
        "repeats": FLOOR_REPEATS,
        "batch": f"{config.training.batch_size}x{config.data.window_tokens} (first protocol windows)",
    }


def step_timings(run_dir: Path, tokens_per_step: int) -> dict:
    """Per-step wall time from log.jsonl: the trainer logs tokens/s over each step (log_every=1), and every protocol
    step reads exactly batch x window student tokens (full windows, no padding)."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    step_seconds = [tokens_per_step / record["tokens_per_second"] for record in records if record["kind"] == "train"]
    return {
        "steps_logged": len(step_seconds),
        "median_step_seconds": statistics.median(step_seconds),
        "mean_step_seconds": statistics.fmean(step_seconds),
        "min_step_seconds": min(step_seconds),
        "max_step_seconds": max(step_seconds),
        "tokens_per_second": tokens_per_step / statistics.median(step_seconds),
        "final_train_loss": next(r["total"] for r in reversed(records) if r["kind"] == "train"),
    }


def write_cache(config: Config) -> dict:
    """The teacher cache a cached method reads: written (or resumed, or found complete) before training, timed apart
    from it; the accelerator state it leaves behind is reset so training starts as a fresh process would."""
    from accelerate.state import AcceleratorState

    from crosskd.api import cache_teacher

    summary = cache_teacher(config, progress=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
    return {
        "dir": str(summary.cache_dir),
        "bytes": summary.bytes,
        "bytes_per_student_token": summary.bytes_per_student_token,
        "bytes_per_aligned_position": summary.bytes_per_position,
        "seconds_this_run": summary.seconds,
        "already_complete": summary.resumed_at == summary.micro_batches,
    }


def measure_training(config: Config, cached: bool) -> dict:
    from crosskd.train.recipe import train

    steps = config.training.max_steps
    run_dir = Path(config.output.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the logbook appends: a stale log.jsonl would mix two runs' step times
    cache = write_cache(config) if cached else None
    windows, protocol_windows = verify_windows(config, steps)
    floor = measure_floor(config, protocol_windows)
    del protocol_windows
    start = time.perf_counter()
    result = train(config)
    wall_seconds = time.perf_counter() - start
    timings = step_timings(run_dir, config.training.batch_size * config.data.window_tokens)
    # Checkpoints hold optimizer state (GBs per method) and are not needed once the result is read; the exported
    # student and the log stay in the run folder.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        "bpb_final": result.final_bpb,
        "bpb_best": result.best_bpb,
        "best_step": result.best_step,
        "bpb_student_before": result.initial_bpb,
        "bpb_teacher": result.teacher_bpb,
        "steps": result.steps,
        "nonfinite_skipped": result.nonfinite_skipped,
        **timings,
        "step_over_floor": timings["median_step_seconds"] / floor["seconds"],
        "floor": floor,
        "train_wall_seconds": wall_seconds,
        "windows": windows,
        "run_dir": str(run_dir),
        **({"teacher_cache": cache} if cache else {}),
    }


def measure_teacher(config: Config) -> dict:
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    student_tokenizer = load_tokenizer(config.models.student, "student")
    corpus = TrainingCorpus(config.data, student_tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    start = time.perf_counter()
    bpb = bits_per_byte(teacher.model, teacher.tokenizer, corpus.eval_text()).bits_per_byte
    return {"bpb_final": bpb, "bpb_best": bpb, "eval_seconds": time.perf_counter() - start}


def run_worker(method: str, steps: int) -> None:
    """Measure one method in this (fresh) process and write its result file."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    host = machine()
    config = protocol_config(method, steps)
    measured = measure_teacher(config) if method == TEACHER else measure_training(config, METHODS[method].cached)
    record = {
        "method": method,
        "group": METHODS[method].group,
        "description": METHODS[method].description,
        "overrides": method_overrides(method, steps),
        "base_config": str(BASE_CONFIG.relative_to(REPO)),
        **measured,
        "peak_rss_mib": peak_rss_mib(),
        "machine": host,
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": reproduce_command(method, steps),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result_path(method).write_text(json.dumps(record, indent=1) + "\n")


def load_results() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS_DIR.glob("*.json"))}


def add_gap_closed(results: dict[str, dict]) -> None:
    """Gap closed = (BPB_lm-only - BPB_m) / (BPB_lm-only - BPB_teacher), on final BPB; written into each file."""
    if LM_ONLY not in results:
        return
    teacher_bpb = results[TEACHER]["bpb_final"] if TEACHER in results else results[LM_ONLY]["bpb_teacher"]
    lm_only_bpb = results[LM_ONLY]["bpb_final"]
    for method, record in results.items():
        record["gap_closed"] = (lm_only_bpb - record["bpb_final"]) / (lm_only_bpb - teacher_bpb)
        record["gap_reference"] = {"lm_only_bpb": lm_only_bpb, "teacher_bpb": teacher_bpb}
        result_path(method).write_text(json.dumps(record, indent=1) + "\n")


def _format(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(results: dict[str, dict]) -> str:
    rows = ["| method | group | held-out BPB (final) | best | gap closed | s/step (median) | tokens/s | "
            "step / floor | peak RSS (GiB) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for method, record in sorted(results.items(), key=lambda item: (item[1]["group"], item[0])):
        rss = record.get("peak_rss_mib")
        name = f"{method} (off-protocol)" if method in METHODS and METHODS[method].off_protocol else method
        rows.append(
            f"| {name} | {record['group']} | {record['bpb_final']:.4f} | {record['bpb_best']:.4f} | "
            f"{_format(record.get('gap_closed'), '.1%')} | {_format(record.get('median_step_seconds'), '.2f')} | "
            f"{_format(record.get('tokens_per_second'), '.0f')} | {_format(record.get('step_over_floor'), '.2f')} | "
            f"{_format(None if rss is None else rss / 1024, '.2f')} |"
        )
    return "\n".join(rows)


def plot(results: dict[str, dict], path: Path = PLOT_PATH) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {m: r for m, r in results.items() if m != TEACHER}
    order = sorted(trained, key=lambda m: trained[m]["bpb_final"])
    colours = {"A": "tab:gray", "B": "tab:orange", "C": "tab:blue"}
    figure, axes = plt.subplots(figsize=(10, 4.6))
    bars = axes.bar(order, [trained[m]["bpb_final"] for m in order], width=0.6,
                    color=[colours.get(trained[m]["group"], "tab:blue") for m in order])
    axes.bar_label(bars, fmt="%.3f", fontsize=8)
    before = next((r["bpb_student_before"] for r in trained.values() if "bpb_student_before" in r), None)
    teacher = results[TEACHER]["bpb_final"] if TEACHER in results else None
    for value, label, style in ((before, "student before training", ":"), (teacher, "teacher", "--")):
        if value is not None:
            axes.axhline(value, linestyle=style, color="black", linewidth=1)
            # At the left, above the best (lowest) bars, so the label never covers a bar's value.
            axes.text(-0.5, value, f" {label} {value:.3f}", va="bottom", ha="left", fontsize=8,
                      bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    low = min([r["bpb_final"] for r in results.values()]) - 0.02
    axes.set_ylim(low, (before or max(r["bpb_final"] for r in trained.values())) + 0.02)
    axes.set_ylabel("held-out bits per byte (lower is better)")
    steps = next((r["steps"] for r in trained.values() if "steps" in r), PROTOCOL_STEPS)
    axes.set_title(f"Reference pair, {steps} steps x 4 windows x 256 tokens\n"
                   "grey: LM-only, orange: TRL GOLD, blue: crosskd; * off-protocol (its learning rate or schedule)",
                   fontsize=10)
    axes.set_xticks(range(len(order)), [f"{m} *" if m in METHODS and METHODS[m].off_protocol else m for m in order])
    plt.setp(axes.get_xticklabels(), rotation=20, ha="right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarize(plot_path: Path = PLOT_PATH) -> str:
    results = load_results()
    if not results:
        return "no results yet"
    add_gap_closed(results)
    if len(results) > 1 or TEACHER not in results:
        plot(results, plot_path)
    return markdown_table(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_ORDER),
                        help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=PROTOCOL_STEPS, help="optimizer steps (the protocol: 60)")
    parser.add_argument("--force", action="store_true", help="re-measure methods that already have a result file")
    parser.add_argument("--summary", action="store_true", help="only rebuild the table and plot")
    parser.add_argument("--worker", metavar="METHOD", help=argparse.SUPPRESS)  # one method in a fresh process
    args = parser.parse_args()

    if args.worker:
        run_worker(args.worker, args.steps)
        return 0
    if not args.summary:
        methods = [name.strip() for name in args.methods.split(",") if name.strip()]
        unknown = [name for name in methods if name not in METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        failed = []
        for method in methods:
            if is_current(method) and not args.force:
                print(f"{method}: {result_path(method).relative_to(REPO)} exists, skipped (--force re-measures)")
                continue
            worker = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps)]
            print(f"{method}: {shlex.join(worker)}", flush=True)
            if subprocess.run(worker).returncode != 0:
                failed.append(method)
        if failed:
            print(f"failed: {', '.join(failed)} (their output is above; no result file was written)")
    print(summarize())
    return 0


if __name__ == "__main__":
    sys.exit(main())
