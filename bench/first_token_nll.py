"""Acceptance measurement of the first-token strategy on the reference pair (docs/VOCAB.md).

At aligned pairs on held-out stdlib text: the NLL of the true next student token under the first-token mapped teacher
target (top-k 256 + tail atom; the tail is spread uniformly over the student ids off the support) against the
untouched student's own NLL, over the pairs KD uses (mismatch_policy 'exclude') and over the excluded pairs, where the
chain-rule teacher probability is measured too.

    python bench/first_token_nll.py            # writes bench/results/first_token_nll.json
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from crosskd.data.alignment import align
from crosskd.data.encoding import EncodedText, encode_with_byte_spans
from crosskd.data.stdlib import heldout_text
from crosskd.losses.target import MappedTarget, teacher_topk
from crosskd.models.loading import load_model
from crosskd.vocab.first_token import (
    first_token_kd_pairs,
    load_or_build_first_token_map,
    load_or_build_student_groups,
    push_topk_through_map,
)

# Model specs (crosskd.models.loading): the reference pair from `crosskd setup-models` unless overridden.
STUDENT = os.environ.get("CROSSKD_STUDENT", "reference:student")
TEACHER = os.environ.get("CROSSKD_TEACHER", "reference:teacher")
RESULTS = Path(__file__).parent / "results"
TOP_K = 256
WINDOW_CHARS = 1000  # about 256 student tokens of Python source


@dataclass
class Pair:
    """Models, tokenizers and the teacher's vocabulary facts of the reference pair."""

    student_tokenizer: object
    teacher_tokenizer: object
    student: torch.nn.Module
    teacher: torch.nn.Module
    teacher_valid_mask: torch.Tensor


@dataclass
class WindowPass:
    """One text window through both models, with its aligned pairs."""

    student: EncodedText
    teacher: EncodedText
    student_pos: torch.Tensor
    teacher_pos: torch.Tensor
    student_next_bytes: torch.Tensor
    teacher_next_bytes: torch.Tensor
    student_logits: torch.Tensor  # [n_student, V_s]
    teacher_logits: torch.Tensor  # [n_teacher, V_t]
    student_hidden: torch.Tensor  # [n_student, D_s] final (normed) hidden state
    teacher_hidden: torch.Tensor  # [n_teacher, D_t]


def load_reference_pair() -> Pair:
    student = load_model(STUDENT, "student")
    teacher = load_model(TEACHER, "teacher")
    return Pair(student.tokenizer, teacher.tokenizer, student.model.eval(), teacher.model.eval(),
                teacher.vocab.valid_mask)


def text_windows(text: str, count: int, window_chars: int = WINDOW_CHARS) -> list[str]:
    """`count` consecutive windows of about `window_chars` characters, cut after a newline."""
    windows, start = [], 0
    while len(windows) < count and start < len(text):
        end = text.find("\n", start + window_chars)
        end = len(text) if end < 0 else end + 1
        windows.append(text[start:end])
        start = end
    return windows


@torch.no_grad()
def run_window(pair: Pair, text: str) -> WindowPass:
    student = encode_with_byte_spans(pair.student_tokenizer, text)
    teacher = encode_with_byte_spans(pair.teacher_tokenizer, text)
    pairs = align(student, teacher)
    student_out = pair.student(torch.from_numpy(student.ids)[None], output_hidden_states=True)
    teacher_out = pair.teacher(torch.from_numpy(teacher.ids)[None], output_hidden_states=True)
    return WindowPass(
        student, teacher,
        *(torch.from_numpy(a) for a in (pairs.student_pos, pairs.teacher_pos, pairs.student_next_bytes,
                                        pairs.teacher_next_bytes)),
        student_out.logits[0].float(), teacher_out.logits[0].float(),
        student_out.hidden_states[-1][0].float(), teacher_out.hidden_states[-1][0].float(),
    )


def nll_under_mapped_target(target: MappedTarget, true_ids: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """-log q(true id): its merged support probability, or the tail spread uniformly over the off-support ids."""
    on_support = (target.ids == true_ids[:, None]) & target.mask
    support_logp = target.logp.masked_fill(~on_support, -math.inf).logsumexp(-1)
    off_support_ids = student_vocab - target.mask.sum(-1)
    tail_share = target.tail_logmass - off_support_ids.double().log()
    return -torch.where(on_support.any(-1), support_logp, tail_share)


def chain_rule_nll(window: WindowPass, teacher_logp_of_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair: -Σ log p_teacher of the teacher tokens j+1..j+m that exactly cover the next student token, and
    whether such an m exists (the student token ends on a teacher boundary)."""
    student_end = torch.from_numpy(window.student.byte_ends)[window.student_pos + 1]
    teacher_ends = torch.from_numpy(window.teacher.byte_ends)
    last = torch.searchsorted(teacher_ends, student_end)  # teacher token ending at or after the student token
    ends_on_boundary = (last < len(teacher_ends)) & (teacher_ends[last.clamp_max(len(teacher_ends) - 1)] == student_end)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), teacher_logp_of_next.double().cumsum(0)])
    # teacher_logp_of_next[j] = log p(token j+1 | ..j); tokens j+1..last are predicted at positions j..last-1.
    last = last.clamp(max=len(teacher_logp_of_next))
    nll = -(cumulative[last] - cumulative[window.teacher_pos])
    return nll, ends_on_boundary


def measure(pair: Pair, windows: list[str]) -> dict:
    token_map = load_or_build_first_token_map(pair.student_tokenizer, pair.teacher_tokenizer, pair.teacher_valid_mask,
                                              pair.student.config.vocab_size)
    student_vocab = pair.student.config.vocab_size
    groups = load_or_build_student_groups(pair.student_tokenizer, pair.teacher_tokenizer, student_vocab)
    teacher_to_root = groups.root_of(token_map.teacher_to_student)
    parts = {name: [] for name in ("student", "mapped", "kept", "chain", "on_boundary", "student_group", "merged")}
    for text in windows:
        window = run_window(pair, text)
        true_ids = torch.from_numpy(window.student.ids)[window.student_pos + 1]
        student_logp = window.student_logits[window.student_pos].log_softmax(-1)
        parts["student"].append(-student_logp.gather(-1, true_ids[:, None]).squeeze(-1).double())
        topk = teacher_topk(window.teacher_logits[window.teacher_pos], TOP_K, pair.teacher_valid_mask)
        target = push_topk_through_map(topk, token_map.teacher_to_student)
        parts["mapped"].append(nll_under_mapped_target(target, true_ids, student_vocab))
        parts["kept"].append(first_token_kd_pairs(window.student_next_bytes, window.teacher_next_bytes))
        # mismatch_policy 'merge': the event 'the next student token is in the true token's group', every pair.
        true_roots = groups.root_of(true_ids)
        member_mass = groups.member_mass_at(student_logp, true_roots[:, None]).squeeze(-1)
        parts["student_group"].append(-torch.logaddexp(student_logp.gather(-1, true_roots[:, None]).squeeze(-1),
                                                       member_mass.log()).double())
        merged_target = push_topk_through_map(topk, teacher_to_root)
        parts["merged"].append(nll_under_mapped_target(merged_target, true_roots, student_vocab - len(groups.members)))
        teacher_ids = torch.from_numpy(window.teacher.ids)
        teacher_logp = window.teacher_logits[:-1].masked_fill(~pair.teacher_valid_mask, -math.inf).log_softmax(-1)
        chain, on_boundary = chain_rule_nll(window, teacher_logp.gather(-1, teacher_ids[1:, None]).squeeze(-1))
        parts["chain"].append(chain)
        parts["on_boundary"].append(on_boundary)
    student, mapped, kept, chain, on_boundary, student_group, merged = (torch.cat(parts[name]) for name in parts)
    excluded = ~kept
    chained = excluded & on_boundary
    return {
        "aligned_pairs": int(kept.numel()),
        "kd_pairs": int(kept.sum()),
        "kd_share_of_aligned_pairs": float(kept.double().mean()),
        "kd_pairs_mapped_teacher_nll": float(mapped[kept].mean()),
        "kd_pairs_student_nll": float(student[kept].mean()),
        "kd_pairs_nll_gain": float(student[kept].mean() - mapped[kept].mean()),
        "all_pairs_mapped_teacher_nll": float(mapped.mean()),
        "all_pairs_student_nll": float(student.mean()),
        "excluded_pairs": int(excluded.sum()),
        "excluded_pairs_mapped_teacher_nll": float(mapped[excluded].mean()) if excluded.any() else None,
        "excluded_pairs_student_nll": float(student[excluded].mean()) if excluded.any() else None,
        "excluded_pairs_ending_on_teacher_boundary": int(chained.sum()),
        "chain_rule_teacher_nll_on_those": float(chain[chained].mean()) if chained.any() else None,
        "student_nll_on_those": float(student[chained].mean()) if chained.any() else None,
        "merge_policy": {
            "what": "every aligned pair; NLL of the true token's group (mismatch_policy 'merge')",
            "kd_pairs": int(kept.numel()),
            "merged_teacher_group_nll": float(merged.mean()),
            "student_group_nll": float(student_group.mean()),
            "nll_gain": float(student_group.mean() - merged.mean()),
            "student_groups": len(groups.members),
        },
    }


def main(argv: list[str]) -> None:
    window_count = int(argv[0]) if argv else 8
    started = time.perf_counter()
    pair = load_reference_pair()
    windows = text_windows(heldout_text(), window_count)
    result = {
        "command": "python bench/first_token_nll.py " + " ".join(argv),
        "text": f"crosskd.data.stdlib.heldout_text(), first {window_count} windows of ~{WINDOW_CHARS} chars",
        "top_k": TOP_K,
        "mismatch_policy": "exclude (and merge: see merge_policy)",
        **measure(pair, windows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first_token_nll.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
