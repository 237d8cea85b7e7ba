"""Checkpoints: atomic on disk, complete enough that a resumed run repeats the uninterrupted one exactly on CPU.

A checkpoint is a folder `step-000010/` with the trainable state (student and heads) in safetensors, the optimizer,
scheduler, scaler and RNG states, `state.json` (step, data position, best BPB, counters) and, written last,
`manifest.json`: the run's config and every file's size and SHA-256. It is written into a temporary sibling, fsynced,
and renamed into place: a killed writer leaves only a `.tmp-*` folder that is never read (and removed on the next
start). A checkpoint is read only after its manifest checks out, so a truncated or overwritten file is named, never
loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from crosskd.models.fingerprints import file_sha256

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
MANIFEST_FILE = "manifest.json"  # written last: its presence marks a complete checkpoint
TEMPORARY_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt or from another run's config."""


@dataclass
class TrainingState:
    """Counters that a resumed run needs besides tensors."""

    step: int = 0  # optimizer steps taken (skipped steps included: they consume data)
    windows_consumed: int = 0  # data position: training windows read so far
    best_bpb: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_skipped: int = 0
    overflow_skipped: int = 0
    consecutive_nonfinite: int = 0
    stopped_early: bool = False  # early stopping ended the run: a resume only finishes it (export)
    history: list[dict] = field(default_factory=list)  # evaluation records


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    folder: Path,
    state: TrainingState,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    scaler_state: dict | None,
    config: dict,
) -> Path:
    """Write a checkpoint of the run configured by `config` (its dict) atomically into `folder` (the final name) and
    return it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f"{TEMPORARY_PREFIX}{folder.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    # safetensors refuses tensors that share memory (tied embeddings): store each once, contiguous.
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in _untie(trainable).items()},
              str(temporary / TRAINABLE_FILE))
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler_state,
            "scaler": scaler_state,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        },
        temporary / OPTIMIZER_FILE,
    )
    (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    files = {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)} for path in sorted(temporary.iterdir())}
    (temporary / MANIFEST_FILE).write_text(json.dumps({"config": config, "files": files}, indent=1))
    _fsync_tree(temporary)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


def verify_checkpoint(folder: Path) -> dict:
    """The checkpoint's manifest, after checking every file it lists against its size and SHA-256; a
    `CheckpointError` naming the file and what is wrong with it otherwise."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{folder} is not a complete crosskd checkpoint (no {MANIFEST_FILE}); pass a folder named step-NNNNNN "
            "from the run's checkpoints/ directory"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is corrupt ({error}); the checkpoint cannot be trusted") from error
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, {expected['bytes']} were written: truncated or replaced")
        if file_sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its SHA-256 in {MANIFEST_FILE}: overwritten or corrupt")
    return manifest


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            continue
        seen[pointer] = name
        result[name] = tensor
    return result


@dataclass
class LoadedCheckpoint:
    folder: Path
    config: dict  # the config of the run that wrote it
    state: TrainingState
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict


def load_checkpoint(folder: Path) -> LoadedCheckpoint:
    """A verified checkpoint (`verify_checkpoint`)."""
    manifest = verify_checkpoint(folder)
    extra = torch.load(folder / OPTIMIZER_FILE, weights_only=False)
    return LoadedCheckpoint(
        folder=folder,
        config=manifest["config"],
        state=TrainingState(**json.loads((folder / STATE_FILE).read_text())),
        trainable=load_file(str(folder / TRAINABLE_FILE)),
        optimizer=extra["optimizer"],
        scheduler=extra["scheduler"],
        scaler=extra["scaler"],
        rng=extra["rng"],
    )


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / MANIFEST_FILE).is_file())


def newest_valid_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under `root` that verifies, and why each newer one was skipped."""
    skipped = []
    for folder in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(problem)
    return None, skipped


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is no valid checkpoint (`verify_checkpoint`'s reason), or None."""
    try:
        verify_checkpoint(folder)
    except CheckpointError as error:
        return str(error)
    return None


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Remove the temporary folders of checkpoint writers that no longer run (a kill mid-write); return them."""
    removed = []
    for path in root.glob(f"{TEMPORARY_PREFIX}step-*") if root.is_dir() else ():
        writer = path.name.rsplit("-", 1)[-1]
        if writer.isdigit() and int(writer) != os.getpid() and _process_alive(int(writer)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def prune_checkpoints(root: Path, keep_last: int, protect: Path | None) -> None:
    """Keep the last `keep_last` checkpoints and the protected one (the best)."""
    checkpoints = list_checkpoints(root)
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old)
