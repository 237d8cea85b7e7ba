"""Text sources: where documents come from, and the deterministic train/eval split.

A source is one string: `python-stdlib`, a text file, a folder (recursive), a glob, a `.jsonl` or `.parquet` file
with a named text field, a Hugging Face `datasets` dataset saved with `save_to_disk`, `json:`/`text:`/`parquet:`
followed by local file patterns, built with that `datasets` builder, or `hub:<dataset id>` (the Hugging Face hub,
where the machine can reach it). Documents are streamed one at a time (`iter_documents`); invalid UTF-8 is replaced
and reported in one warning per source. Row-based sources (everything but the stdlib and plain text files) also give
their rows whole (`iter_records`), which is what conversations are read from (data/chat.py).
"""

from __future__ import annotations

import glob
import json
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from crosskd.data import stdlib

STDLIB_SOURCE = "python-stdlib"
DATASETS_BUILDERS = ("json", "text", "parquet")
HUB_PREFIX = "hub:"
ROW_FILE_SUFFIXES = (".jsonl", ".parquet")
_REPLACEMENT_CHARACTER = "\ufffd"
_ENCODED_REPLACEMENT_CHARACTER = _REPLACEMENT_CHARACTER.encode("utf-8")
_BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Record:
    """One row of a row-based source: where it is (`file:line`, `file#row`, `dataset[split]#row`), the file or
    dataset it belongs to, and its fields."""

    where: str
    group: str
    fields: dict


class _InvalidUtf8Tally:
    """Counts invalid UTF-8 across a source so that it is reported once, not once per document."""

    def __init__(self) -> None:
        self.documents = 0
        self.sequences = 0
        self.first_document = ""

    def decode(self, data: bytes, name: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
        # Each invalid sequence became one U+FFFD; the text may also hold genuine ones, which were valid bytes.
        self.sequences += text.count(_REPLACEMENT_CHARACTER) - data.count(_ENCODED_REPLACEMENT_CHARACTER)
        self.documents += 1
        self.first_document = self.first_document or name
        return text

    def warn(self, source: str) -> None:
        if self.documents:
            warnings.warn(
                f"{source}: {self.documents} document(s) had invalid UTF-8 ({self.sequences} byte sequence(s) replaced "
                f"by U+FFFD, first in {self.first_document}); re-encode the files as UTF-8 to keep that text",
                stacklevel=3,
            )


def load_documents(source: str, *, text_field: str = "text", split: str | None = None) -> list[Document]:
    """All documents of `source` (see the module docstring), in a deterministic order; empty texts are skipped
    (except in the stdlib, whose every file is part of the benchmark protocol)."""
    documents = list(iter_documents(source, text_field=text_field, split=split))
    if not documents:
        raise ValueError(
            f"source {source!r} gave no documents (no files matched, or every text was empty); "
            "point it at files or a dataset that contain text"
        )
    return documents


def iter_documents(source: str, *, text_field: str = "text", split: str | None = None) -> Iterator[Document]:
    """Documents of `source` one at a time, so that a large corpus never has to be in memory at once."""
    tally = _InvalidUtf8Tally()
    for document in _documents_of(source, text_field, split, tally):
        # Empty texts carry nothing, except in the stdlib: a fixed corpus whose benchmark protocol puts a separator
        # after every file, empty ones included, so dropping them would change every window of the protocol.
        if document.text or source == STDLIB_SOURCE:
            yield document
    tally.warn(source)


def _documents_of(source: str, text_field: str, split: str | None, tally: _InvalidUtf8Tally) -> Iterator[Document]:
    if source == STDLIB_SOURCE:
        root = stdlib.stdlib_root()
        for path in stdlib.stdlib_files(root):
            yield Document(path.relative_to(root).as_posix(), tally.decode(path.read_bytes(), str(path)))
        return
    dataset = _dataset_of(source, split)
    if dataset is not None:
        yield from _dataset_rows(*dataset, text_field)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(path))):
            yield from _file_documents(file, file.relative_to(path).as_posix(), text_field, tally)
    elif path.is_file():
        yield from _file_documents(path, source, text_field, tally)
    elif glob.has_magic(source):
        for name in sorted(glob.glob(str(path), recursive=True)):
            if Path(name).is_file():
                yield from _file_documents(Path(name), name, text_field, tally)
    else:
        raise _missing_source_error(source)


def _missing_source_error(source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"source {source!r} does not exist: it is not {STDLIB_SOURCE!r}, an existing file or folder, a glob, "
        f"builder:files with a builder in {DATASETS_BUILDERS}, or {HUB_PREFIX}<dataset id>; check the path (relative "
        f"to {Path.cwd()})"
    )


def _dataset_of(source: str, split: str | None):
    """(dataset, where) when `source` names a `datasets` dataset (built from files, saved on disk, on the hub),
    else None."""
    builder, _, data_files = source.partition(":")
    if source.startswith(HUB_PREFIX):
        return _hub_dataset(source[len(HUB_PREFIX):], split or "train")
    if builder in DATASETS_BUILDERS and data_files:
        return _built_dataset(builder, data_files, split or "train")
    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        return _saved_dataset(path, split)
    return None


def iter_records(source: str, split: str | None = None) -> Iterator[Record]:
    """The rows of a row-based source one at a time: `.jsonl` / `.parquet` files (a file, a folder of them, a glob)
    or a `datasets` dataset; other files in a folder are left out, a source of another kind is an error."""
    dataset = _dataset_of(source, split)
    if dataset is not None:
        dataset, where = dataset
        for row, fields in enumerate(dataset):
            yield Record(f"{where}#{row}", where, fields)
        return
    tally = _InvalidUtf8Tally()
    path = Path(source).expanduser()
    if source == STDLIB_SOURCE or path.is_file() and path.suffix not in ROW_FILE_SUFFIXES:
        raise ValueError(
            f"source {source!r} has no rows: conversations are read from {' or '.join(ROW_FILE_SUFFIXES)} files, a "
            f"`datasets` folder, builder:files or {HUB_PREFIX}<dataset id>; convert the data to JSONL (one object a "
            "line), or set data.format=text to train on it as plain text"
        )
    if path.is_dir():
        files = [(p, p.relative_to(path).as_posix()) for p in sorted(path.rglob("*"))
                 if p.is_file() and not _is_hidden(p.relative_to(path))]
    elif path.is_file():
        files = [(path, source)]
    elif glob.has_magic(source):
        files = [(Path(name), name) for name in sorted(glob.glob(str(path), recursive=True)) if Path(name).is_file()]
    else:
        raise _missing_source_error(source)
    for file, name in files:
        if file.suffix == ".jsonl":
            for where, fields in _jsonl_records(file, name, tally):
                yield Record(where, name, fields)
        elif file.suffix == ".parquet":
            yield from _parquet_records(file, name)
    tally.warn(source)


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def _file_documents(path: Path, name: str, text_field: str, tally: _InvalidUtf8Tally) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, name, text_field, tally)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path, name, text_field)
    elif not _looks_binary(path):
        yield Document(name, tally.decode(path.read_bytes(), name))


def _looks_binary(path: Path) -> bool:
    """Text files have no NUL bytes; compiled files, images and archives in a folder almost always do."""
    with path.open("rb") as file:
        return b"\0" in file.read(_BINARY_SNIFF_BYTES)


def _missing_field_error(text_field: str, where: str, available: Sequence[str]) -> KeyError:
    return KeyError(
        f"{where} has no text field {text_field!r}; available fields: {sorted(available)}; "
        "pass the right one as text_field (data.text_field in a config)"
    )


def _jsonl_records(path: Path, name: str, tally: _InvalidUtf8Tally) -> Iterator[tuple[str, object]]:
    """(`name:line`, the parsed JSON value) per non-blank line, read line by line so that a huge file is never held
    whole."""
    with path.open("rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            if not raw_line.strip():
                continue
            where = f"{name}:{line_number}"
            try:
                yield where, json.loads(tally.decode(raw_line, where))
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON ({error}); each line of a .jsonl file is one object")


def _jsonl_documents(path: Path, name: str, text_field: str, tally: _InvalidUtf8Tally) -> Iterator[Document]:
    """One document per JSON line."""
    for where, record in _jsonl_records(path, name, tally):
        if not isinstance(record, dict) or text_field not in record:
            raise _missing_field_error(text_field, where, record.keys() if isinstance(record, dict) else [])
        yield Document(where, _require_text(record[text_field], text_field, where))


def _require_text(value, text_field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{where}: field {text_field!r} holds {type(value).__name__}, not text; choose a text field")
    return value


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise _missing_field_error(text_field, name, parquet.schema_arrow.names)
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield Document(f"{name}#{row}", _require_text(value, text_field, f"{name}#{row}"))
            row += 1


def _parquet_records(path: Path, name: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for fields in batch.to_pylist():
            yield Record(f"{name}#{row}", name, fields)
            row += 1


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _saved_dataset(path: Path, split: str | None):
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        split = _choose_split(list(dataset), split, str(path))
        dataset = dataset[split]
    return dataset, f"{path}[{split}]" if split else str(path)


def _built_dataset(builder: str, data_files: str, split: str):
    import datasets

    files = sorted(glob.glob(data_files, recursive=True))
    if not files:
        raise FileNotFoundError(f"{builder}:{data_files} matches no files; check the pattern (relative to {Path.cwd()})")
    return datasets.load_dataset(builder, data_files={split: files}, split=split), f"{builder}:{data_files}[{split}]"


def _hub_dataset(dataset_id: str, split: str):
    """A dataset of the Hugging Face hub; a machine that cannot reach it (or its local cache) gets a clear error."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split), f"{HUB_PREFIX}{dataset_id}[{split}]"
    except Exception as error:  # offline: ConnectionError, OSError or datasets' own errors, depending on the version
        raise FileNotFoundError(
            f"{HUB_PREFIX}{dataset_id} could not be loaded ({type(error).__name__}: {error}); this machine may not "
            "reach the Hugging Face hub. Download it where the hub is reachable and save it with "
            "`datasets.load_dataset(...).save_to_disk(folder)` (then data.source=<folder>), or export it to JSONL"
        ) from error


def _choose_split(available: list[str], split: str | None, where: str) -> str:
    if split is None and len(available) == 1:
        return available[0]
    if split not in available:
        raise KeyError(f"{where} has splits {available}; choose one with split= (data.split in a config)")
    return split


def _dataset_rows(dataset, where: str, text_field: str) -> Iterator[Document]:
    if text_field not in dataset.column_names:
        raise _missing_field_error(text_field, where, dataset.column_names)
    for row, record in enumerate(dataset.select_columns([text_field])):
        yield Document(f"{where}#{row}", _require_text(record[text_field], text_field, f"{where}#{row}"))


def split_documents(
    documents: Sequence[Document], eval_fraction: float, seed: int, heldout_names: Sequence[str] = ()
) -> tuple[list[Document], list[Document]]:
    """(train, eval): documents named in `heldout_names` always go to eval; of the rest a seeded random
    `eval_fraction` (at least one document when the fraction is positive) joins them. Both keep the input order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}; it is the share of documents for eval")
    heldout = set(heldout_names)
    missing = heldout - {document.name for document in documents}
    if missing:
        raise KeyError(
            f"held-out document(s) {sorted(missing)[:5]} are not in the corpus; names look like "
            f"{[document.name for document in documents[:3]]}"
        )
    candidates = [index for index, document in enumerate(documents) if document.name not in heldout]
    eval_count = round(eval_fraction * len(candidates))
    if eval_fraction > 0 and len(candidates) > 1:
        eval_count = min(max(eval_count, 1), len(candidates) - 1)
    random.Random(seed).shuffle(candidates)
    eval_indices, train_indices = set(candidates[:eval_count]), set(candidates[eval_count:])
    train = [document for index, document in enumerate(documents) if index in train_indices]
    evaluation = [
        document for index, document in enumerate(documents) if document.name in heldout or index in eval_indices
    ]
    if not train:
        raise ValueError(
            f"no training documents are left out of {len(documents)} after the held-out names and eval_fraction "
            f"{eval_fraction}; add documents or hold out fewer"
        )
    return train, evaluation
