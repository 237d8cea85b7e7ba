"""crosskd write-teacher-text and data.teacher_text: the teacher's continuations as training text."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from crosskd.api import cache_teacher, write_teacher_text
from crosskd.config import ConfigError
from crosskd.data.corpus import TrainingCorpus
from crosskd.data.teacher_text import INDEX_FILE, TeacherTextError, load_teacher_text
from crosskd.models.loading import load_model, load_tokenizer
from crosskd.teacher.cache import TeacherCacheError, open_teacher_cache
from crosskd.vocab.transfer import transfer_class
from trainer_helpers import log_records, run_training, tiny_config, write_corpus

PROMPT_WINDOWS = 4
SAMPLES = 2
TEXT_SETTINGS = (f"data.max_train_windows={PROMPT_WINDOWS}", "data.teacher_text.prompt_tokens=8",
                 "data.teacher_text.new_tokens=40", f"data.teacher_text.samples_per_window={SAMPLES}",
                 "data.teacher_text.batch_size=3")


def text_config(tmp_path, folder, *overrides, corpus=None):
    return tiny_config(tmp_path, *TEXT_SETTINGS, f"data.teacher_text.dir={folder}", *overrides, corpus=corpus)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def written(tmp_path_factory, corpus):
    """A finished teacher-text folder of the tiny pair, written once for the module."""
    root = tmp_path_factory.mktemp("written")
    config = text_config(root, root / "teacher-text", corpus=corpus)
    return config, write_teacher_text(config, progress=False)


def _corpus(config) -> TrainingCorpus:
    student = load_tokenizer(config.models.student, "student")
    teacher = load_tokenizer(config.models.teacher, "teacher")
    return TrainingCorpus(config.data, student, teacher, teacher.pad_token_id)


def _rows(folder) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("part-*.jsonl")) for line in path.read_text().splitlines()]


def test_each_prompt_is_a_window_start_and_gets_its_samples(written, tmp_path):
    config, summary = written
    rows = _rows(summary.folder)
    assert summary.samples == len(rows) == PROMPT_WINDOWS * SAMPLES
    assert Counter(row["window"] for row in rows) == {window: SAMPLES for window in range(PROMPT_WINDOWS)}
    student = load_tokenizer(config.models.student, "student")
    windows = _corpus(text_config(tmp_path, tmp_path / "none", "data.teacher_text.dir=null",
                                  corpus=config.data.source)).stream_windows(PROMPT_WINDOWS)
    for row in rows:
        assert row["prompt"] == student.decode(list(windows[row["window"]].student_ids[:8]), skip_special_tokens=True)
        assert 0 < row["teacher_tokens"] <= 40 and row["stop"] in ("end", "length")
    # Samples of one prompt differ (sampled, not greedy), and no padded logit id was ever sampled: the tiny teacher's
    # output layer has 68 of them (9 % of its logits), whose names all start with [PAD.
    assert len({row["text"] for row in rows}) == len(rows)
    assert not any("[PAD" in row["text"] for row in rows)


def test_an_interrupted_writing_resumes_to_the_same_folder(written, tmp_path):
    config, summary = written
    folder = tmp_path / "resumed"
    shutil.copytree(summary.folder, folder)
    index = json.loads((folder / INDEX_FILE).read_text())
    first_part = _rows(folder)[:3]  # the batch size: one generate call
    for part in index["parts"][1:]:
        (folder / part).unlink()
    index.update(parts=index["parts"][:1], samples_written=3, complete=False,
                 teacher_tokens=sum(row["teacher_tokens"] for row in first_part),
                 stopped_early=sum(row["stop"] == "end" for row in first_part))
    (folder / INDEX_FILE).write_text(json.dumps(index))
    resumed = write_teacher_text(text_config(tmp_path, folder, corpus=config.data.source), progress=False)
    assert resumed.resumed_at == 3
    assert _rows(folder) == _rows(summary.folder)
    assert json.loads((folder / INDEX_FILE).read_text()) == json.loads((summary.folder / INDEX_FILE).read_text())


def test_other_settings_on_a_written_folder_are_refused_naming_the_setting(written, tmp_path):
    config, summary = written
    before = {path.name: path.read_bytes() for path in summary.folder.iterdir()}
    changed = text_config(tmp_path, summary.folder, "data.teacher_text.temperature=0.7", corpus=config.data.source)
    with pytest.raises(TeacherTextError, match="data.teacher_text.temperature differs .*Delete that folder"):
        write_teacher_text(changed, progress=False)
    assert {path.name: path.read_bytes() for path in summary.folder.iterdir()} == before  # nothing lost


def test_an_unfinished_folder_is_refused_with_the_command_that_resumes_it(written, tmp_path):
    config, summary = written
    folder = shutil.copytree(summary.folder, tmp_path / "unfinished")
    index = json.loads((folder / INDEX_FILE).read_text())
    (folder / INDEX_FILE).write_text(json.dumps({**index, "complete": False, "samples_written": 3}))
    with pytest.raises(TeacherTextError, match="unfinished .*3 of 8.*crosskd write-teacher-text"):
        _corpus(text_config(tmp_path, folder, corpus=config.data.source))
    with pytest.raises(TeacherTextError, match="holds no teacher text.*crosskd write-teacher-text"):
        load_teacher_text(tmp_path / "nowhere")


def test_the_teacher_windows_join_every_epoch_of_a_small_corpus_once(written, tmp_path):
    config, summary = written
    corpus = _corpus(config)
    plain = _corpus(text_config(tmp_path, tmp_path / "none", "data.teacher_text.dir=null", corpus=config.data.source))
    teacher_windows = list(corpus._windows_of(corpus.teacher_documents, "teacher text"))
    epoch = len(teacher_windows) + PROMPT_WINDOWS
    assert teacher_windows and corpus.count_train_windows() == epoch
    assert plain.count_train_windows() == PROMPT_WINDOWS
    stream = [window.student_ids.tobytes() for window in corpus.stream_windows(2 * epoch)]
    expected = Counter(window.student_ids.tobytes() for window in plain.stream_windows(PROMPT_WINDOWS)) + \
        Counter(window.student_ids.tobytes() for window in teacher_windows)
    assert Counter(stream[:epoch]) == expected == Counter(stream[epoch:])
    assert stream[:epoch] != stream[epoch:]  # each epoch in its own seeded order
    assert [d.text for d in corpus.teacher_documents] == [row["text"] for row in _rows(summary.folder)]


def test_a_run_trains_on_teacher_text_and_its_cache_knows_the_text(written, tmp_path):
    config, summary = written
    cached = text_config(tmp_path, summary.folder, "training.max_steps=3", "teacher.source=cache",
                         f"teacher.cache_dir={tmp_path / 'cache'}", corpus=config.data.source)
    cache_teacher(cached, progress=False)
    run_training(cached)
    assert len(log_records(cached.output.run_dir)) == 3
    # The same run on other teacher text is refused by the cache, naming the teacher text.
    other = shutil.copytree(summary.folder, tmp_path / "other-text")
    rows = _rows(other)
    (other / "part-00000.jsonl").write_text("".join(json.dumps({**row, "text": row["text"] + " x"}) + "\n"
                                                    for row in rows[:3]))
    moved = text_config(tmp_path, other, "training.max_steps=3", "teacher.source=cache",
                        f"teacher.cache_dir={tmp_path / 'cache'}", corpus=config.data.source)
    teacher = load_model(moved.models.teacher, "teacher")
    student_tokenizer = load_tokenizer(moved.models.student, "student")
    with pytest.raises(TeacherCacheError, match="teacher_text differs"):
        open_teacher_cache(moved, transfer_class(moved.objective).teacher_needs(moved.objective), teacher,
                           student_tokenizer)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.max_train_windows=null"], "prompt_windows is null and so is data.max_train_windows"),
    (["data.teacher_text.prompt_tokens=64"], "must be below data.window_tokens"),
    (["data.teacher_text.top_p=0"], "0 < top_p <= 1"),
    (["data.teacher_text.samples_per_window=0"], "samples_per_window must be at least 1"),
])
def test_settings_that_cannot_write_are_refused_by_the_config(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        text_config(tmp_path, tmp_path / "text", *overrides, corpus=write_corpus(tmp_path / "corpus"))


def test_teacher_text_is_refused_for_conversations(tmp_path):
    with pytest.raises(ConfigError, match="data.teacher_text is for plain text"):
        tiny_config(tmp_path, "data.source=python-stdlib-chat:*path.py", "data.format=messages",
                    f"data.teacher_text.dir={tmp_path}", "data.max_train_windows=4")
