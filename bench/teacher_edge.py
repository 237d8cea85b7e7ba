"""Is the teacher's edge on the held-out text something a student can learn? (issue 15)

The benchmark's gap (untouched student 0.7688, teacher 0.5616 held-out BPB) is measured on stdlib files that both
models' pre-training data almost certainly held: CPython's source is copied all over public code. If the teacher's
edge there were mostly memorised text, no distillation on *other* files could transfer it, and its soft targets on
the (equally memorised) training windows would be near one-hot: no more than the data. This measures both models on
three texts of the same size:

- `heldout`: the protocol's held-out text;
- `train`: a stdlib file of the training corpus (`argparse.py`), what KD's targets are computed on;
- `unseen`: Python neither model can have seen, crosskd's own loss modules as committed on 2026-12-02 (`git show
  UNSEEN_COMMIT:...`), written two years after both models' releases.

Per text and model: BPB, the share of scored tokens whose observed next token gets probability > 0.9 (memorised
text shows as a large share), and the mean entropy of the next-token distribution. Trained protocol students found
under runs/bench-quality/ (`--methods`) are measured on `unseen` too: does KD's margin on stdlib code carry to new
code?

    python bench/teacher_edge.py                                  # the untouched student and the teacher, ~8 min
    python bench/teacher_edge.py --methods lm-only,first-token-cached   # ... and these trained students
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from crosskd.config import HELDOUT_CHARS
from crosskd.data.encoding import encode_with_byte_spans
from crosskd.data.stdlib import heldout_text, stdlib_root
from crosskd.evaluate import BPB_WINDOW_TOKENS, bits_per_byte
from crosskd.models.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import REPO, RUNS_DIR  # noqa: E402  (a sibling script)

RESULTS = REPO / "bench" / "results" / "teacher_edge.json"
TEXT_CHARS = HELDOUT_CHARS  # every text the size of the protocol's held-out text
TRAIN_FILE = "argparse.py"
UNSEEN_COMMIT = "a241bfa60597afc2618e2b95514e855295d0d433"
UNSEEN_FOLDER = "src/crosskd/losses"
CONFIDENT = 0.9
REFERENCE_MODELS = {"untouched": ("reference:student", "student"), "teacher": ("reference:teacher", "teacher")}


def unseen_text() -> str:
    """crosskd's loss modules at UNSEEN_COMMIT, in sorted path order, cut to TEXT_CHARS characters."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout
        except (subprocess.CalledProcessError, FileNotFoundError) as error:
            raise SystemExit(f"cannot read commit {UNSEEN_COMMIT[:12]} of this repository ({error}); the unseen text "
                             "is read from git history: run this from a full clone (`git fetch --unshallow`)") from error

    paths = sorted(p for p in git("ls-tree", "--name-only", f"{UNSEEN_COMMIT}:{UNSEEN_FOLDER}").split() if
                   p.endswith(".py"))
    return "".join(git("show", f"{UNSEEN_COMMIT}:{UNSEEN_FOLDER}/{path}") for path in paths)[:TEXT_CHARS]


def texts() -> dict[str, str]:
    return {"heldout": heldout_text(),
            "train": (stdlib_root() / TRAIN_FILE).read_text(encoding="utf-8")[:TEXT_CHARS],
            "unseen": unseen_text()}


@torch.no_grad()
def confidence(model, tokenizer, text: str) -> dict:
    """Share of scored tokens predicted with probability > CONFIDENT, and the mean next-token entropy (nats), over
    the same non-overlapping windows `bits_per_byte` scores."""
    ids = torch.from_numpy(encode_with_byte_spans(tokenizer, text).ids)
    confident, entropy, scored = 0, 0.0, 0
    for start in range(0, len(ids), BPB_WINDOW_TOKENS):
        window = ids[start:start + BPB_WINDOW_TOKENS].unsqueeze(0)
        if window.shape[1] < 2:
            continue
        log_probs = model(input_ids=window).logits[0, :-1].float().log_softmax(-1)
        observed = log_probs.gather(1, window[0, 1:, None]).squeeze(1).exp()
        confident += int((observed > CONFIDENT).sum())
        entropy += float(-(log_probs.exp() * log_probs).sum())
        scored += observed.numel()
    return {"share_confident": confident / scored, "mean_entropy_nats": entropy / scored}


def measure(spec: str, role: str, named_texts: dict[str, str], with_confidence: bool) -> dict:
    loaded = load_model(spec, role)
    measured = {}
    for name, text in named_texts.items():
        start = time.perf_counter()
        result = bits_per_byte(loaded.model, loaded.tokenizer, text)
        measured[name] = {"bpb": result.bits_per_byte, "scored_bytes": result.scored_bytes}
        if with_confidence:
            measured[name] |= confidence(loaded.model, loaded.tokenizer, text)
        measured[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{spec} {name}: {measured[name]}", flush=True)
    del loaded
    gc.collect()
    return measured


def gaps(models: dict) -> dict:
    """Per text: the teacher's edge over the untouched student in BPB and as a ratio."""
    student, teacher = models["untouched"], models["teacher"]
    return {name: {"bpb_gap": student[name]["bpb"] - teacher[name]["bpb"],
                   "teacher_over_student": teacher[name]["bpb"] / student[name]["bpb"]} for name in teacher}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated trained protocol students to measure on the unseen text")
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else []
    missing = [m for m in methods if not (RUNS_DIR / m / "student").is_dir()]
    if missing:
        raise SystemExit(f"no trained student for {', '.join(missing)} under {RUNS_DIR}; train it with "
                         f"`python bench/quality.py --methods {','.join(missing)} --force`")
    named_texts = texts()
    previous = json.loads(RESULTS.read_text())["models"] if RESULTS.exists() else {}
    models = {name: measure(spec, role, named_texts, with_confidence=True)
              for name, (spec, role) in REFERENCE_MODELS.items()}
    students = dict(previous.get("trained_students", {}))
    for method in methods:
        students[method] = measure(str(RUNS_DIR / method / "student"), "student",
                                   {name: named_texts[name] for name in ("heldout", "unseen")}, with_confidence=False)
    result = {
        "texts": {name: {"chars": len(text), "bytes": len(text.encode()),
                         "sha256": hashlib.sha256(text.encode()).hexdigest()} for name, text in named_texts.items()}
        | {"sources": {"heldout": "the protocol's held-out text", "train": f"stdlib {TRAIN_FILE} (a training file)",
                       "unseen": f"git show {UNSEEN_COMMIT[:12]}:{UNSEEN_FOLDER}/*.py (crosskd, 2026-12-02)"}},
        "models": models | {"trained_students": students},
        "gaps": gaps(models),
        "command": "python bench/teacher_edge.py" + (f" --methods {args.methods}" if args.methods else ""),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
