"""The run's text as the loop sees it: a held-out text, and an endless, deterministic stream of training windows.

Epoch e shuffles the training documents (in the source's own deterministic order: sorted paths for files and the
stdlib, row order for datasets) with `random.Random(seed + e)`: with seed 0 the first epoch
is exactly the benchmark protocol's window order. The stream is one global sequence of windows; each optimizer step
takes `batch_size x accumulation x processes` consecutive windows and process p reads its own slice of each
micro-batch, so the data position of a resumed run is a single number (`windows_consumed`). With
`data.max_train_windows` the stream is the first epoch's first windows, repeated in a new seeded order each epoch.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from crosskd.config import DataConfig, TrainingConfig
from crosskd.data.collate import DualBatch, collate_windows
from crosskd.data.encoding import encode_with_byte_spans
from crosskd.data.sources import Document, load_documents, split_documents
from crosskd.data.windows import DualWindow, dual_windows

EVAL_WINDOWS = 8  # held-out windows for knowledge-retention metrics
# Training windows for fitting what must be sane before step 0: the projector's pre-fit (about 10,000 aligned pairs
# on the reference pair; 16 windows were too few to learn anything that held out, docs/VOCAB.md) and the router's
# hidden-state statistics.
PREPARATION_WINDOWS = 48


def windows_per_step(training: TrainingConfig, num_processes: int) -> int:
    """Windows one optimizer step reads from the global stream: every micro-batch of every process."""
    return training.batch_size * training.gradient_accumulation_steps * num_processes


class TrainingCorpus:
    def __init__(self, data: DataConfig, student_tokenizer, teacher_tokenizer, teacher_pad_id: int):
        self.config = data
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_pad_id = teacher_pad_id
        documents = load_documents(data.source, text_field=data.text_field)
        train, held_out = split_documents(documents, data.eval_fraction, data.seed, data.heldout_documents)
        if not train:
            raise ValueError(f"data.source {data.source!r} leaves no training documents after the held-out split; "
                             "add documents or reduce data.heldout_documents / data.eval_fraction")
        self.train_documents = list(train)
        self.heldout_documents = _in_requested_order(held_out, data.heldout_documents)

    def eval_text(self) -> str:
        text = "".join(document.text for document in self.heldout_documents)
        return text if self.config.eval_max_chars is None else text[: self.config.eval_max_chars]

    def _epoch_documents(self, epoch: int) -> list[Document]:
        documents = list(self.train_documents)
        random.Random(self.config.seed + epoch).shuffle(documents)
        return documents

    def _epoch_windows(self, epoch: int) -> Iterator[DualWindow]:
        return dual_windows(self._epoch_documents(epoch), self.student_tokenizer, self.teacher_tokenizer,
                            self.config.window_tokens)

    def check_training_window(self) -> None:
        """Raise before the first step when the training documents give no window: the endless stream would
        otherwise wait for one forever. Reads only as far as the first window."""
        next(self._all_windows())

    def check_heldout_window(self) -> None:
        """Raise before the first step when the held-out text gives no window: the retention metrics of every
        evaluation, the final one included, read held-out windows."""
        if not self.eval_batches(batch_size=1, device="cpu"):
            raise ValueError(
                f"the held-out text ({len(self.eval_text()):,} characters) gives no window of "
                f"data.window_tokens={self.config.window_tokens} student tokens, which evaluation needs; lower "
                "data.window_tokens or hold out more text (data.heldout_documents, data.eval_fraction, "
                "data.eval_max_chars)"
            )

    def _no_window_error(self) -> ValueError:
        characters = sum(len(document.text) for document in self.train_documents)
        return ValueError(
            f"the training documents ({len(self.train_documents)}, {characters:,} characters) give no window of "
            f"data.window_tokens={self.config.window_tokens} student tokens; add training text, lower "
            "data.window_tokens, or hold out fewer documents (data.heldout_documents, data.eval_fraction)"
        )

    def _all_windows(self) -> Iterator[DualWindow]:
        limit = self.config.max_train_windows
        if limit is None:
            for epoch in itertools.count():
                windows = self._epoch_windows(epoch)
                first = next(windows, None)
                if first is None:  # every epoch holds the same documents: none will ever give a window
                    raise self._no_window_error()
                yield first
                yield from windows
            return
        # A small corpus: the first epoch's first `limit` windows, then the same windows again in a new order each
        # epoch (seeded, so a resumed run reads what the straight run read).
        kept = list(itertools.islice(self._epoch_windows(0), limit))
        if not kept:
            raise self._no_window_error()
        yield from kept
        for epoch in itertools.count(1):
            order = list(range(len(kept)))
            random.Random(self.config.seed + epoch).shuffle(order)
            yield from (kept[index] for index in order)

    def count_train_windows(self) -> int:
        """Windows in one epoch (tokenises the training documents with the student once)."""
        tokens = sum(len(encode_with_byte_spans(self.student_tokenizer, d.text)) + 1 for d in self.train_documents)
        windows = tokens // self.config.window_tokens
        limit = self.config.max_train_windows
        return windows if limit is None else min(windows, limit)

    def optimizer_steps(self, training: TrainingConfig, windows_per_step: int) -> int:
        """The run's length in optimizer steps: training.max_steps, or training.epochs over the training windows."""
        return training.max_steps or training.epochs * max(1, self.count_train_windows() // windows_per_step)

    def train_windows(self, start: int, process_index: int, num_processes: int,
                      batch_size: int) -> Iterator[list[DualWindow]]:
        """This process's micro-batches, starting after `start` windows of the global stream."""
        stream = itertools.islice(self._all_windows(), start, None)
        group = batch_size * num_processes
        while True:
            windows = list(itertools.islice(stream, group))
            yield windows[process_index * batch_size : (process_index + 1) * batch_size]

    def eval_batches(self, batch_size: int, device) -> list[DualBatch]:
        """A few held-out windows (the start of the held-out text) for knowledge-retention metrics."""
        documents = [Document("held-out", self.eval_text())]
        return self._batches(documents, EVAL_WINDOWS, batch_size, device)

    def preparation_batches(self, batch_size: int, device) -> list[DualBatch]:
        """Training windows from a shuffle of their own (seed - 1), so the first training steps do not repeat them."""
        documents = list(self.train_documents)
        random.Random(self.config.seed - 1).shuffle(documents)
        return self._batches(documents, PREPARATION_WINDOWS, batch_size, device)

    def _batches(self, documents, count: int, batch_size: int, device) -> list[DualBatch]:
        windows = list(itertools.islice(
            dual_windows(documents, self.student_tokenizer, self.teacher_tokenizer, self.config.window_tokens), count
        ))
        return [collate_windows(windows[i : i + batch_size], self.teacher_pad_id).to(device)
                for i in range(0, len(windows), batch_size)]


def _in_requested_order(documents: list[Document], names: list[str]) -> list[Document]:
    rank = {name: index for index, name in enumerate(names)}
    return sorted(documents, key=lambda document: (rank.get(document.name, len(rank)), document.name))
