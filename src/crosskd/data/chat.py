"""Conversations: instruction data as the trainers of TRL take it, read from rows and checked before any training.

Two row formats (`data.format`): `messages` (a list of `{role, content}` turns: system, user, assistant, several turns
allowed; every assistant turn is a response) and `prompt-completion` (`prompt` and `completion`, each a string or a
list of turns; a string prompt is one user turn, a string completion one assistant turn; the responses are the
completion's assistant turns, so assistant turns in the prompt, e.g. few-shot examples, are context). Field names are `data.chat`'s. Rows come from any row-based
source (`crosskd.data.sources.iter_records`) or the built-in `python-stdlib-chat` set (data/stdlib_chat.py). Every
row is parsed when the corpus is built, so a bad row stops the run before its first step, naming the row and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from crosskd.config import ChatConfig, is_stdlib_chat_source
from crosskd.data.sources import Record, iter_records

ROLES = ("system", "user", "assistant")
ASSISTANT = "assistant"
MESSAGES_FORMAT = "messages"
PROMPT_COMPLETION_FORMAT = "prompt-completion"


class ChatDataError(ValueError):
    """A conversational row that cannot be trained on: the message names the row and the fix."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    name: str  # where the row is: `file:line`, `file#row`, `dataset[split]#row`, `module.py:function`
    group: str  # the file, dataset or module it belongs to (data.heldout_documents may name it: all its rows)
    messages: tuple[Message, ...]
    responses: tuple[int, ...]  # the assistant turns that are trained (indices into `messages`)

    @property
    def text(self) -> str:
        """The conversation as canonical JSON: what fingerprints hash (crosskd.models.fingerprints.documents_hash)."""
        return json.dumps([[message.role, message.content] for message in self.messages], ensure_ascii=False)


def iter_conversations(source: str, row_format: str, chat: ChatConfig, split: str | None = None
                       ) -> Iterator[Conversation]:
    """The conversations of `source`, one per row, each checked (`ChatDataError` names the row and the fix)."""
    from crosskd.data import stdlib_chat  # here, not at the top: stdlib_chat builds on this module

    if is_stdlib_chat_source(source):
        yield from stdlib_chat.stdlib_conversations(source)
        return
    for record in iter_records(source, split):
        yield conversation_of(record, row_format, chat)


def load_conversations(source: str, row_format: str, chat: ChatConfig, split: str | None = None
                       ) -> list[Conversation]:
    conversations = list(iter_conversations(source, row_format, chat, split))
    if not conversations:
        raise ChatDataError(f"source {source!r} gave no conversations (no .jsonl or .parquet rows); point data.source "
                            "at files or a dataset that hold them")
    return conversations


def conversation_of(record: Record, row_format: str, chat: ChatConfig) -> Conversation:
    """One row as a checked conversation."""
    where, fields = record.where, record.fields
    if not isinstance(fields, dict):
        raise ChatDataError(f"{where}: the row is {type(fields).__name__}, not an object; each row is one object "
                            f"with a {chat.messages_field!r} field (or {chat.prompt_field!r} and "
                            f"{chat.completion_field!r})")
    if row_format == MESSAGES_FORMAT:
        messages = _turns(_field(fields, chat.messages_field, where, "data.chat.messages_field", row_format), where,
                          chat, chat.messages_field)
        responses = _assistant_turns(messages, 0)
    elif row_format == PROMPT_COMPLETION_FORMAT:
        prompt = _side(_field(fields, chat.prompt_field, where, "data.chat.prompt_field", row_format), "user", where,
                       chat, chat.prompt_field)
        completion = _side(_field(fields, chat.completion_field, where, "data.chat.completion_field", row_format),
                           ASSISTANT, where, chat, chat.completion_field)
        messages, responses = prompt + completion, _assistant_turns(completion, len(prompt))
    else:
        raise ChatDataError(f"data.format is {row_format!r}: conversations are read with {MESSAGES_FORMAT!r} or "
                            f"{PROMPT_COMPLETION_FORMAT!r}")
    _require_trainable(messages, responses, where)
    return Conversation(where, record.group, messages, responses)


def _assistant_turns(messages: tuple[Message, ...], first: int) -> tuple[int, ...]:
    return tuple(first + number for number, message in enumerate(messages) if message.role == ASSISTANT)


def _field(fields: dict, name: str, where: str, key: str, row_format: str):
    if name not in fields:
        other = ("data.format=prompt-completion for prompt/completion rows" if row_format == MESSAGES_FORMAT
                 else "data.format=messages for rows with a list of turns")
        raise ChatDataError(f"{where} has no {name!r} field (its fields: {sorted(fields)}); name the right one with "
                            f"{key}, or use {other}")
    return fields[name]


def _side(value, role: str, where: str, chat: ChatConfig, field_name: str) -> tuple[Message, ...]:
    """A prompt or completion: a string is one turn of `role`, a list is turns."""
    if isinstance(value, str):
        return (Message(role, value),)
    return _turns(value, where, chat, field_name)


def _turns(value, where: str, chat: ChatConfig, field_name: str) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise ChatDataError(f"{where}: field {field_name!r} holds {type(value).__name__}, not a list of turns; each "
                            f"turn is an object {{{chat.role_field!r}: ..., {chat.content_field!r}: ...}}")
    messages = []
    for number, turn in enumerate(value):
        if not isinstance(turn, dict) or chat.role_field not in turn or chat.content_field not in turn:
            keys = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise ChatDataError(f"{where}: turn {number} of {field_name!r} is not an object with {chat.role_field!r} "
                                f"and {chat.content_field!r} (it has {keys}); name the keys with "
                                "data.chat.role_field and data.chat.content_field")
        role, content = turn[chat.role_field], turn[chat.content_field]
        if role not in ROLES:
            raise ChatDataError(f"{where}: turn {number} has role {role!r}; crosskd trains on the roles "
                                f"{', '.join(ROLES)} (tool turns are not supported): rename the role or drop the row")
        if not isinstance(content, str):
            raise ChatDataError(f"{where}: turn {number} ({role}) has content of type {type(content).__name__}, not "
                                "a string (content parts such as images are not supported); give its text as a string")
        messages.append(Message(role, content))
    return tuple(messages)


def _require_trainable(messages: tuple[Message, ...], responses: tuple[int, ...], where: str) -> None:
    if not responses:
        raise ChatDataError(f"{where}: the conversation has no assistant turn, so it has no response to train on; add "
                            "the response (role 'assistant') or drop the row")
    for number in responses:
        if not messages[number].content:
            raise ChatDataError(f"{where}: assistant turn {number} is empty, which would teach the model to answer "
                                "with nothing; give its response text or drop the row")
