"""Checkpoints: atomic on disk, complete enough that a resumed run repeats the uninterrupted one exactly on CPU.

A checkpoint is a folder `step-000010/` with the trainable state (student and heads) in safetensors, the optimizer,
scheduler, scaler and RNG states, and `state.json` (step, data position, best BPB, counters). It is written into a
temporary sibling, fsynced, and renamed into place: a killed writer leaves only a `.tmp-*` folder that is never read.
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

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


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
) -> Path:
    """Write a checkpoint atomically into `folder` (the final name) and return it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
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
    _fsync_tree(temporary)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


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
    state: TrainingState
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict


def load_checkpoint(folder: Path) -> LoadedCheckpoint:
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} is not a complete crosskd checkpoint (no {STATE_FILE}); pass a folder named step-NNNNNN "
            "from the run's checkpoints/ directory"
        )
    extra = torch.load(folder / OPTIMIZER_FILE, weights_only=False)
    return LoadedCheckpoint(
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
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file())


def prune_checkpoints(root: Path, keep_last: int, protect: Path | None) -> None:
    """Keep the last `keep_last` checkpoints and the protected one (the best)."""
    checkpoints = list_checkpoints(root)
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old)
