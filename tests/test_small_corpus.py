"""data.max_train_windows: a small corpus is the stream's first windows, repeated each epoch in a new seeded order."""

from __future__ import annotations

import itertools

import pytest

from crosskd.config import ConfigError
from crosskd.data.corpus import TrainingCorpus
from crosskd.models.loading import load_tokenizer
from trainer_helpers import tiny_config


def _window_ids(config, count: int) -> list[bytes]:
    student = load_tokenizer(config.models.student, "student")
    teacher = load_tokenizer(config.models.teacher, "teacher")
    corpus = TrainingCorpus(config.data, student, teacher, teacher.pad_token_id)
    batches = corpus.train_windows(start=0, process_index=0, num_processes=1, batch_size=1)
    return [batch[0].student_ids.tobytes() for batch in itertools.islice(batches, count)]


def test_a_small_corpus_repeats_its_first_windows_in_a_new_order_each_epoch(tmp_path):
    full = _window_ids(tiny_config(tmp_path), 6)
    small = _window_ids(tiny_config(tmp_path, "data.max_train_windows=6"), 24)
    epochs = [small[start : start + 6] for start in range(0, 24, 6)]
    assert epochs[0] == full  # the first epoch is the unrestricted stream's start
    assert all(sorted(epoch) == sorted(full) for epoch in epochs)  # every epoch holds exactly those windows
    assert any(epoch != full for epoch in epochs[1:])  # later epochs reorder them
    assert _window_ids(tiny_config(tmp_path, "data.max_train_windows=6"), 24) == small  # seeded


def test_epochs_of_a_small_corpus_count_its_windows(tmp_path):
    config = tiny_config(tmp_path, "data.max_train_windows=8", "training.max_steps=null", "training.epochs=3")
    student = load_tokenizer(config.models.student, "student")
    teacher = load_tokenizer(config.models.teacher, "teacher")
    corpus = TrainingCorpus(config.data, student, teacher, teacher.pad_token_id)
    assert corpus.count_train_windows() == 8
    assert corpus.optimizer_steps(config.training, windows_per_step=2) == 12


def test_a_non_positive_limit_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_train_windows"):
        tiny_config(tmp_path, "data.max_train_windows=0")
