"""Text sources and the deterministic document split."""

from __future__ import annotations

import json
import warnings

import pytest

from crosskd.data import stdlib
from crosskd.data.sources import Document, iter_documents, load_documents, split_documents


def _write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def test_python_stdlib_lists_the_protocol_files_by_relative_name():
    first = next(iter_documents("python-stdlib"))
    files = stdlib.stdlib_files()
    assert first.name == files[0].relative_to(stdlib.stdlib_root()).as_posix()
    assert first.text == files[0].read_text(encoding="utf-8")


def test_text_file_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "sub" / "b.py").write_text("beta\r\n", encoding="utf-8")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").write_text("secret", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")

    assert load_documents(str(tmp_path / "a.txt")) == [Document(str(tmp_path / "a.txt"), "alpha")]
    assert load_documents(str(tmp_path)) == [Document("a.txt", "alpha"), Document("sub/b.py", "beta\r\n")]
    assert [d.text for d in load_documents(str(tmp_path / "**" / "*.py"))] == ["beta\r\n"]


def test_jsonl_with_a_named_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    _write_jsonl(path, [{"content": "one", "id": 1}, {"content": "two 🎉", "id": 2}])
    assert load_documents(str(path), text_field="content") == [
        Document(f"{path}:1", "one"),
        Document(f"{path}:2", "two 🎉"),
    ]
    with pytest.raises(KeyError, match=r"no text field 'text'.*\['content', 'id'\].*text_field"):
        load_documents(str(path))


def test_parquet_with_a_named_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": ["x = 1\n", "日本"], "n": [1, 2]}), path)
    assert [d.text for d in load_documents(str(path), text_field="body")] == ["x = 1\n", "日本"]
    with pytest.raises(KeyError, match=r"available fields: \['body', 'n'\]"):
        load_documents(str(path))


def test_datasets_saved_on_disk_and_built_from_local_files(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}), "test": datasets.Dataset.from_dict({"text": ["e"]})}
    ).save_to_disk(str(saved))
    assert [d.text for d in load_documents(str(saved), split="train")] == ["t1", "t2"]
    with pytest.raises(KeyError, match=r"has splits \['train', 'test'\].*split="):
        load_documents(str(saved))

    _write_jsonl(tmp_path / "part.jsonl", [{"text": "built"}])
    built = load_documents(f"json:{tmp_path}/*.jsonl")
    assert [d.text for d in built] == ["built"]


def test_invalid_utf8_is_replaced_and_reported_once(tmp_path):
    (tmp_path / "bad1.txt").write_bytes(b"ok \xff\xfe end \xef\xbf\xbd")  # genuine U+FFFD is not counted
    (tmp_path / "bad2.txt").write_bytes(b"\xc3(")
    (tmp_path / "good.txt").write_bytes("fine".encode("utf-8"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = load_documents(str(tmp_path))
    assert [d.text for d in documents] == ["ok \ufffd\ufffd end \ufffd", "\ufffd(", "fine"]
    assert len(caught) == 1
    assert "2 document(s) had invalid UTF-8 (3 byte sequence(s)" in str(caught[0].message)


def test_large_jsonl_is_streamed(tmp_path):
    path = tmp_path / "big.jsonl"
    _write_jsonl(path, ({"text": f"document {index}"} for index in range(20_000)))
    stream = iter_documents(str(path))
    assert next(stream).text == "document 0"  # available before the rest of the file is read
    assert sum(1 for _ in stream) == 19_999


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*check the path"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="gave no documents"):
        load_documents(str(tmp_path / "*.txt"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        load_documents(str(tmp_path / "broken.jsonl"))


DOCS = [Document(f"doc{index}.py", f"text {index}") for index in range(50)]


def test_split_is_deterministic_document_level_and_respects_heldout_names():
    train, evaluation = split_documents(DOCS, eval_fraction=0.2, seed=7, heldout_names=["doc3.py", "doc40.py"])
    again = split_documents(DOCS, eval_fraction=0.2, seed=7, heldout_names=["doc3.py", "doc40.py"])
    assert (train, evaluation) == again
    assert len(evaluation) == 2 + round(0.2 * 48)
    assert {"doc3.py", "doc40.py"} <= {d.name for d in evaluation}
    assert not {d.name for d in train} & {d.name for d in evaluation}
    assert sorted(train + evaluation, key=DOCS.index) == DOCS
    other_train, _ = split_documents(DOCS, eval_fraction=0.2, seed=8, heldout_names=["doc3.py", "doc40.py"])
    assert other_train != train


def test_split_errors():
    with pytest.raises(KeyError, match="not in the corpus"):
        split_documents(DOCS, 0.1, 0, heldout_names=["missing.py"])
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        split_documents(DOCS, 1.0, 0)
    with pytest.raises(ValueError, match="no training documents"):
        split_documents(DOCS[:1], 0.0, 0, heldout_names=["doc0.py"])


def test_stdlib_heldout_files_split_off_by_name():
    documents = load_documents("python-stdlib")
    train, evaluation = split_documents(documents, 0.0, 0, heldout_names=stdlib.HELDOUT_FILES)
    assert sorted(d.name for d in evaluation) == sorted(stdlib.HELDOUT_FILES)
    assert len(train) == len(documents) - len(stdlib.HELDOUT_FILES)
