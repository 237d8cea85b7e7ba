"""Peak memory and time of the KD objective per strategy, at the reference pair's shapes (4 x 256 positions).

Random inputs with the real shapes and the real first-token map. Each case runs in a fresh process; memory is the
peak RSS of that process (getrusage ru_maxrss) minus its RSS once the shared inputs exist (psutil), so it counts
what the objective itself allocates, forward and backward (gradient w.r.t. the student's final hidden states).
Time is one forward + backward after one warm-up run.

    python bench/objective_memory.py            # writes bench/results/objective_memory.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from crosskd.data.collate import IGNORE_INDEX
from crosskd.losses.lm import chunked_lm_and_kd
from crosskd.losses.target import teacher_topk
from crosskd.vocab.first_token import load_or_build_first_token_map, push_topk_through_map
from crosskd.vocab.projector import LogitProjector, anchor_loss, projected_target
from crosskd.vocab.uld import chunked_lm_and_uld

POSITIONS, TOP_K = 4 * 256, 256
STUDENT_VOCAB, STUDENT_DIM, TEACHER_VOCAB, TEACHER_DIM, TEACHER_PADDED = 49152, 576, 151936, 896, 271
CASES = ("first-token", "projector", "uld", "naive-first-token-full-vocab", "naive-dense-projector")
RESULTS = Path(__file__).parent / "results"


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(TEACHER_VOCAB, dtype=torch.bool)
    valid[-TEACHER_PADDED:] = False
    return {
        "student_hidden": torch.randn(POSITIONS, STUDENT_DIM, generator=g).requires_grad_(True),
        # In-place scaling: a temporary copy of the 600 MB teacher logits would raise the process's lifetime peak.
        "student_embedding": torch.randn(STUDENT_VOCAB, STUDENT_DIM, generator=g).mul_(0.05),
        "teacher_logits": torch.randn(POSITIONS, TEACHER_VOCAB, generator=g).mul_(3),  # the teacher forward's output
        "teacher_hidden": torch.randn(POSITIONS, TEACHER_DIM, generator=g).mul_(5),
        "teacher_embedding": torch.randn(TEACHER_VOCAB, TEACHER_DIM, generator=g).mul_(0.05),
        "targets": torch.randint(0, STUDENT_VOCAB, (POSITIONS,), generator=g),
        "valid": valid,
        "rows": torch.arange(POSITIONS),
    }


def reference_first_token_map(valid: torch.Tensor) -> torch.Tensor:
    from crosskd.models.loading import load_tokenizer

    # Model specs (crosskd.models.loading): the reference pair from `crosskd setup-models` unless overridden.
    student = load_tokenizer(os.environ.get("CROSSKD_STUDENT", "reference:student"), "student")
    teacher = load_tokenizer(os.environ.get("CROSSKD_TEACHER", "reference:teacher"), "teacher")
    return load_or_build_first_token_map(student, teacher, valid, STUDENT_VOCAB).teacher_to_student


def objective(case: str, x: dict, token_map: torch.Tensor, projector: LogitProjector) -> torch.Tensor:
    """The KD part of the objective (plus the anchor for the projector) as one scalar to differentiate."""
    hidden, embedding, rows = x["student_hidden"], x["student_embedding"], x["rows"]
    no_lm = torch.full_like(x["targets"], IGNORE_INDEX)
    if case == "first-token":
        target = push_topk_through_map(teacher_topk(x["teacher_logits"], TOP_K, x["valid"]), token_map)
        return chunked_lm_and_kd(hidden, embedding, no_lm, rows, target, 1.0, "forward_kl").kd_sum
    if case == "projector":
        # The default residual projector reads the student's (detached) final state next to the teacher's.
        target = projected_target(projector, x["teacher_hidden"], embedding, TOP_K, student_hidden=hidden)
        kd = chunked_lm_and_kd(hidden, embedding, no_lm, rows, target, 1.0, "forward_kl").kd_sum
        return kd + anchor_loss(projector, x["teacher_hidden"], embedding, x["targets"], student_hidden=hidden)[0]
    if case == "uld":
        return chunked_lm_and_uld(hidden, embedding, no_lm, rows, teacher_topk(x["teacher_logits"], TOP_K, x["valid"]),
                                  1.0).kd_sum
    student_logp = (hidden @ embedding.T).log_softmax(-1)
    if case == "naive-first-token-full-vocab":
        teacher_p = x["teacher_logits"].masked_fill(~x["valid"], float("-inf")).softmax(-1)
        mapped = torch.zeros(POSITIONS, STUDENT_VOCAB).index_add_(1, token_map.clamp_min(0),
                                                                  teacher_p * (token_map >= 0))
        return (mapped * (mapped.clamp_min(1e-30).log() - student_logp)).sum()
    if case == "naive-dense-projector":  # dense baseline: full teacher probabilities times the embedding matrix
        teacher_p = x["teacher_logits"].masked_fill(~x["valid"], float("-inf")).softmax(-1)
        target_logp = (projector(teacher_p @ x["teacher_embedding"]) @ embedding.T).log_softmax(-1)
        return (target_logp.exp() * (target_logp - student_logp)).sum()
    raise ValueError(case)


def run_case(case: str) -> dict:
    torch.set_num_threads(1)  # the CPU is shared; one thread keeps timings comparable between cases
    x = inputs()
    token_map = reference_first_token_map(x["valid"])
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM, residual=case == "projector")  # dense: a plain map
    objective(case, x, token_map, projector).backward()  # warm-up
    x["student_hidden"].grad = None
    baseline = psutil.Process().memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    objective(case, x, token_map, projector).backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The warm-up may already have set the lifetime peak; then the measured run reached at most that.
    return {"case": case, "seconds": round(seconds, 2), "peak_rss_delta_mb": round((max(peak, peak_before) - baseline)
                                                                                   / 2**20)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2])))
        return
    results = []
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    report = {
        "command": "python bench/objective_memory.py",
        "shapes": {"positions": POSITIONS, "top_k": TOP_K, "student_vocab": STUDENT_VOCAB, "student_dim": STUDENT_DIM,
                   "teacher_logits": TEACHER_VOCAB, "teacher_dim": TEACHER_DIM},
        "memory": "peak RSS (getrusage ru_maxrss, fresh process per case) minus RSS after inputs and a warm-up run",
        "time": "one forward + backward, 1 thread, after a warm-up run",
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "objective_memory.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
