"""Does a change of the code's shape leave training bit-for-bit the same? Short runs on the reference pair, recorded.

Each method of bench/quality.py named below trains for a few optimizer steps under the benchmark protocol (its
overrides, a cache of its own for the cached methods) in a fresh `crosskd` process, and the record keeps what the
run logged: every step's total, weighted and raw loss components, the final evaluation (held-out BPB, retention,
evaluation components), the BPB before training, and the sha256 of the exported student's weights. Two records
are then compared value by value (largest relative difference; the weights' hashes must be equal).

    python bench/behaviour_check.py record before.json                      # the package on the current path
    python bench/behaviour_check.py record after.json --src /work/other/src # another checkout's package
    python bench/behaviour_check.py compare before.json after.json          # exit 1 if any value differs > 1e-6

CPU training with the same thread count is deterministic, so a change that only moves code gives identical values.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import BASE_CONFIG, METHODS, PROTOCOL_OVERRIDES, REPO  # noqa: E402  (a sibling script)

DEFAULT_METHODS = ("first-token", "first-token-exclude", "projector", "uld", "router")
DEFAULT_STEPS = 6
TOLERANCE = 1e-6
BEFORE_LINE = re.compile(r"held-out BPB before: student ([0-9.]+), teacher ([0-9.]+)")


def run_overrides(method: str, steps: int, run_root: Path) -> list[str]:
    """The protocol's overrides for `method`, with its teacher cache moved under `run_root` (a short run's cache
    covers only its own steps, so it cannot share the 60-step cache)."""
    overrides = [*PROTOCOL_OVERRIDES, f"training.max_steps={steps}", f"output.run_dir={run_root / method}"]
    for override in METHODS[method].overrides:
        key, _, value = override.partition("=")
        if key == "teacher.cache_dir":
            value = str(run_root / Path(value).name)
        overrides.append(f"{key}={value}")
    return overrides


def crosskd(arguments: list[str], src: Path | None) -> str:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = f"{src}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(src)
    command = [sys.executable, "-m", "crosskd.cli", *arguments]
    print("$", " ".join(command), flush=True)
    finished = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({finished.returncode}):\n{finished.stdout[-4000:]}")
    return finished.stdout


def record_method(method: str, steps: int, run_root: Path, src: Path | None) -> dict:
    overrides = run_overrides(method, steps, run_root)
    if METHODS[method].cached:
        crosskd(["cache-teacher", str(BASE_CONFIG), *overrides], src)
    run_dir = run_root / method
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    started = time.perf_counter()
    output = crosskd(["train", str(BASE_CONFIG), *overrides], src)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    before = BEFORE_LINE.search(output)
    weights = sorted((run_dir / "student").glob("*.safetensors"))
    return {
        "overrides": overrides,
        "seconds": time.perf_counter() - started,
        "bpb_before": float(before.group(1)) if before else None,
        "teacher_bpb": float(before.group(2)) if before else None,
        "train": [{key: value for key, value in r.items() if key.startswith(("loss/", "raw/")) or key == "total"}
                  | {"step": r["step"]} for r in records if r["kind"] == "train"],
        "eval": [{key: value for key, value in r.items() if isinstance(value, float)} | {"step": r["step"]}
                 for r in records if r["kind"] == "eval"],
        "student_sha256": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in weights},
    }


def record(path: Path, methods: list[str], steps: int, src: Path | None) -> None:
    run_root = REPO / "runs" / "behaviour-check" / path.stem
    result = {"steps": steps, "src": str(src) if src else "current", "methods": {}}
    if path.exists():
        result = json.loads(path.read_text())  # resumable: methods already recorded are kept
    for method in methods:
        if method in result["methods"]:
            print(f"{method}: recorded already")
            continue
        result["methods"][method] = record_method(method, steps, run_root, src)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{method}: recorded in {result['methods'][method]['seconds']:.0f} s", flush=True)


def _numbers(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, item in value.items():
            _numbers(f"{prefix}.{key}" if prefix else key, item, out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _numbers(f"{prefix}[{index}]", item, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


def compare(before_path: Path, after_path: Path) -> int:
    before, after = (json.loads(path.read_text())["methods"] for path in (before_path, after_path))
    failures = 0
    for method in sorted(set(before) & set(after)):
        old = _numbers("", {k: v for k, v in before[method].items() if k not in ("seconds", "overrides")}, {})
        new = _numbers("", {k: v for k, v in after[method].items() if k not in ("seconds", "overrides")}, {})
        missing = sorted(set(old) ^ set(new))
        worst, where = 0.0, None
        for key in set(old) & set(new):
            difference = abs(old[key] - new[key]) / max(abs(old[key]), 1e-12)
            if difference > worst:
                worst, where = difference, key
        same_weights = before[method]["student_sha256"] == after[method]["student_sha256"]
        ok = worst <= TOLERANCE and not missing and same_weights
        failures += not ok
        print(f"{method}: {len(old)} values, largest relative difference {worst:.2e}"
              f"{f' ({where})' if where else ''}; student weights {'identical' if same_weights else 'DIFFER'}"
              f"{f'; only on one side: {missing[:6]}' if missing else ''} -> {'same' if ok else 'CHANGED'}")
    for method in sorted(set(before) ^ set(after)):
        print(f"{method}: recorded on one side only")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    record_parser = commands.add_parser("record", help="train the methods and write their record")
    record_parser.add_argument("output", type=Path)
    record_parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    record_parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    record_parser.add_argument("--src", type=Path, help="the src/ folder whose crosskd package runs (default: the "
                                                        "installed one)")
    compare_parser = commands.add_parser("compare", help="compare two records")
    compare_parser.add_argument("before", type=Path)
    compare_parser.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "compare":
        return compare(args.before, args.after)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    record(args.output, methods, args.steps, args.src)
    return 0


if __name__ == "__main__":
    sys.exit(main())
