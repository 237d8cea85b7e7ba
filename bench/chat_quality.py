"""Conversational distillation on the reference pair (issue 17): responses-only held-out BPB after 60 optimizer steps.

configs/reference-chat.yaml (python-stdlib-chat, each model's own chat template, loss on the responses only, one
conversation per row of at most 512 student tokens, batch 4, lr 2e-5 constant, fp32) trained twice, each in a fresh
`crosskd train` process:

- lm-only: supervised fine-tuning on the responses (objective.kd_alpha=0; the teacher is not run in the steps);
- first-token: crosskd's default on the same data, teacher online;
- first-token-skip-turn-starts: the default with `data.chat.kd_skip_turn_starts=true` (KD leaves each response's
  first token to the LM term, where the teacher expects its own answer format; docs/CHAT.md).

Each run's log.jsonl gives the untouched student's and the teacher's responses-only BPB (its `start` record), the
trained student's (the last `eval` record), every step's wall time and real (unpadded) student tokens per second,
and the share of trained student positions that have a KD pair (`kd_position_share`, per step). The plain-text
comparison divides the conversational step's time per real token by the protocol's (bench/results/quality/<method>.json:
4 x 256 tokens, no padding). A method whose result file exists is skipped unless --force.

    python bench/chat_quality.py                 # every method (~15 min each on 2 cores), then bench/results/chat.json
    python bench/chat_quality.py --methods first-token-skip-turn-starts   # only these
    python bench/chat_quality.py --summary       # rebuild the summary from the runs there

A method with no run on this machine (runs/ is not committed) keeps its record from the committed chat.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "reference-chat.yaml"
RUN_ROOT = REPO / "runs" / "bench-chat"
RESULTS = REPO / "bench" / "results" / "chat.json"
PLAIN_TEXT_RESULTS = REPO / "bench" / "results" / "quality"
COMMON = ("training.log_every=1", "output.tensorboard=false")
METHODS = {"lm-only": ("objective.kd_alpha=0",), "first-token": (),
           "first-token-skip-turn-starts": ("data.chat.kd_skip_turn_starts=true",)}


def command(method: str) -> list[str]:
    return [sys.executable, "-m", "crosskd.cli", "train", str(CONFIG), *COMMON, *METHODS[method],
            f"output.run_dir={RUN_ROOT / method}"]


def train(method: str) -> dict:
    """Run `method` in a fresh process; its wall time and the peak RSS of the process."""
    start = time.perf_counter()
    process = subprocess.Popen(command(method), cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would pool the runs)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args)
    return {"process_wall_seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def measured(method: str) -> dict:
    """What the run's log.jsonl says: the three BPBs, step times and the aligned share of trained positions."""
    records = [json.loads(line) for line in (RUN_ROOT / method / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["kind"] == "start")
    final = [r for r in records if r["kind"] == "eval"][-1]
    steps = [r for r in records if r["kind"] == "train"]
    # wall_seconds is cumulative from the start of training: the difference of consecutive records is one step.
    step_seconds = [later["wall_seconds"] - earlier["wall_seconds"] for earlier, later in zip(steps, steps[1:])]
    return {
        "bpb_untouched": start["bpb"],
        "bpb_teacher": start["teacher_bpb"],
        "bpb_final": final["bpb"],
        "perplexity_final": final.get("perplexity"),
        "steps": len(steps),
        "median_step_seconds": statistics.median(step_seconds),
        "median_real_tokens_per_second": statistics.median(r["tokens_per_second"] for r in steps),
        "kd_position_share_mean": statistics.fmean(r["kd_position_share"] for r in steps),
        "nonfinite_skipped": steps[-1]["nonfinite_skipped"],
        "samples": [{"request": r["request"][:200], "reply": r["reply"][:300]}
                    for r in records if r["kind"] == "sample"],
    }


def plain_text_ratio(method: str, real_tokens_per_second: float) -> dict | None:
    """Seconds per real token against the plain-text protocol run of the same method (its tokens/s)."""
    path = PLAIN_TEXT_RESULTS / f"{method}.json"
    if not path.exists():
        return None
    plain = json.loads(path.read_text())["tokens_per_second"]
    return {"plain_text_tokens_per_second": plain, "seconds_per_token_ratio": plain / real_tokens_per_second}


def summary(runs: dict, previous: dict) -> dict:
    """Each method's record: measured from its run here, else the committed one (`previous`)."""
    methods = {}
    for method in METHODS:
        if (RUN_ROOT / method / "log.jsonl").exists():
            record = measured(method) | runs.get(method, {})
            record["against_plain_text"] = plain_text_ratio(method, record["median_real_tokens_per_second"])
            record["command"] = shlex.join(["python", "-m", "crosskd.cli", *command(method)[3:]])
            methods[method] = record
        elif method in previous:
            methods[method] = previous[method]
    result = {"config": str(CONFIG.relative_to(REPO)), "methods": methods}
    if "lm-only" in methods:
        base = methods["lm-only"]
        gap = base["bpb_final"] - base["bpb_teacher"]
        for record in methods.values():
            record["gap_closed"] = (base["bpb_final"] - record["bpb_final"]) / gap
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="re-run methods that have a run already")
    parser.add_argument("--summary", action="store_true", help="only rebuild the summary")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"from: {', '.join(METHODS)}")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.methods.split(",") if name.strip()]
    for method in chosen:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    previous = json.loads(RESULTS.read_text())["methods"] if RESULTS.exists() else {}
    runs = {m: {k: previous[m][k] for k in ("process_wall_seconds", "peak_rss_mib") if k in previous.get(m, {})}
            for m in METHODS}
    if not args.summary:
        for method in chosen:
            finished = (RUN_ROOT / method / "student").is_dir()
            if finished and not args.force:
                print(f"{method}: finished already")
                continue
            runs[method] = train(method)
    result = summary(runs, previous)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({m: {k: r[k] for k in ("bpb_untouched", "bpb_teacher", "bpb_final", "median_step_seconds",
                                             "kd_position_share_mean")} for m, r in result["methods"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
