"""Checkpoints: atomic folders, pruning, exact resume (20 steps straight = 10 + resume + 10) and SIGTERM."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crosskd.train.checkpoint import (
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    TRAINABLE_FILE,
    CheckpointError,
    TrainingState,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    newest_valid_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
    verify_checkpoint,
)
from crosskd.train.objective import DistillationObjective
from crosskd.train import recipe
from crosskd.train.recipe import RunFolderError
from trainer_helpers import REPO, exported_weights, log_records, run_training, tiny_config

RESUME_STEPS = 20
RESUME_OVERRIDES = (f"training.max_steps={RESUME_STEPS}", "training.checkpoint_every=10", "optimizer.scheduler=cosine",
                    "optimizer.warmup_steps=3")


def _save(folder, step: int):
    weights = torch.arange(6.0).reshape(2, 3) + step
    # Two names for one tensor, as with tied embeddings: stored once.
    return save_checkpoint(folder, TrainingState(step=step, windows_consumed=2 * step),
                           {"embed": weights, "head": weights}, {"state": {}}, {"last_epoch": step}, None,
                           {"training": {"max_steps": 5}})


def test_checkpoint_round_trip_and_tied_tensors_stored_once(tmp_path):
    folder = _save(tmp_path / checkpoint_name(3), step=3)
    loaded = load_checkpoint(folder)
    assert loaded.state.step == 3 and loaded.state.windows_consumed == 6
    assert list(loaded.trainable) == ["embed"]
    assert torch.equal(loaded.trainable["embed"], torch.arange(6.0).reshape(2, 3) + 3)
    assert loaded.scheduler == {"last_epoch": 3}
    assert set(loaded.rng) >= {"python", "numpy", "torch"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the temporary folder was renamed


def test_incomplete_folders_are_never_listed_or_loaded(tmp_path):
    _save(tmp_path / checkpoint_name(1), step=1)
    (tmp_path / f".tmp-{checkpoint_name(2)}-123").mkdir()  # a writer killed mid-way
    (tmp_path / checkpoint_name(3)).mkdir()  # no manifest.json
    assert list_checkpoints(tmp_path) == [tmp_path / checkpoint_name(1)]
    with pytest.raises(CheckpointError, match="not a complete crosskd checkpoint"):
        load_checkpoint(tmp_path / checkpoint_name(3))


def test_pruning_keeps_the_last_k_and_the_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path / checkpoint_name(step), step)
    prune_checkpoints(tmp_path, keep_last=2, protect=tmp_path / checkpoint_name(2))
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(s) for s in (2, 4, 5)]


def _interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C in the middle of optimizer step `step` (after its data was read, before its backward)."""
    original = DistillationObjective.forward
    calls = itertools.count(1)

    def forward(self, *args, **kwargs):
        if next(calls) == step:  # one forward per step without accumulation
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationObjective, "forward", forward)


def _stop_at_step(monkeypatch, config, step: int) -> None:
    """Train `config` until Ctrl-C in the middle of optimizer step `step` (emergency checkpoint at step - 1)."""
    _interrupt_at_step(monkeypatch, step)
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    monkeypatch.undo()


def _losses(run_dir) -> list[tuple]:
    return [(r["step"], r["total"], r["loss/lm"], r["loss/kd"], r["lr"], r["temperature"])
            for r in log_records(run_dir)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference: 20 steps in one go."""
    tmp_path = tmp_path_factory.mktemp("straight")
    config = tiny_config(tmp_path, *RESUME_OVERRIDES)
    run_training(config)
    return config.output.run_dir


@pytest.mark.parametrize("resume_from", ["periodic", "emergency"])
def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(tmp_path, monkeypatch, straight_run, resume_from):
    config = tiny_config(tmp_path, *RESUME_OVERRIDES)
    _stop_at_step(monkeypatch, config, 11)
    checkpoints = tmp_path / "run" / "checkpoints"
    emergency = checkpoints / f"{checkpoint_name(10)}-emergency"
    assert (checkpoints / checkpoint_name(10)).is_dir() and emergency.is_dir()
    assert load_checkpoint(emergency).state.step == 10

    # "latest" is the emergency checkpoint written at the interruption; the periodic one is named explicitly.
    run_training(config, resume="latest" if resume_from == "emergency" else str(checkpoints / checkpoint_name(10)))

    expected = _losses(straight_run)
    assert len(expected) == RESUME_STEPS
    assert _losses(config.output.run_dir) == expected  # exact equality, every step
    assert log_records(config.output.run_dir, "eval")[-1]["bpb"] == log_records(straight_run, "eval")[-1]["bpb"]


def test_sigterm_writes_a_complete_emergency_checkpoint_and_exits_nonzero(tmp_path):
    config = tiny_config(tmp_path)  # only for its corpus and run folder
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "crosskd.cli", "train", str(REPO / "configs" / "tiny.yaml"),
               f"data.source={config.data.source}", f"data.heldout_documents={config.data.heldout_documents}",
               "data.eval_max_chars=null", "training.max_steps=100000", f"output.run_dir={run_dir}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while not ((run_dir / "log.jsonl").is_file() and log_records(run_dir)):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no training step was logged in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()

    assert process.returncode != 0
    assert "received SIGTERM" in stderr and "emergency checkpoint:" in stderr, stderr
    (emergency,) = [p for p in list_checkpoints(run_dir / "checkpoints") if p.name.endswith("-emergency")]
    loaded = load_checkpoint(emergency)
    assert loaded.state.step >= 1
    assert loaded.state.windows_consumed == loaded.state.step * config.training.batch_size
    assert "student.model.embed_tokens.weight" in loaded.trainable and loaded.optimizer["state"]


def test_resumed_projector_run_keeps_its_fitted_standardisation(tmp_path):
    """The projector's feature statistics are fitted once before training, not re-fitted on resume: the checkpoint
    must carry them, or the resumed run would read the teacher's features on another scale."""
    overrides = ("objective.strategy=projector", "training.max_steps=4", "training.checkpoint_every=2")
    straight = tiny_config(tmp_path / "straight", *overrides)
    run_training(straight)
    checkpoint = tmp_path / "straight" / "run" / "checkpoints" / checkpoint_name(2)
    stored = load_checkpoint(checkpoint).trainable
    assert stored["objective.projector.feature_mean"].abs().sum() > 0  # fitted, not the initial zeros

    resumed = tiny_config(tmp_path / "resumed", *overrides, corpus=tmp_path / "straight" / "corpus")
    run_training(resumed, resume=str(checkpoint))
    assert _losses(resumed.output.run_dir) == _losses(straight.output.run_dir)[2:]


def test_a_run_stopped_in_its_final_evaluation_resumes_to_the_straight_runs_student(tmp_path, monkeypatch):
    """Ctrl-C during the last step's evaluation leaves an emergency checkpoint at the last step: the resume must
    evaluate that step and export the best student, as the straight run did (it exported the step-0 student)."""
    straight = tiny_config(tmp_path / "straight", "training.max_steps=2")
    expected = run_training(straight)
    assert expected.best_step == 2  # trained: the untouched student is not the best

    config = tiny_config(tmp_path / "stopped", "training.max_steps=2", corpus=tmp_path / "straight" / "corpus")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    monkeypatch.undo()
    resumed = run_training(config, resume="latest")

    assert (resumed.best_step, resumed.best_bpb) == (expected.best_step, expected.best_bpb)
    straight_weights, resumed_weights = exported_weights(straight.output.run_dir), exported_weights(config.output.run_dir)
    assert straight_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(straight_weights[name], resumed_weights[name]) for name in straight_weights)
    assert [r["step"] for r in log_records(config.output.run_dir, "eval")] == [2]


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "manifest"])
def test_a_damaged_checkpoint_is_named_and_the_newest_valid_one_is_used(tmp_path, damage):
    for step in (1, 2):
        _save(tmp_path / checkpoint_name(step), step)
    newest = tmp_path / checkpoint_name(2)
    if damage == "truncated":
        path = newest / TRAINABLE_FILE
        path.write_bytes(path.read_bytes()[:-7])
        reason = f"{path} has .* bytes"
    elif damage == "overwritten":
        path = newest / OPTIMIZER_FILE
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))
        reason = f"{path} does not match its SHA-256"
    else:
        path = newest / MANIFEST_FILE
        path.write_text(path.read_text()[:30])
        reason = f"{path} is corrupt"
    with pytest.raises(CheckpointError, match=reason):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(newest)
    folder, skipped = newest_valid_checkpoint(tmp_path)
    assert folder == tmp_path / checkpoint_name(1)
    assert len(skipped) == 1 and str(newest) in skipped[0]


def test_stale_temporary_folders_of_killed_writers_are_removed(tmp_path):
    dead_writer = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_writer.wait()
    stale = tmp_path / f".tmp-{checkpoint_name(2)}-{dead_writer.pid}"
    live = tmp_path / f".tmp-{checkpoint_name(3)}-{os.getppid()}"  # a writer that still runs
    stale.mkdir()
    live.mkdir()
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def test_resume_skips_a_corrupt_newest_checkpoint_and_says_which(tmp_path, monkeypatch, capsys, straight_run):
    config = tiny_config(tmp_path, *RESUME_OVERRIDES)
    _stop_at_step(monkeypatch, config, 11)
    checkpoints = tmp_path / "run" / "checkpoints"
    emergency = checkpoints / f"{checkpoint_name(10)}-emergency"
    (emergency / TRAINABLE_FILE).write_bytes(b"")  # the newest checkpoint, truncated to nothing
    capsys.readouterr()
    run_training(config, resume="latest")
    err = capsys.readouterr().err
    assert f"skipped a checkpoint: {emergency / TRAINABLE_FILE} has 0 bytes" in err
    assert _losses(config.output.run_dir) == _losses(straight_run)


def test_resume_refuses_a_checkpoint_of_another_config_naming_the_fields(tmp_path, straight_run):
    straight_run = Path(straight_run)
    other = tiny_config(tmp_path, *RESUME_OVERRIDES, "training.max_steps=3", "objective.kd_top_k=8",
                        f"output.run_dir={straight_run}", corpus=straight_run.parent / "corpus")
    config_before = (straight_run / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"configured differently: objective.kd_top_k: 32 -> 8; "
                                              r"training.max_steps: 20 -> 3\. Resume it with the config"):
        run_training(other, resume="latest")
    assert (straight_run / "config.yaml").read_text() == config_before  # refused before anything was written


def test_a_used_run_folder_is_refused_unless_overwritten_and_the_first_run_is_kept(tmp_path):
    first = tiny_config(tmp_path, "training.max_steps=2")
    run_training(first)
    run_dir = tmp_path / "run"
    kept = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}

    second = tiny_config(tmp_path, "training.max_steps=3", corpus=tmp_path / "corpus")
    with pytest.raises(RunFolderError, match=r"already holds a run \(checkpoints, log.jsonl, student, config.yaml\)\. "
                                             r"Resume it with `crosskd train .*config.yaml --resume`, .*"
                                             r"output.run_dir=NEW_FOLDER, or pass --overwrite"):
        run_training(second)
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == kept  # nothing lost

    result = run_training(second, overwrite=True)
    assert result.steps == 3
    assert [record["step"] for record in log_records(run_dir)] == [1, 2, 3]  # no row of the first run
    assert [path.name for path in list_checkpoints(run_dir / "checkpoints")][-1] == checkpoint_name(3)
    assert all(load_checkpoint(path).config["training"]["max_steps"] == 3
               for path in list_checkpoints(run_dir / "checkpoints"))


def _without_timings(records: list[dict]) -> list[dict]:
    """Log records without what depends on the machine's speed."""
    timings = ("wall_seconds", "tokens_per_second", "peak_memory_bytes")
    return [{key: value for key, value in record.items() if key not in timings} for record in records]


def test_a_resumed_log_keeps_one_row_per_step(tmp_path):
    config = tiny_config(tmp_path, "training.max_steps=4", "training.checkpoint_every=2", "training.eval_every=1",
                         "training.keep_checkpoints=10")
    run_training(config)
    straight = {kind: log_records(config.output.run_dir, kind) for kind in ("train", "eval")}
    run_training(config, resume=str(tmp_path / "run" / "checkpoints" / checkpoint_name(2)))  # steps 3 and 4 again
    assert [r["step"] for r in log_records(config.output.run_dir)] == [1, 2, 3, 4]
    assert [r["step"] for r in log_records(config.output.run_dir, "eval")] == [1, 2, 3, 4]
    resumed = {kind: log_records(config.output.run_dir, kind) for kind in ("train", "eval")}
    assert _without_timings(resumed["train"]) == _without_timings(straight["train"])
    assert len(log_records(config.output.run_dir, "start")) == 2  # each start of the process is kept
