"""Faults at random points of a tiny run (during a step, a checkpoint write, an evaluation, the export), either as
Ctrl-C (the loop writes its emergency checkpoint) or as a kill (nothing runs after it): `--resume` must export the
straight run's student bit for bit, or refuse with a clear message (nothing to resume: a start over is then exact).
The same for `cache-teacher`: re-run after a fault, its cache must be the straight one byte for byte."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import transformers

import crosskd.teacher.cache as cache_module
from crosskd.api import cache_teacher
from crosskd.teacher.online import OnlineTeacher
from crosskd.train import checkpoint, recipe
from crosskd.train.checkpoint import CheckpointError
from crosskd.train.objective import DistillationObjective
from trainer_helpers import exported_weights, run_training, tiny_config

OVERRIDES = ("training.max_steps=4", "training.checkpoint_every=2", "training.eval_every=2",
             "optimizer.scheduler=cosine")
SEEDS = range(30)


class Killed(BaseException):
    """A kill -9: no handler of the loop catches it, so no emergency checkpoint is written."""


# Where a fault can strike: (object, attribute) of functions the run calls.
FAULT_POINTS = {
    "step": (DistillationObjective, "forward"),  # the objective's terms, in training and in retention metrics
    "checkpoint write": (checkpoint, "save_file"),  # the trainable tensors of a checkpoint
    "checkpoint manifest": (checkpoint, "file_sha256"),  # between the files and the manifest
    "evaluation": (recipe, "bits_per_byte"),  # held-out BPB before training and at each evaluation
    "export": (transformers.PreTrainedModel, "save_pretrained"),  # writing the exported student
}


CACHE_FAULT_POINTS = {
    "teacher forward": (OnlineTeacher, "signal"),
    "shard write": (cache_module, "save_file"),
    "index write": (cache_module, "write_index"),
}
SHARD_MEGABYTES = 0.005  # one micro-batch per shard: a fault can strike between shards


def _count_calls(monkeypatch, points, work) -> dict[str, int]:
    """Run `work()` and count how often it reaches each of `points`."""
    counts = dict.fromkeys(points, 0)
    for name, (owner, attribute) in points.items():
        original = getattr(owner, attribute)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, attribute, counted)
    work()
    monkeypatch.undo()
    return counts


def _fail_once(monkeypatch, points, counts, seed, work) -> tuple:
    """Run `work()` with a fault (Ctrl-C or a kill) at a point and call chosen by `seed`; return what was chosen."""
    rng = random.Random(seed)
    point = rng.choice(sorted(points))
    strike = rng.randint(1, counts[point])
    fault = rng.choice([KeyboardInterrupt, Killed])
    owner, attribute = points[point]
    original = getattr(owner, attribute)
    calls = itertools.count(1)

    def faulty(*args, **kwargs):
        if next(calls) == strike:
            raise fault(f"{point} #{strike}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, faulty)
    with pytest.raises(fault):
        work()
    monkeypatch.undo()
    return point, strike, fault.__name__


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: its exported student and how often it reaches each fault point."""
    tmp_path = tmp_path_factory.mktemp("straight")
    config = tiny_config(tmp_path, *OVERRIDES)
    with pytest.MonkeyPatch.context() as monkeypatch:
        counts = _count_calls(monkeypatch, FAULT_POINTS, lambda: run_training(config))
    return tmp_path / "corpus", exported_weights(config.output.run_dir), counts


@pytest.mark.parametrize("seed", SEEDS)
def test_a_run_faulted_at_a_random_point_resumes_to_the_straight_runs_student(tmp_path, monkeypatch, straight, seed):
    corpus, expected, counts = straight
    config = tiny_config(tmp_path, *OVERRIDES, corpus=corpus)
    chosen = _fail_once(monkeypatch, FAULT_POINTS, counts, seed, lambda: run_training(config))

    try:
        run_training(config, resume="latest")
    except CheckpointError as error:  # the fault struck before the first checkpoint: a clear refusal, then a restart
        assert "no checkpoint to resume" in str(error) and "start without --resume" in str(error)
        run_training(config, overwrite=True)
    resumed = exported_weights(config.output.run_dir)
    assert resumed.keys() == expected.keys(), chosen
    assert all(torch.equal(resumed[name], expected[name]) for name in expected), chosen


def _files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def straight_cache(tmp_path_factory):
    """The cache of an uninterrupted `cache-teacher`: its files and how often it reaches each fault point."""
    tmp_path = tmp_path_factory.mktemp("straight-cache")
    config = tiny_config(tmp_path, "training.max_steps=3", f"teacher.cache_dir={tmp_path / 'cache'}")
    with pytest.MonkeyPatch.context() as monkeypatch:
        counts = _count_calls(monkeypatch, CACHE_FAULT_POINTS,
                              lambda: cache_teacher(config, shard_megabytes=SHARD_MEGABYTES, progress=False))
    return tmp_path / "corpus", _files(tmp_path / "cache"), counts


@pytest.mark.parametrize("seed", range(10))
def test_cache_teacher_faulted_at_a_random_point_ends_with_the_straight_cache(tmp_path, monkeypatch, straight_cache,
                                                                             seed):
    corpus, expected, counts = straight_cache
    config = tiny_config(tmp_path, "training.max_steps=3", f"teacher.cache_dir={tmp_path / 'cache'}", corpus=corpus)

    def write():
        return cache_teacher(config, shard_megabytes=SHARD_MEGABYTES, progress=False)

    chosen = _fail_once(monkeypatch, CACHE_FAULT_POINTS, counts, seed, write)
    write()
    assert _files(tmp_path / "cache") == expected, chosen
