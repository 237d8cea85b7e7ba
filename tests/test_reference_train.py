"""The real reference pair end to end: a short distillation with the teacher online, exported and reloaded.

Two optimizer steps of 2 × 256 tokens (first-token strategy, forward KL): slow enough to be real (~3 minutes on two
cores), fast enough for CI. Checks the things a user relies on: the teacher's and the student's held-out BPB as
measured at set-up, a finite distillation loss, the exported folder reloading with plain `from_pretrained` and
giving exactly the BPB the run reported for its best checkpoint.
"""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosskd.config import load_config
from crosskd.data.stdlib import heldout_text
from crosskd.evaluate import bits_per_byte
from crosskd.models.reference import ensure_reference_models
from crosskd.train.recipe import train

pytestmark = pytest.mark.reference


def test_short_distillation_of_the_reference_pair(tmp_path):
    ensure_reference_models()
    config = load_config(
        "configs/reference.yaml",
        [f"output.run_dir={tmp_path / 'run'}", "training.max_steps=2", "training.batch_size=2",
         "output.tensorboard=false"],
    )
    result = train(config)

    assert result.teacher_bpb == pytest.approx(0.561, abs=0.002)
    assert result.initial_bpb == pytest.approx(0.768, abs=0.002)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 2
    assert all(math.isfinite(r["loss/kd"]) and r["loss/kd"] > 0 for r in steps)
    # Two small steps at lr 2e-5 must not wreck the student.
    assert result.final_bpb < result.initial_bpb + 0.01

    model = AutoModelForCausalLM.from_pretrained(result.student_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.student_dir)
    reloaded = bits_per_byte(model, tokenizer, heldout_text()).bits_per_byte
    assert reloaded == pytest.approx(result.best_bpb, abs=1e-4)


def test_the_trainers_first_windows_are_the_benchmark_protocols():
    import itertools

    from crosskd.data.windows import protocol_train_windows, window_ids_sha256
    from crosskd.models.loading import load_tokenizer
    from crosskd.data.corpus import TrainingCorpus

    ensure_reference_models()
    config = load_config("configs/reference.yaml")
    student, teacher = load_tokenizer("reference:student"), load_tokenizer("reference:teacher")
    corpus = TrainingCorpus(config.data, student, teacher, teacher.pad_token_id)
    stream = corpus.train_windows(start=0, process_index=0, num_processes=1, batch_size=4)
    trainer_windows = [window for batch in itertools.islice(stream, 60) for window in batch]
    assert window_ids_sha256(trainer_windows) == window_ids_sha256(protocol_train_windows(student, teacher))
