"""Held-out NLL of trained students by class of the true next token: newline + indentation, lone newline, the rest.

Shows where distillation helps and where a vocabulary mismatch hurts (docs/VOCAB.md): the first-token map once put
the teacher's '\\n' mass on the student's lone '\\n', which the student never emits before indentation.

    python bench/token_classes.py runs/bench-quality/lm-only/student runs/bench-quality/first-token/student ...

Scores the first 2,048 student tokens of the protocol's held-out text in 512-token windows with the untouched
student (reference:student) and each given student folder; writes bench/results/token_classes.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from crosskd.config import load_config
from crosskd.data.corpus import TrainingCorpus
from crosskd.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]
TOKENS, WINDOW = 2048, 512


def token_class(text: str) -> str:
    if text == "\n":
        return "lone newline"
    if text.startswith("\n") and text[1:].strip() == "" and len(text) > 1:
        return "newline + indentation"
    return "other"


@torch.no_grad()
def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    parts = []
    for start in range(0, ids.shape[1], WINDOW):
        window = ids[:, start : start + WINDOW]
        logp = model(window).logits[0, :-1].float().log_softmax(-1)
        parts.append(-logp.gather(1, window[0, 1:, None]).squeeze(1))
    return torch.cat(parts)


def main(student_dirs: list[str]) -> None:
    config = load_config(REPO / "configs" / "reference.yaml", [])
    untouched = load_model("reference:student", "student")
    teacher_tokenizer = load_model("reference:teacher", "teacher").tokenizer
    corpus = TrainingCorpus(config.data, untouched.tokenizer, teacher_tokenizer, 0)
    ids = untouched.tokenizer(corpus.eval_text(), add_special_tokens=False, return_tensors="pt").input_ids[:, :TOKENS]
    targets = torch.cat([ids[0, start + 1 : start + WINDOW] for start in range(0, ids.shape[1], WINDOW)])
    classes = [token_class(untouched.tokenizer.decode([t])) for t in targets.tolist()]
    scored = {"reference:student": token_nll(untouched.model.eval(), ids)}
    for folder in student_dirs:
        scored[folder] = token_nll(load_model(folder, "student").model.eval(), ids)
    result: dict = {"command": "python bench/token_classes.py " + " ".join(student_dirs), "tokens": len(targets),
                    "classes": {}}
    for name in sorted(set(classes)):
        mask = torch.tensor([c == name for c in classes])
        result["classes"][name] = {"count": int(mask.sum()),
                                   **{model: float(nll[mask].mean()) for model, nll in scored.items()}}
    result["all"] = {model: float(nll.mean()) for model, nll in scored.items()}
    (REPO / "bench" / "results" / "token_classes.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
