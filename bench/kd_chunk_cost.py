"""What the KD term adds to the fused LM chunk loop: forward + backward of `fused_chunked_losses` on synthetic tensors of
the reference shapes, LM-only against LM + KD (plain support, and `merge`'s grouped support), no models loaded.

512 rows of hidden size 576 and an output embedding [49152, 576] (SmolLM2-135M), 410 of them KD rows (the reference
step's 1024 and ~820, halved to keep a run short; each chunk costs the same), chunks of 256 rows; each KD row's support is 256 distinct student ids drawn like a teacher top-k pushed through the map (the
top-256 of the student's own logits plus noise, a fifth of the slots masked as merged duplicates), and the grouped
mode pools ~3,000 synthetic members into ~600 roots like `build_group_roots` does on the reference pair. Each mode is
timed `--repeats` times after one warm-up, the modes interleaved; the median is reported, of the process's CPU time
(with one thread, nearly independent of what else the machine runs) and of the wall time. One torch thread by default
(`--threads`): on a 2-core machine shared with another benchmark, two threads per process stall on each other. The figures go under `--label` in
bench/results/kd_chunk_cost.json, so a before and an after run of the same script sit side by side.

    python bench/kd_chunk_cost.py --label after     # ~40 s of one core
    python bench/kd_chunk_cost.py --label recomputed --kept-logits-mib 0    # every chunk recomputed in the backward
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from crosskd.config import ObjectiveConfig
from crosskd.losses.divergences import forward_kl
from crosskd.losses.lm import divergence_kd_loss, fused_chunked_losses
from crosskd.losses.target import MappedTarget, StudentGroups

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "kd_chunk_cost.json"
ROWS, HIDDEN, VOCAB, KD_ROWS, SUPPORT, CHUNK = 512, 576, 49152, 410, 256, 256
MEMBERS, ROOTS = 3000, 600


def synthetic_groups(generator: torch.Generator) -> StudentGroups:
    ids = torch.randperm(VOCAB, generator=generator)
    roots, members = ids[:ROOTS], ids[ROOTS:ROOTS + MEMBERS]
    root_table = torch.arange(VOCAB)
    root_table[members] = roots[torch.randint(ROOTS, (MEMBERS,), generator=generator)]
    return StudentGroups.from_root_table(root_table)


def synthetic_target(logits: torch.Tensor, generator: torch.Generator, groups: StudentGroups | None) -> MappedTarget:
    """A support like the teacher's mapped top-k: mostly the student's likely tokens, never a group member."""
    noisy = logits + 2.0 * torch.randn(logits.shape, generator=generator)
    if groups is not None:
        noisy[:, groups.members] = -torch.inf
    ids = noisy.topk(SUPPORT, dim=-1).indices
    mask = torch.rand(ids.shape, generator=generator) > 0.2
    teacher_logp = torch.randn(ids.shape, generator=generator).log_softmax(-1) - 0.05
    tail = torch.log1p(-torch.exp(torch.logsumexp(teacher_logp.masked_fill(~mask, -torch.inf), -1)))
    return MappedTarget(ids, teacher_logp, mask, tail)


def setup(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator)
    weight = 0.05 * torch.randn(VOCAB, HIDDEN, generator=generator)
    # A peaked student: a few likely tokens per row, as a trained LM's.
    weight[:2000] *= 4
    lm_targets = torch.randint(VOCAB, (ROWS,), generator=generator)
    kd_rows = torch.randperm(ROWS, generator=generator)[:KD_ROWS]
    with torch.no_grad():
        kd_logits = hidden[kd_rows] @ weight.T
    groups = synthetic_groups(generator)
    return dict(hidden=hidden, weight=weight, lm_targets=lm_targets, kd_rows=kd_rows,
                plain=synthetic_target(kd_logits, generator, None), merge=synthetic_target(kd_logits, generator, groups),
                groups=groups)


def step(data: dict, mode: str, kept_logit_bytes: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one forward + backward."""
    hidden = data["hidden"].clone().requires_grad_()
    weight = data["weight"].clone().requires_grad_()
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "lm_only":
        sums = fused_chunked_losses(hidden, weight, data["lm_targets"], data["kd_rows"][:0], None, None, CHUNK,
                                    kept_logit_bytes=kept_logit_bytes)
        loss = sums.lm_sum
    else:
        groups = data["groups"] if mode == "lm_kd_merge" else None
        target = data["merge"] if groups is not None else data["plain"]
        sums = fused_chunked_losses(hidden, weight, data["lm_targets"], data["kd_rows"], target,
                                    divergence_kd_loss(forward_kl, 1.0, groups), CHUNK,
                                    kept_logit_bytes=kept_logit_bytes)
        loss = sums.lm_sum + sums.kd_sum
    loss.backward()
    return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="key of this run in the results file (e.g. before, after)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="")
    parser.add_argument("--kept-logits-mib", type=int, default=ObjectiveConfig.kept_logits_mib,
                        help="objective.kept_logits_mib: chunks kept for the backward (0: all recomputed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = setup()
    load_before = [round(v, 2) for v in os.getloadavg()]
    modes = ("lm_only", "lm_kd_plain", "lm_kd_merge")
    wall: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    kept_logit_bytes = args.kept_logits_mib * 2**20
    for mode in modes:
        step(data, mode, kept_logit_bytes)  # warm-up
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every mode alike
        for mode in modes:
            seconds, cpu_seconds = step(data, mode, kept_logit_bytes)
            wall[mode].append(seconds)
            cpu[mode].append(cpu_seconds)
    run = {"threads": torch.get_num_threads(), "kept_logits_mib": args.kept_logits_mib}
    # With one thread the process's CPU time barely depends on what else the machine runs: the trustworthy figure on a
    # shared machine. Wall time is reported beside it.
    for clock, times in (("cpu", cpu), ("wall", wall)):
        median = {mode: statistics.median(values) for mode, values in times.items()}
        run[clock] = {
            "median_s": {mode: round(value, 4) for mode, value in median.items()},
            "seconds": {mode: [round(v, 4) for v in values] for mode, values in times.items()},
            "ratio_over_lm_only": {mode: round(median[mode] / median["lm_only"], 4) for mode in modes[1:]},
            "kd_extra_s": {mode: round(median[mode] - median["lm_only"], 4) for mode in modes[1:]},
        }
    run.update({
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "note": args.note,
    })
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.setdefault("shapes", dict(rows=ROWS, hidden=HIDDEN, vocab=VOCAB, kd_rows=KD_ROWS, support=SUPPORT,
                                      chunk=CHUNK, group_members=MEMBERS, group_roots=ROOTS))
    results[args.label] = run
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
