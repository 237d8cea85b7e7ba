"""Why does first-token KD teach so little? Where KD gains and loses against LM-only, how good its target is, whether
its pairing is conditioned on the right token, and how its gradient compares with the LM term's.

    python bench/kd_diagnosis.py                 # trains the protocol students it lacks, then measures
    python bench/kd_diagnosis.py --no-train      # measure only (the students must exist)

Students (runs/kd-diagnosis/<method>/student, trained with bench/quality.py's protocol overrides, teacher from the
protocol cache): `lm-only`, `first-token-cached` (the default: merge target + LM) and `first-token-kd-only-merge` (the
same target, no LM term, no KD warm-up), plus the untouched student. Their final BPB is checked against
bench/results/quality/ where a result file exists (the protocol is deterministic on CPU).

Measured on every student position of the protocol's held-out text in 256-token windows (the training windows' size):
1. per position kind and next-token class, each student's share of bits per byte (the parts add up to the BPB of these
   windows): where the KD student's gain over LM-only comes from and where it loses;
2. the mapped target (merge) as a predictor at aligned pairs: bits per byte it spends on the true next token's group,
   against the untouched student's; the share of positions and bytes with a target; the tail atom's mass;
3. conditioning: how often the target's top-1 is the true next token's group, with the pairing as trained and shifted
   by one teacher position each way (a correct pairing is a sharp maximum), and how often the teacher's own observed
   next token maps to the student's observed next token's group (the map's consistency with the text);
4. forward KL from the target to each student at the aligned pairs: how far KD moved the student toward the teacher;
5. balance: norms of the LM and KD gradients on the student's parameters and their cosine, for the untouched and the
   trained default student, on the first and the last protocol training batch.
Writes bench/results/kd_diagnosis.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from first_token_nll import nll_under_mapped_target  # noqa: E402  (sibling scripts)
from quality import BASE_CONFIG, REPO, RESULTS_DIR, method_overrides, protocol_config  # noqa: E402

from crosskd.data.collate import collate_windows
from crosskd.data.corpus import TrainingCorpus
from crosskd.data.encoding import token_bytes_table
from crosskd.data.sources import Document
from crosskd.data.windows import dual_windows, protocol_train_windows
from crosskd.losses.divergences import get_divergence
from crosskd.losses.lm import chunked_lm_and_kd
from crosskd.losses.target import support_atoms
from crosskd.models.loading import load_model
from crosskd.teacher.online import OnlineTeacher, TeacherNeeds
from crosskd.vocab.first_token import (
    load_or_build_first_token_map,
    load_or_build_student_groups,
    push_topk_through_map,
)

RUN_ROOT = REPO / "runs" / "kd-diagnosis"
OUTPUT = REPO / "bench" / "results" / "kd_diagnosis.json"
STUDENTS = ("lm-only", "first-token-cached", "first-token-kd-only-merge")
DEFAULT, KD_ONLY, LM_ONLY, UNTOUCHED = "first-token-cached", "first-token-kd-only-merge", "lm-only", "untouched"
STEPS = 60
TOP_K = 256
CHUNK = 256
WINDOW = 256
LN2 = math.log(2)


# --- students ---------------------------------------------------------------------------------------------------------
def student_dir(method: str) -> Path:
    return RUN_ROOT / method / "student"


def train_missing_students() -> dict[str, float]:
    """Train each protocol student that has no exported folder yet; returns each one's final held-out BPB."""
    finals = {}
    for method in STUDENTS:
        config = protocol_config(method, STEPS, run_root=RUN_ROOT)
        overrides = [*method_overrides(method, STEPS), f"output.run_dir={RUN_ROOT / method}"]
        if not student_dir(method).is_dir():
            if config.teacher.source == "cache":
                subprocess.run([sys.executable, "-m", "crosskd.cli", "cache-teacher", str(BASE_CONFIG), *overrides],
                               check=True, cwd=REPO)
            subprocess.run(["rm", "-rf", str(RUN_ROOT / method)], check=True)
            subprocess.run([sys.executable, "-m", "crosskd.cli", "train", str(BASE_CONFIG), *overrides], check=True,
                           cwd=REPO)
        records = [json.loads(line) for line in (RUN_ROOT / method / "log.jsonl").read_text().splitlines()]
        finals[method] = next(r["bpb"] for r in reversed(records) if r["kind"] == "eval")
    return finals


def reproduction_check(finals: dict[str, float]) -> dict:
    """Each student's final BPB against the protocol result file of the same method, where one exists."""
    check = {}
    for method, bpb in finals.items():
        path = RESULTS_DIR / f"{method}.json"
        recorded = json.loads(path.read_text())["bpb_final"] if path.exists() else None
        check[method] = {"bpb": bpb, "result_file_bpb": recorded,
                         "equal": None if recorded is None else abs(recorded - bpb) <= 1e-6 * recorded}
    return check


# --- per-position facts of the held-out windows -----------------------------------------------------------------------
def token_class(token: bytes | None) -> str:
    if token is None or not token:
        return "separator"
    if token == b"\n":
        return "lone newline"
    if token.startswith(b"\n") and token.strip() == b"" and len(token) > 1:
        return "newline + whitespace"
    if token.strip() == b"":
        return "whitespace"
    return "other"


def position_kinds(batch, student_bytes: list) -> tuple[list[list[str]], list[list[str]], list[list[int]]]:
    """For every student position i < N-1 of each row: its alignment kind, its next token's class and byte length.

    aligned-same: the next student and teacher tokens are the same bytes; aligned-shorter: the next student token is
    the first of several inside one teacher token; aligned-run-past: it runs past the teacher's next token (merge
    pools it); inside-teacher-token: the next student token starts inside a teacher token (no target at all).
    """
    rows, n = batch.student_input_ids.shape
    kinds = [["inside-teacher-token"] * (n - 1) for _ in range(rows)]
    for b, i, s_bytes, t_bytes in zip(batch.pair_batch.tolist(), batch.pair_student_pos.tolist(),
                                      batch.pair_student_next_bytes.tolist(), batch.pair_teacher_next_bytes.tolist()):
        if i < n - 1:
            kinds[b][i] = ("aligned-same" if s_bytes == t_bytes else
                           "aligned-shorter" if s_bytes < t_bytes else "aligned-run-past")
    ids = batch.student_input_ids.tolist()
    classes = [[token_class(student_bytes[t]) for t in row[1:]] for row in ids]
    lengths = [[len(student_bytes[t] or b"") for t in row[1:]] for row in ids]
    return kinds, classes, lengths


@torch.no_grad()
def next_token_nll(model, batch, groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, N-1] NLL (nats) of the true next token, of its group (merge's event), and the group-pooled top-1 hit."""
    logits = model(input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    true = batch.student_input_ids[:, 1:]
    nll = -logp.gather(-1, true[..., None]).squeeze(-1)
    pooled = logp.exp().flatten(0, 1)
    pooled = torch.zeros_like(pooled).index_add_(1, groups.root_table, pooled)
    true_roots = groups.root_of(true).flatten()
    group_nll = -pooled.gather(-1, true_roots[:, None]).squeeze(-1).clamp_min(1e-30).log().view_as(nll)
    top1 = (pooled.argmax(-1) == true_roots).view_as(nll)
    return nll, group_nll, top1


def shifted(batch, offset: int):
    """The batch with every pair's teacher position moved by `offset` (pairs that would leave the row are dropped)."""
    lengths = batch.teacher_attention_mask.sum(-1)[batch.pair_batch]
    moved = batch.pair_teacher_pos + offset
    keep = (moved >= 0) & (moved < lengths - 1)
    return dataclasses.replace(batch, **{name: getattr(batch, name)[keep] for name in
                                        ("pair_batch", "pair_student_pos", "pair_student_next_bytes",
                                         "pair_teacher_next_bytes")}, pair_teacher_pos=moved[keep])


def topk_teacher(teacher) -> OnlineTeacher:
    """The teacher's top-k at the aligned pairs, as the first-token transfer reads it."""
    return OnlineTeacher(teacher.model, teacher.vocab.valid_mask, TOP_K, CHUNK, TeacherNeeds(topk=True))


def quantiles(values: torch.Tensor, points=(0.1, 0.25, 0.5, 0.75, 0.9, 0.99)) -> dict[str, float]:
    values = values.double()
    return {f"q{int(p * 100)}": float(values.quantile(p)) for p in points} | {"mean": float(values.mean())}


def held_out(models: dict, teacher, corpus, student_tokenizer, teacher_to_root, groups, student_vocab) -> dict:
    student_bytes = token_bytes_table(student_tokenizer)
    online = topk_teacher(teacher)
    windows = list(dual_windows([Document("held-out", corpus.eval_text())], student_tokenizer, teacher.tokenizer,
                                WINDOW))
    bits = {name: defaultdict(float) for name in models}
    counts, byte_totals = defaultdict(int), defaultdict(int)
    target = defaultdict(list)
    conditioning = defaultdict(lambda: [0, 0])
    kl = defaultdict(float)
    forward_kl = get_divergence("forward_kl")
    for start in range(0, len(windows), 4):
        batch = collate_windows(windows[start : start + 4], teacher.vocab.pad_id)
        kinds, classes, lengths = position_kinds(batch, student_bytes)
        scored = {name: next_token_nll(model, batch, groups) for name, model in models.items()}
        for b in range(len(kinds)):
            for i, (kind, token, length) in enumerate(zip(kinds[b], classes[b], lengths[b])):
                counts[(kind, token)] += 1
                byte_totals[(kind, token)] += length
                for name in models:
                    bits[name][(kind, token)] += float(scored[name][0][b, i]) / LN2
        # The target at the aligned pairs (merge), as trained.
        signal = online.signal(batch)
        mapped = push_topk_through_map(signal.topk, teacher_to_root)
        pairs = (batch.pair_batch, batch.pair_student_pos)
        true_ids = batch.student_input_ids[batch.pair_batch, batch.pair_student_pos + 1]
        true_roots = groups.root_of(true_ids)
        target["target_group_nll"].append(nll_under_mapped_target(mapped, true_roots,
                                                                  student_vocab - len(groups.members)))
        target["next_bytes"].append(batch.pair_student_next_bytes.double())
        target["tail_mass"].append(mapped.tail_logmass.exp())
        target["teacher_tail_mass"].append(signal.topk.tail_logmass.exp())
        for name in models:
            target[f"{name}_group_nll"].append(scored[name][1][pairs].double())
            target[f"{name}_top1"].append(scored[name][2][pairs])
        # How far each student is from the target: forward KL on the atoms at tau 1 (merge pooling).
        for name, model in models.items():
            with torch.no_grad():
                logits = model(input_ids=batch.student_input_ids,
                               attention_mask=batch.student_attention_mask).logits.float()
            student_logp, teacher_logp = support_atoms(logits[pairs].log_softmax(-1), mapped, 1.0, groups,
                                                       normalized=True)
            kl[name] += float(forward_kl(student_logp, teacher_logp).double().sum())
        # Conditioning: the target's top-1 against the true next group, pairing as trained and shifted.
        for offset in (-1, 0, 1):
            moved = shifted(batch, offset)
            moved_target = push_topk_through_map(online.signal(moved).topk, teacher_to_root)
            best = moved_target.logp.masked_fill(~moved_target.mask, -math.inf).argmax(-1, keepdim=True)
            top1 = moved_target.ids.gather(-1, best).squeeze(-1)
            truth = groups.root_of(moved.student_input_ids[moved.pair_batch, moved.pair_student_pos + 1])
            conditioning[f"target_top1_is_true_group_offset_{offset:+d}"][0] += int((top1 == truth).sum())
            conditioning[f"target_top1_is_true_group_offset_{offset:+d}"][1] += len(truth)
        observed_teacher_next = batch.teacher_input_ids[batch.pair_batch, batch.pair_teacher_pos + 1]
        consistent = teacher_to_root.to(observed_teacher_next.device)[observed_teacher_next] == true_roots
        conditioning["observed_teacher_token_maps_to_true_group"][0] += int(consistent.sum())
        conditioning["observed_teacher_token_maps_to_true_group"][1] += len(consistent)
        target["inconsistent_examples"].extend(
            (bytes(student_bytes[int(s)] or b""), repr(teacher.tokenizer.convert_ids_to_tokens(int(t))))
            for s, t in zip(true_ids[~consistent][:8], observed_teacher_next[~consistent][:8]))
    return summarise_held_out(models, bits, counts, byte_totals, target, conditioning, kl)


def summarise_held_out(models, bits, counts, byte_totals, target, conditioning, kl) -> dict:
    total_bytes = sum(byte_totals.values())
    total_positions = sum(counts.values())
    table = []
    for key in sorted(counts, key=lambda k: -byte_totals[k]):
        row = {"kind": key[0], "next_token": key[1], "positions": counts[key], "bytes": byte_totals[key]}
        for name in models:
            row[f"bpb_share/{name}"] = bits[name][key] / total_bytes
            row[f"nats_per_token/{name}"] = bits[name][key] * LN2 / counts[key]
        table.append(row)
    bpb = {name: sum(bits[name].values()) / total_bytes for name in models}
    by_kind = defaultdict(lambda: defaultdict(float))
    for key in counts:
        for name in models:
            by_kind[key[0]][name] += bits[name][key] / total_bytes
    cat = {name: torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts for name, parts in target.items()}
    aligned_bytes = float(cat["next_bytes"].sum())
    predictor = {
        "aligned_pairs": int(len(cat["next_bytes"])),
        "share_of_student_positions_with_target": len(cat["next_bytes"]) / total_positions,
        "share_of_bytes_with_target": aligned_bytes / total_bytes,
        "target_bpb_on_true_group": float(cat["target_group_nll"].sum()) / LN2 / aligned_bytes,
        **{f"{name}_bpb_on_true_group": float(cat[f"{name}_group_nll"].sum()) / LN2 / aligned_bytes
           for name in models},
        **{f"{name}_top1_is_true_group": float(cat[f"{name}_top1"].double().mean()) for name in models},
        "tail_atom_mass": quantiles(cat["tail_mass"]),
        "teacher_topk_tail_mass": quantiles(cat["teacher_tail_mass"]),
    }
    return {
        "positions": total_positions,
        "bytes": total_bytes,
        "bpb_of_these_windows": bpb,
        "bpb_share_by_kind": {kind: dict(values) for kind, values in by_kind.items()},
        "table": table,
        "target_as_predictor": predictor,
        "conditioning": {name: {"hits": hits, "pairs": pairs, "rate": hits / max(pairs, 1)}
                         for name, (hits, pairs) in conditioning.items()},
        "inconsistent_examples": [list(map(str, pair)) for pair in cat["inconsistent_examples"][:24]],
        "forward_kl_target_to_student_nats": {name: value / predictor["aligned_pairs"] for name, value in kl.items()},
    }


# --- gradient balance -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TermGradients:
    lm_loss: float
    kd_loss: float
    lm: torch.Tensor  # the LM term's gradient on every trainable student parameter, flattened
    kd: torch.Tensor  # the KD term's


def term_gradients(model, batch, mapped, groups) -> TermGradients:
    """The LM and KD terms' gradients on the student's parameters for one batch, each normalised as in training (LM
    by its positions, KD by its pairs), the KD target being the teacher's top-k pushed through the map (`mapped`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = model(input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask,
                   output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    rows = batch.pair_batch * hidden.shape[1] + batch.pair_student_pos
    sums = chunked_lm_and_kd(hidden.reshape(-1, hidden.shape[-1]), model.get_output_embeddings().weight,
                             batch.student_targets.reshape(-1), rows, mapped, 1.0, "forward_kl",
                             chunk_size=CHUNK, student_groups=groups)
    lm_grad = torch.autograd.grad(sums.lm_sum / sums.lm_count, params, retain_graph=True, allow_unused=True)
    kd_grad = torch.autograd.grad(sums.kd_sum / sums.kd_count, params, allow_unused=True)
    flat_lm, flat_kd = (torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                   for g, p in zip(grads, params)]) for grads in (lm_grad, kd_grad))
    model.zero_grad(set_to_none=True)
    return TermGradients(float(sums.lm_sum.detach() / sums.lm_count), float(sums.kd_sum.detach() / sums.kd_count),
                         flat_lm, flat_kd)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """In float64: float32 sums over the student's 135M products drift by a few hundredths (a cosine read 1.002)."""
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def gradient_balance(models: dict, teacher, student_tokenizer, teacher_to_root, groups) -> dict:
    """Norms of the LM and KD gradients on the student's parameters and their cosine, on the first and the last
    protocol training batch."""
    windows = protocol_train_windows(student_tokenizer, teacher.tokenizer, count=STEPS * 4, window_tokens=WINDOW)
    online = topk_teacher(teacher)
    result = {}
    for batch_name, first in (("first batch", 0), ("last batch", STEPS * 4 - 4)):
        batch = collate_windows(windows[first : first + 4], teacher.vocab.pad_id)
        mapped = push_topk_through_map(online.signal(batch).topk, teacher_to_root)
        for name, model in models.items():
            grads = term_gradients(model, batch, mapped, groups)
            result[f"{name} / {batch_name}"] = {
                "lm_loss": grads.lm_loss, "kd_loss": grads.kd_loss,
                "lm_grad_norm": float(grads.lm.norm()), "kd_grad_norm": float(grads.kd.norm()),
                "kd_over_lm": float(grads.kd.norm() / grads.lm.norm()),
                "cosine": cosine(grads.lm, grads.kd),
            }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-train", action="store_true", help="measure only; the students must exist")
    args = parser.parse_args()
    started = time.perf_counter()
    finals = {} if args.no_train else train_missing_students()
    config = protocol_config(DEFAULT, STEPS, run_root=RUN_ROOT)
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    untouched = load_model(config.models.student, "student")
    models = {UNTOUCHED: untouched.model.eval()}
    models.update({method: load_model(str(student_dir(method)), "student").model.eval() for method in STUDENTS})
    tokenizer = untouched.tokenizer
    corpus = TrainingCorpus(config.data, tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    student_vocab = untouched.vocab.logit_size
    token_map = load_or_build_first_token_map(tokenizer, teacher.tokenizer, teacher.vocab.valid_mask, student_vocab)
    groups = load_or_build_student_groups(tokenizer, teacher.tokenizer, student_vocab)
    teacher_to_root = groups.root_of(token_map.teacher_to_student)
    result = {
        "command": "python bench/kd_diagnosis.py",
        "students": {method: str(student_dir(method).relative_to(REPO)) for method in STUDENTS},
        "reproduction": reproduction_check(finals) if finals else None,
        "held_out": held_out(models, teacher, corpus, tokenizer, teacher_to_root, groups, student_vocab),
        "gradient_balance": gradient_balance({name: models[name] for name in (UNTOUCHED, DEFAULT)}, teacher,
                                             tokenizer, teacher_to_root, groups),
        "seconds": time.perf_counter() - started,
    }
    OUTPUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result["held_out"][k] for k in ("bpb_of_these_windows", "bpb_share_by_kind",
                                                          "target_as_predictor", "conditioning",
                                                          "forward_kl_target_to_student_nats")}, indent=1))
    print(json.dumps(result["gradient_balance"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
