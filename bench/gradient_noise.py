"""Which noise does the soft target remove? (issue 15)

On the protocol, twice the windows per step at the same 60 steps (bench/quality.py method `lm-only-batch8`) gains
almost as much as twice the steps: the budget is limited by what a step's gradient knows, so a target that says more
per position could pay. A step's LM gradient is noisy for two reasons: which contexts the batch holds, and which
next token the text happened to write at each of them. The teacher's distribution replaces the second (the label)
and leaves the first. This measures, on the untouched student and BATCHES protocol batches of 4 windows spread
evenly over the protocol's 60 steps (its first batches come from character-map tables, `encodings/*.py`, where
the teacher's target and the text agree almost exactly), in float64 sums over the 135M parameters:

- `between_batches`: the mean cosine between two batches' gradients, for the LM term and for the KD term (the
  default's target: the teacher's top-256 through the first-token map, merge); a term with less noise has
  batches that agree more;
- `same_batch`: the cosine between a batch's LM and KD gradients (they differ by the label noise and by the teacher's
  disagreement with the text);
- `energy`: squared norms, per batch on average: each term's deviation from its own mean over the batches (the noise
  a larger batch averages away), the LM-KD difference at the same batch, and each mean's own squared norm;
- `noise_to_signal`: from the energies, each term's unbiased ratio of between-batch variance to the expected
  gradient's squared norm (twice the windows per batch would halve it);
- `paired_batches`: the same between-batch cosine for the LM gradient of 8 windows (two batches averaged): what
  doubling the batch does to the agreement, for comparison with what the soft target does.

    python bench/gradient_noise.py     # ~5 min on 2 cores; writes bench/results/gradient_noise.json
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_diagnosis import STEPS, WINDOW, cosine, term_gradients, topk_teacher  # noqa: E402  (sibling scripts)
from quality import REPO, protocol_config  # noqa: E402

from crosskd.data.collate import collate_windows
from crosskd.data.windows import protocol_train_windows
from crosskd.models.loading import load_model
from crosskd.vocab.first_token import (
    load_or_build_first_token_map,
    load_or_build_student_groups,
    push_topk_through_map,
)

OUTPUT = REPO / "bench" / "results" / "gradient_noise.json"
BATCHES = 6
BATCH_WINDOWS = 4


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> float:
    pairs = list(itertools.combinations(vectors, 2))
    return sum(cosine(a, b) for a, b in pairs) / len(pairs)


def noise_energy(vectors: list[torch.Tensor]) -> tuple[float, float]:
    """(mean squared distance of the vectors from their mean, squared norm of the mean)."""
    mean = sum(v.double() for v in vectors) / len(vectors)
    return (sum(float((v.double() - mean).square().sum()) for v in vectors) / len(vectors),
            float(mean.square().sum()))


def noise_to_signal(energy: dict, batches: int) -> dict:
    """Per term, the unbiased noise-to-signal ratio of one batch's gradient: the variance between batches
    (deviation * n / (n - 1)) over the squared norm of the expected gradient (the mean's squared norm less the
    variance / n that the mean of n batches still carries). A batch of twice the windows halves it."""
    ratios = {}
    for term in ("lm", "kd"):
        variance = energy[f"{term}_deviation_from_its_mean"] * batches / (batches - 1)
        ratios[term] = variance / (energy[f"{term}_mean_squared_norm"] - variance / batches)
    return ratios


def main() -> int:
    started = time.perf_counter()
    config = protocol_config("first-token", STEPS)
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    student = load_model(config.models.student, "student")
    model, tokenizer = student.model.eval(), student.tokenizer
    vocab = student.vocab.logit_size
    token_map = load_or_build_first_token_map(tokenizer, teacher.tokenizer, teacher.vocab.valid_mask, vocab)
    groups = load_or_build_student_groups(tokenizer, teacher.tokenizer, vocab)
    teacher_to_root = groups.root_of(token_map.teacher_to_student)
    windows = protocol_train_windows(tokenizer, teacher.tokenizer, count=STEPS * BATCH_WINDOWS, window_tokens=WINDOW)
    steps = [round(index * STEPS / BATCHES) for index in range(BATCHES)]
    online = topk_teacher(teacher)
    lm, kd, same_batch = [], [], []
    for step in steps:
        batch = collate_windows(windows[step * BATCH_WINDOWS:(step + 1) * BATCH_WINDOWS], teacher.vocab.pad_id)
        mapped = push_topk_through_map(online.signal(batch).topk, teacher_to_root)
        grads = term_gradients(model, batch, mapped, groups)
        lm.append(grads.lm)
        kd.append(grads.kd)
        same_batch.append(cosine(grads.lm, grads.kd))
        print(f"step {step}: LM {grads.lm_loss:.3f}, KD {grads.kd_loss:.3f}, cosine {same_batch[-1]:.3f}",
              flush=True)
    lm_noise, lm_signal = noise_energy(lm)
    kd_noise, kd_signal = noise_energy(kd)
    paired = [(a + b) / 2 for a, b in zip(lm[0::2], lm[1::2])]
    result = {
        "student": "untouched", "protocol_steps": steps, "windows_per_batch": BATCH_WINDOWS,
        "between_batches": {"lm": mean_pairwise_cosine(lm), "kd": mean_pairwise_cosine(kd)},
        "paired_batches": {"lm": mean_pairwise_cosine(paired), "windows_per_pair": 2 * BATCH_WINDOWS},
        "same_batch": {"lm_kd_cosine_mean": sum(same_batch) / BATCHES, "per_batch": same_batch},
        "energy": {
            "lm_deviation_from_its_mean": lm_noise, "kd_deviation_from_its_mean": kd_noise,
            "lm_minus_kd_same_batch": sum(float((a.double() - b.double()).square().sum())
                                          for a, b in zip(lm, kd)) / BATCHES,
            "lm_mean_squared_norm": lm_signal, "kd_mean_squared_norm": kd_signal,
        },
    }
    result["noise_to_signal"] = noise_to_signal(result["energy"], BATCHES)
    result |= {
        "seconds": round(time.perf_counter() - started, 1),
        "command": "python bench/gradient_noise.py",
    }
    OUTPUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
