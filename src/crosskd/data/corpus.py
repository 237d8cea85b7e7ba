"""The run's text as the loop sees it: a held-out text, and an endless, deterministic stream of training windows.

Epoch e shuffles the training documents (in the source's own deterministic order: sorted paths for files and the
stdlib, row order for datasets) with `random.Random(seed + e)`: with seed 0 the first epoch
is exactly the benchmark protocol's window order. The stream is one global sequence of windows; each optimizer step
takes `batch_size x accumulation x processes` consecutive windows and process p reads its own slice of each
micro-batch, so the data position of a resumed run is a single number (`windows_consumed`). With
`data.max_train_windows` the stream is the first epoch's first windows, repeated in a new seeded order each epoch.

Teacher-written text (`data.teacher_text.dir`, data/teacher_text.py) joins the stream: without a window limit its
continuations are documents shuffled in with the corpus's own each epoch; with one, its windows (all of them, beyond
the limit) are shuffled in with the kept windows, the first epoch included.

Conversations (`data.format` messages / prompt-completion, docs/CHAT.md) take the place of documents: one window per
conversation (data/chat_windows.py), the same seeded split, shuffle and stream; every training conversation is
rendered once by the student when the corpus is built (about 5 ms each), which counts the conversations the window
cuts before the first step. Their held-out evaluation is on the responses only (`heldout_sequences`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from crosskd.config import DataConfig, TrainingConfig
from crosskd.data.chat import Conversation, load_conversations
from crosskd.data.chat_windows import ChatWindows, DualConversation, ScoredSequence
from crosskd.data.collate import DualBatch, collate_windows
from crosskd.data.encoding import encode_with_byte_spans
from crosskd.data.sources import Document, load_documents, split_documents
from crosskd.data.teacher_text import load_teacher_text
from crosskd.data.windows import DualWindow, dual_windows

TEXT_FORMAT = "text"

EVAL_WINDOWS = 8  # held-out windows for knowledge-retention metrics
# Training windows for fitting what must be sane before step 0: the projector's pre-fit (about 10,000 aligned pairs
# on the reference pair; 16 windows were too few to learn anything that held out, docs/VOCAB.md) and the router's
# hidden-state statistics.
PREPARATION_WINDOWS = 48


def load_corpus_documents(data: DataConfig) -> list[Document] | list[Conversation]:
    """The documents of `data.source`, or its conversations when `data.format` is conversational."""
    if data.format == TEXT_FORMAT:
        return load_documents(data.source, text_field=data.text_field)
    return load_conversations(data.source, data.format, data.chat)


def heldout_names(documents, names: list[str]) -> list[str]:
    """The names of the held-out documents: `names`, where a conversation is also held out by its group (its file
    or module), so that naming a file holds out all its rows."""
    groups = {getattr(document, "group", None) for document in documents} - {None}
    wanted = set(names) & groups
    by_group = [document.name for document in documents if getattr(document, "group", None) in wanted]
    return [name for name in names if name not in wanted] + by_group


def windows_per_step(training: TrainingConfig, num_processes: int) -> int:
    """Windows one optimizer step reads from the global stream: every micro-batch of every process."""
    return training.batch_size * training.gradient_accumulation_steps * num_processes


class TrainingCorpus:
    def __init__(self, data: DataConfig, student_tokenizer, teacher_tokenizer, teacher_pad_id: int):
        self.config = data
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_pad_id = teacher_pad_id
        self.chat = (None if data.format == TEXT_FORMAT else
                     ChatWindows(data.chat, student_tokenizer, teacher_tokenizer, data.window_tokens))
        documents = load_corpus_documents(data)
        train, held_out = split_documents(documents, data.eval_fraction, data.seed,
                                          heldout_names(documents, data.heldout_documents))
        if not train:
            raise ValueError(f"data.source {data.source!r} leaves no training documents after the held-out split; "
                             "add documents or reduce data.heldout_documents / data.eval_fraction")
        self.train_documents = list(train)
        self.teacher_documents = [] if data.teacher_text.dir is None else load_teacher_text(data.teacher_text.dir)
        self.heldout_documents = _in_requested_order(held_out, data.heldout_documents)
        self.conversation_tally = None
        self._heldout_conversations: list[DualConversation] | None = None
        if self.chat is not None:
            self.conversation_tally = self.chat.survey(self.train_documents)
            self.conversation_tally.warn(f"data.source {data.source!r}")

    def _windows_of(self, documents, what: str) -> Iterator[DualWindow]:
        """The windows of `documents`; `what` names them in a conversational pass's truncation warning."""
        if self.chat is not None:
            return self.chat.windows(documents, what)
        return dual_windows(documents, self.student_tokenizer, self.teacher_tokenizer, self.config.window_tokens)

    def heldout_conversations(self) -> list[DualConversation]:
        """The held-out conversations in their windows (in order, while their turns total at most
        `data.eval_max_chars` characters; always at least one)."""
        if self._heldout_conversations is None:
            limit, characters, kept = self.config.eval_max_chars, 0, []
            for conversation in self.heldout_documents:
                characters += sum(len(message.content) for message in conversation.messages)
                if kept and limit is not None and characters > limit:
                    break
                kept.append(self.chat.dual(conversation))
            self._heldout_conversations = kept
        return self._heldout_conversations

    def heldout_sequences(self, side: str) -> list[ScoredSequence]:
        """Responses-only evaluation of the `side` ("student" or "teacher") model: its tokens of each held-out
        conversation, scored at the assistant contents."""
        return [dual.scored(side) for dual in self.heldout_conversations()]

    def eval_text(self) -> str:
        text = "".join(document.text for document in self.heldout_documents)
        return text if self.config.eval_max_chars is None else text[: self.config.eval_max_chars]

    def _epoch_documents(self, epoch: int, with_teacher_text: bool) -> list[Document]:
        documents = self.train_documents + (self.teacher_documents if with_teacher_text else [])
        random.Random(self.config.seed + epoch).shuffle(documents)
        return documents

    def _epoch_windows(self, epoch: int, with_teacher_text: bool = False) -> Iterator[DualWindow]:
        return self._windows_of(self._epoch_documents(epoch, with_teacher_text),
                                f"training conversations (epoch {epoch})")

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
                windows = self._epoch_windows(epoch, with_teacher_text=True)
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
        kept += self._windows_of(self.teacher_documents, "teacher text")
        if not self.teacher_documents:
            yield from kept  # the first epoch in the stream's order, as the benchmark protocol reads it
        for epoch in itertools.count(1 if not self.teacher_documents else 0):
            order = list(range(len(kept)))
            random.Random(self.config.seed + epoch).shuffle(order)
            yield from (kept[index] for index in order)

    def stream_windows(self, count: int) -> list[DualWindow]:
        """The first `count` windows of the training stream (fewer where a limited corpus has fewer)."""
        return list(itertools.islice(self._all_windows(), count))

    def count_train_windows(self) -> int:
        """Windows in one epoch (tokenises the training documents with the student once; a conversation is one
        window unless it was skipped), teacher-written text included."""
        if self.conversation_tally is not None:
            windows = self.conversation_tally.conversations - len(self.conversation_tally.skipped)
        else:
            windows = self._windows_in(self.train_documents)
        limit = self.config.max_train_windows
        if limit is not None:
            windows = min(windows, limit)
        return windows + self._windows_in(self.teacher_documents)

    def _windows_in(self, documents: list[Document]) -> int:
        tokens = sum(len(encode_with_byte_spans(self.student_tokenizer, d.text)) + 1 for d in documents)
        return tokens // self.config.window_tokens

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
        """A few held-out windows (the start of the held-out text, or the first held-out conversations) for
        knowledge-retention metrics."""
        documents = self.heldout_documents if self.chat is not None else [Document("held-out", self.eval_text())]
        return self._batches(documents, EVAL_WINDOWS, batch_size, device, "held-out conversations")

    def preparation_batches(self, batch_size: int, device) -> list[DualBatch]:
        """Training windows from a shuffle of their own (seed - 1), so the first training steps do not repeat them."""
        documents = list(self.train_documents)
        random.Random(self.config.seed - 1).shuffle(documents)
        return self._batches(documents, PREPARATION_WINDOWS, batch_size, device, "preparation conversations")

    def _batches(self, documents, count: int, batch_size: int, device, what: str) -> list[DualBatch]:
        windows = list(itertools.islice(self._windows_of(documents, what), count))
        return [collate_windows(windows[i : i + batch_size], self.teacher_pad_id).to(device)
                for i in range(0, len(windows), batch_size)]


def _in_requested_order(documents: list[Document], names: list[str]) -> list[Document]:
    """Documents in the order `names` lists them (a conversation by its name or its group), the rest by name."""
    rank = {name: index for index, name in enumerate(names)}

    def order(document) -> tuple[int, str]:
        place = rank.get(document.name, rank.get(getattr(document, "group", None), len(rank)))
        return place, document.name

    return sorted(documents, key=order)
