"""The Python standard library's own source: the reference corpus every machine has.

Set-up checks, benchmarks and tests all read the benchmark protocol's held-out text (docs/BENCHMARKS.md) from here;
the split itself (`HELDOUT_FILES`, relative to the stdlib root, cut to `HELDOUT_CHARS`) is part of the config's
defaults.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from crosskd.config import HELDOUT_CHARS, HELDOUT_FILES

# Folders left out of the corpus: tests are huge and repetitive, the rest are GUI/legacy/packaging code.
EXCLUDED_DIR_NAMES = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip"}
)
MAX_FILE_BYTES = 200_000


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise FileNotFoundError(
            f"the Python standard library was not found at {root} (no os.py there); "
            "crosskd's reference corpus needs an interpreter installed with its .py sources"
        )
    return root


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every standard-library .py file in sorted path order, without excluded folders and files over 200 KB."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative_dirs = path.relative_to(root).parts[:-1]
        if any(part in EXCLUDED_DIR_NAMES for part in relative_dirs):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(path)
    return files


def heldout_text(root: Path | None = None) -> str:
    """The protocol's held-out text: the first 24,000 characters of the held-out files concatenated in order."""
    root = root or stdlib_root()
    text = "".join((root / name).read_text(encoding="utf-8") for name in HELDOUT_FILES)
    return text[:HELDOUT_CHARS]
