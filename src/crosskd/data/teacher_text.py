"""Text the teacher wrote, as training documents: the folder `crosskd write-teacher-text` fills (teacher/writing.py).

The folder holds `index.json` (the settings, the fingerprints of the teacher and of the prompt windows, the parts
written and whether the writing finished) and one JSON-lines part per generate call, `part-NNNNN.jsonl`, each row
one continuation: {"name", "window", "sample", "prompt", "text", "teacher_tokens", "stop"}. Parts and the index are
written atomically (a temporary file, then a rename), so a folder is always a prefix of the finished writing.

A run reads it only once it is complete: the continuations, in the order they were written, are documents beside
the corpus's own (data/corpus.py says where they join the stream). The prompt itself is not part of a document: it
is the corpus's own text, which the run already trains on.
"""

from __future__ import annotations

import json
from pathlib import Path

from crosskd.data.sources import Document

INDEX_FILE = "index.json"
FORMAT_VERSION = 1


class TeacherTextError(ValueError):
    """A teacher-text folder that cannot be used as it is: the message names the problem and the fix."""


def part_name(number: int) -> str:
    return f"part-{number:05d}.jsonl"


def read_index(folder: Path) -> dict | None:
    """The folder's index, or None where nothing was written yet."""
    path = folder / INDEX_FILE
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TeacherTextError(f"{path} is not valid JSON ({error}); delete {folder} and run crosskd write-teacher-text "
                               "again") from error
    if index.get("format") != FORMAT_VERSION:
        raise TeacherTextError(f"{path} has format {index.get('format')!r}, this crosskd reads {FORMAT_VERSION}; delete "
                               f"{folder} and run crosskd write-teacher-text again")
    return index


def load_teacher_text(folder: str | Path) -> list[Document]:
    """The continuations of a finished teacher-text folder, in the order they were written."""
    folder = Path(folder).expanduser()
    index = read_index(folder)
    if index is None:
        raise TeacherTextError(f"data.teacher_text.dir {str(folder)!r} holds no teacher text; write it first with "
                               "`crosskd write-teacher-text CONFIG` (the same config and overrides as the run)")
    if not index["complete"]:
        raise TeacherTextError(
            f"the teacher text in {folder} is unfinished ({index['samples_written']} of {index['samples_planned']} "
            "continuations); run `crosskd write-teacher-text` with the same config again: it resumes")
    documents = []
    for part in index["parts"]:
        path = folder / part
        if not path.exists():
            raise TeacherTextError(f"{path} is listed in {folder / INDEX_FILE} but missing; delete {folder} and write "
                                   "the teacher text again")
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            documents.append(Document(row["name"], row["text"]))
    return documents
