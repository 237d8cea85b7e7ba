"""Hidden-risk check (issue 16): held-out BPB on a second text family that the benchmark never trains on.

The protocol trains and evaluates on Python source. A method could gain there by fitting the stdlib's code and lose
elsewhere; this measures every trained protocol student (runs/bench-quality/<method>/student, written by
bench/quality.py) next to the untouched student and the teacher on English documentation prose: the Python Language
Reference's topics as the stdlib ships them for `help()` (`pydoc_data.topics`, reStructuredText-like prose with short
grammar and code examples). The stdlib corpus skips files over 200 KB, so this 757 KB module is in no training window.
The text is the topics in sorted key order, whole, until at least TEXT_CHARS characters (about the size of the
protocol's held-out text); its sha256 and the Python version that shipped it are recorded.

    python bench/second_family.py                       # every protocol student found, ~20 s each on 2 cores
    python bench/second_family.py --methods lm-only,first-token-cached
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import pydoc_data.topics

from crosskd.evaluate import bits_per_byte
from crosskd.models.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import RUNS_DIR, result_path  # noqa: E402  (a sibling script)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "second_family.json"
TEXT_CHARS = 24_000
REFERENCE_MODELS = {"untouched": "reference:student", "teacher": "reference:teacher"}


def documentation_text(min_chars: int = TEXT_CHARS) -> tuple[str, list[str]]:
    """Whole topics of the Language Reference in sorted key order until `min_chars`; (text, topic keys)."""
    parts, keys = [], []
    for key in sorted(pydoc_data.topics.topics):
        parts.append(pydoc_data.topics.topics[key].strip())
        keys.append(key)
        if sum(len(part) + 2 for part in parts) >= min_chars:
            break
    return "\n\n".join(parts) + "\n", keys


def evaluate(spec: str, role: str, text: str) -> dict:
    loaded = load_model(spec, role)
    start = time.perf_counter()
    result = bits_per_byte(loaded.model, loaded.tokenizer, text)
    measured = {"bpb": result.bits_per_byte, "perplexity": result.perplexity, "scored_bytes": result.scored_bytes,
                "eval_seconds": round(time.perf_counter() - start, 1)}
    del loaded
    gc.collect()
    return measured


def protocol_bpb(method: str) -> float | None:
    path = result_path(method)
    return json.loads(path.read_text())["bpb_final"] if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated protocol methods (default: every student found)")
    args = parser.parse_args()
    found = sorted(p.parent.name for p in RUNS_DIR.glob("*/student") if p.is_dir())
    methods = args.methods.split(",") if args.methods else found
    missing = [m for m in methods if m not in found]
    if missing:
        raise SystemExit(f"no trained student for {', '.join(missing)} under {RUNS_DIR}; train it with "
                         f"`python bench/quality.py --methods {','.join(missing)} --force`")
    text, keys = documentation_text()
    previous = json.loads(RESULTS.read_text())["models"] if RESULTS.exists() else {}
    models = dict(previous)
    for name, spec in REFERENCE_MODELS.items():
        models[name] = evaluate(spec, "teacher" if name == "teacher" else "student", text)
        print(name, models[name], flush=True)
    for method in methods:
        models[method] = evaluate(str(RUNS_DIR / method / "student"), "student", text) | {
            "protocol_heldout_bpb": protocol_bpb(method)}
        print(method, models[method], flush=True)
    result = {
        "text": {"source": "pydoc_data.topics (the Python Language Reference's help topics), sorted keys, whole "
                           "topics", "python": platform.python_version(), "topics": len(keys),
                 "first_topic": keys[0], "last_topic": keys[-1], "chars": len(text),
                 "bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()},
        "models": models,
        "command": "python bench/second_family.py" + (f" --methods {args.methods}" if args.methods else ""),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
