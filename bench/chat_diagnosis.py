"""Where KD loses on conversations (issue 17): responses-only held-out BPB split by where a token sits in its response.

After bench/chat_quality.py, the untouched student, its two trained students (LM-only SFT and crosskd's default) and
the teacher are scored on the held-out conversations of configs/reference-chat.yaml, each on its own rendering, as
the trainer's evaluation does. Each scored token's NLL goes to one class by its index in its response: the first
token (what the model opens its answer with), tokens 2-8 (the first line, for these short function bodies) and the
rest. A class's figure is its share of the bits per byte (its NLL in bits over all the scored bytes), so the classes
of a model add up to its BPB. Writes bench/results/chat_diagnosis.json.

    python bench/chat_diagnosis.py        # ~3 min on 2 cores
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from crosskd.config import load_config
from crosskd.data.corpus import TrainingCorpus
from crosskd.models.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "reference-chat.yaml"
RUN_ROOT = REPO / "runs" / "bench-chat"
RESULTS = REPO / "bench" / "results" / "chat_diagnosis.json"
CLASSES = (("first token", 0, 1), ("tokens 2-8", 1, 8), ("token 9 on", 8, None))


def response_index(scored: np.ndarray) -> np.ndarray:
    """For each position, the index of its (scored) next token within its run of scored positions; -1 elsewhere."""
    index = np.full(len(scored), -1)
    run = 0
    for position, is_scored in enumerate(scored):
        run = run + 1 if is_scored else 0
        if is_scored:
            index[position] = run - 1
    return index


@torch.no_grad()
def class_bits_per_byte(model, sequences) -> dict:
    nll = {name: 0.0 for name, *_ in CLASSES}
    tokens = {name: 0 for name, *_ in CLASSES}
    scored_bytes = 0
    model.eval()
    for sequence in sequences:
        scored = sequence.scored[:-1]
        if not scored.any():
            continue
        ids = torch.from_numpy(sequence.ids).unsqueeze(0)
        logits = model(input_ids=ids).logits[0, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").double().numpy()
        index = response_index(scored)
        for name, start, stop in CLASSES:
            in_class = (index >= start) & ((index < stop) if stop is not None else True)
            nll[name] += float(token_nll[in_class].sum())
            tokens[name] += int(in_class.sum())
        scored_bytes += sequence.scored_bytes
    classes = {name: {"bits_per_byte_share": nll[name] / math.log(2) / scored_bytes, "tokens": tokens[name],
                      "nats_per_token": nll[name] / max(tokens[name], 1)} for name, *_ in CLASSES}
    return {"bpb": sum(c["bits_per_byte_share"] for c in classes.values()), "scored_bytes": scored_bytes,
            "classes": classes}


def main() -> None:
    config = load_config(CONFIG, [])
    student_tokenizer = load_tokenizer(config.models.student, "student")
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    corpus = TrainingCorpus(config.data, student_tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    student_sequences, teacher_sequences = corpus.heldout_sequences("student"), corpus.heldout_sequences("teacher")
    models = {"teacher": class_bits_per_byte(teacher.model, teacher_sequences)}
    del teacher
    for name, spec in (("untouched", config.models.student), ("lm-only", RUN_ROOT / "lm-only" / "student"),
                       ("first-token", RUN_ROOT / "first-token" / "student")):
        models[name] = class_bits_per_byte(load_model(str(spec), "student").model, student_sequences)
        print(name, json.dumps(models[name]), flush=True)
    RESULTS.write_text(json.dumps({"config": str(CONFIG.relative_to(REPO)), "conversations": len(student_sequences),
                                   "models": models, "command": "python bench/chat_diagnosis.py"}, indent=1) + "\n")


if __name__ == "__main__":
    main()
