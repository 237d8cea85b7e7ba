"""Inputs a run cannot train on are refused before the first step with the problem and its fix; a run waiting for
data still stops on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from crosskd.data.corpus import TrainingCorpus
from crosskd.train.checkpoint import checkpoint_name, list_checkpoints
from crosskd.train.recipe import TrainingStopped
from trainer_helpers import run_training, tiny_config


@contextlib.contextmanager
def _deadline(seconds: int):
    """A hang fails the test instead of blocking the suite."""
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_corpus_shorter_than_one_window_is_refused_before_the_first_step(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("x = 1\n")
    (corpus / "b.txt").write_text("y = 2\n")
    config = tiny_config(tmp_path, "data.heldout_documents=[]", "data.eval_fraction=0.5", corpus=corpus)
    with _deadline(60), pytest.raises(ValueError, match=r"the training documents \(1, 6 characters\) give no window "
                                                        r"of data.window_tokens=64 student tokens; add training text"):
        run_training(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sigterm_stops_a_run_that_waits_for_data(tmp_path, monkeypatch):
    def waiting_forever(self, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        while True:
            time.sleep(0.1)
        yield

    monkeypatch.setattr(TrainingCorpus, "train_windows", waiting_forever)
    with _deadline(60), pytest.raises(TrainingStopped, match="received SIGTERM while reading training data"):
        run_training(tiny_config(tmp_path))
    assert [path.name for path in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        checkpoint_name(0), f"{checkpoint_name(0)}-emergency"]


def test_a_window_beyond_the_models_positions_is_refused_before_the_first_step(tmp_path):
    config = tiny_config(tmp_path, "data.window_tokens=5000", "training.max_steps=1")
    with pytest.raises(ValueError, match=r"data.window_tokens=5000 exceeds the teacher tiny:teacher's position limit "
                                         r"of 1024 tokens \(max_position_embeddings\); set data.window_tokens to at most 1024"):
        run_training(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_held_out_text_shorter_than_one_window_is_refused_before_the_first_step(tmp_path):
    config = tiny_config(tmp_path, "data.window_tokens=1000", "training.max_steps=1")  # held-out: 700 characters
    with pytest.raises(ValueError, match=r"the held-out text \(700 characters\) gives no window of "
                                         r"data.window_tokens=1000 student tokens, which evaluation needs"):
        run_training(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_teacher_that_is_the_student_is_warned_about(tmp_path, capsys):
    run_training(tiny_config(tmp_path, "models.teacher=tiny:student", "training.max_steps=1"))
    assert "warning: the teacher and the student are the same model (tiny:student)" in capsys.readouterr().out
