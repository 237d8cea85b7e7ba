"""Conversations as dual windows: each model's own chat template, the loss mask, the pairs at response bytes.

Each model renders a conversation with its own chat template (`apply_chat_template`), so teacher and student
condition on the formatting they were trained with. The contents of the turns are the same bytes in both renderings:
a token is placed by its offset into the turn it belongs to, in *content coordinates* (the turn contents laid end to
end, identical on both sides), and template tokens take part as context only.

- Tokens: the rendering is cut into template pieces and turn contents; a template piece is tokenised with the
  tokenizer's special tokens recognised (`<|im_start|>` is one token), a content as plain text (a special-token string
  typed in a turn stays text). A content therefore always starts and ends at a token boundary on both sides.
- Loss mask: the student positions whose next token is in a response (the conversation's `responses`: its assistant
  turns, of a prompt-completion row the completion's), or is the end of a response (the template tokens after it up
  to and including the first special token: `<|im_end|>`, `<|eot_id|>`). With `data.chat.train_on_prompts` every
  position is trained.
- Pairs: (i, j) where student token i+1 and teacher token j+1 start at the same byte of the same trained content
  (a response; every turn with `train_on_prompts`), which includes each turn's first byte: both models are about to
  predict the same response byte. The end-of-turn prediction has no pair: the two end-of-turn tokens are
  special tokens that stand for no bytes, which no vocabulary transfer can map, so KD leaves it to the LM term.
  With `data.chat.kd_skip_turn_starts` the pair at each trained turn's first byte is left out too: there the teacher
  predicts how *its* answers start (a code fence, prose), which the data's answers need not share (docs/CHAT.md).
- Windows: one conversation per window, right-padded in the batch (no packing: attention never crosses
  conversations). A conversation of more than `window_tokens` student tokens is cut after its first `window_tokens`
  tokens (whole tokens), the teacher's after the same content byte; one with nothing left to train is skipped. Both
  are counted and reported in one warning per pass (`TruncationTally`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crosskd.config import ChatConfig
from crosskd.data.alignment import pairs_of_keys
from crosskd.data.chat import Conversation, Message
from crosskd.data.encoding import EncodedText, encode_with_byte_spans
from crosskd.data.windows import DualWindow

# Private-use characters no template touches: the rendering with each content replaced by a marker shows which text
# is the template's.
_MARKER = "\ue000{}\ue001"
_MARKER_PATTERN = re.compile("\ue000(\\d+)\ue001")
TEMPLATE_PIECE = -1  # the `message` of a token the template wrote


class ChatTemplateError(ValueError):
    """A model whose chat template cannot render the data: the message names the model and the fix."""


def chat_template_of(tokenizer, override: str | None, role: str) -> str:
    """The Jinja chat template a model renders with: `override` (Jinja text or a .jinja file), else its own."""
    if override and "{" in override:  # Jinja text: every template has a {{ ... }} or {% ... %}
        return override
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ChatTemplateError(f"data.chat.{role}_template is {override!r}, which is neither Jinja text nor an "
                                    "existing file; give the template itself or the path of its .jinja file")
        return path.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"the {role} tokenizer ({name}) has no chat template, so it cannot render conversations; give one with "
            f"data.chat.{role}_template (Jinja text or a .jinja file; e.g. the template of the instruct model it was "
            "tuned as), or train on plain text with data.format=text"
        )
    return template


@dataclass(frozen=True)
class EncodedConversation:
    """One model's tokens of a rendered conversation, each placed in content coordinates."""

    tokens: EncodedText  # ids and byte spans in the rendering
    message: np.ndarray  # int64 [n]: the turn whose content the token is in, TEMPLATE_PIECE for template tokens
    content_start: np.ndarray  # int64 [n]: content coordinate of the token's first byte (template: content before it)
    content_end: np.ndarray  # int64 [n]: content coordinate after the token; never decreases along the tokens
    end_of_turn: np.ndarray  # bool [n]: the tokens that close a response
    responses: np.ndarray  # int64: the rendered turns that are responses
    turns: int  # how many turns were rendered (a configured system prompt is turn 0)

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, count: int) -> EncodedConversation:
        tokens = EncodedText(self.tokens.ids[:count], self.tokens.byte_starts[:count], self.tokens.byte_ends[:count])
        return EncodedConversation(tokens, self.message[:count], self.content_start[:count], self.content_end[:count],
                                   self.end_of_turn[:count], self.responses, self.turns)

    def in_turns(self, turns: np.ndarray) -> np.ndarray:
        """bool [n]: the tokens in the contents of `turns` (message indices)."""
        return np.isin(self.message, turns)


class ChatRenderer:
    """One model's rendering of conversations: its template, the configured system prompt, its special tokens."""

    def __init__(self, tokenizer, chat: ChatConfig, role: str):
        self.tokenizer = tokenizer
        self.role = role
        self.template = chat_template_of(tokenizer, getattr(chat, f"{role}_template"), role)
        self.system_prompt = chat.system_prompt
        special = {token.content: token_id for token_id, token in
                   tokenizer.backend_tokenizer.get_added_tokens_decoder().items() if token.special}
        self.special_ids = np.array(sorted(special.values()), dtype=np.int64)
        self._special_ids_by_text = special
        longest_first = sorted(special, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, longest_first))) if special else None

    def messages(self, conversation: Conversation) -> tuple[Message, ...]:
        return self.with_system_prompt(conversation.messages)

    def with_system_prompt(self, messages: tuple[Message, ...]) -> tuple[Message, ...]:
        """The turns as rendered: with the configured system prompt first when they have none."""
        if self.system_prompt is not None and messages[0].role != "system":
            messages = (Message("system", self.system_prompt), *messages)
        return messages

    def prompt_ids(self, messages: tuple[Message, ...]) -> np.ndarray:
        """The tokens that ask the model for the next assistant turn after `messages` (the template's generation
        prompt; special-token strings are special tokens, as a tokenizer reads a prompt)."""
        return self._template(self.render(self.with_system_prompt(messages), add_generation_prompt=True)).ids

    def render(self, messages: Iterable[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": message.role, "content": message.content} for message in messages], chat_template=self.template,
            tokenize=False, add_generation_prompt=add_generation_prompt,
        )

    def pieces(self, conversation: Conversation, messages: tuple[Message, ...], responses: np.ndarray
               ) -> list[tuple[str, int]]:
        """The rendering as (text, turn) pieces: turn contents (their message index) and template text
        (TEMPLATE_PIECE); checked to be exactly the model's rendering of the conversation."""
        marked = self.render(Message(m.role, _MARKER.format(number)) for number, m in enumerate(messages))
        pieces: list[tuple[str, int]] = []
        cursor = 0
        for match in _MARKER_PATTERN.finditer(marked):
            pieces.append((marked[cursor : match.start()], TEMPLATE_PIECE))
            number = int(match.group(1))
            pieces.append((messages[number].content, number))
            cursor = match.end()
        pieces.append((marked[cursor:], TEMPLATE_PIECE))
        if "".join(text for text, _ in pieces) != self.render(messages):
            raise ChatTemplateError(
                f"{conversation.name}: the {self.role} chat template does not render the turns' contents verbatim (it "
                "rewrites, strips or depends on a content), so crosskd cannot find the response bytes in its "
                f"rendering; give a template that writes each content as it is with data.chat.{self.role}_template"
            )
        missing = sorted(set(responses.tolist()) - {turn for _, turn in pieces})
        if missing:
            raise ChatTemplateError(f"{conversation.name}: the {self.role} chat template leaves out assistant turn "
                                    f"{missing[0]}; give one that renders every turn with "
                                    f"data.chat.{self.role}_template")
        return [(text, turn) for text, turn in pieces if text]

    def encode(self, conversation: Conversation) -> EncodedConversation:
        """The model's tokens of `conversation` placed in content coordinates."""
        messages = self.messages(conversation)
        added = len(messages) - len(conversation.messages)  # a configured system prompt comes first
        responses = np.array(conversation.responses, dtype=np.int64) + added
        lengths = np.array([len(message.content.encode("utf-8")) for message in messages], dtype=np.int64)
        bases = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        ids, starts, ends, turns, content_starts, content_ends = [], [], [], [], [], []
        rendered_bytes, content_so_far = 0, 0
        for text, turn in self.pieces(conversation, messages, responses):
            encoded = encode_with_byte_spans(self.tokenizer, text) if turn != TEMPLATE_PIECE else self._template(text)
            ids.append(encoded.ids)
            starts.append(encoded.byte_starts + rendered_bytes)
            ends.append(encoded.byte_ends + rendered_bytes)
            turns.append(np.full(len(encoded), turn, dtype=np.int64))
            if turn == TEMPLATE_PIECE:
                content_starts.append(np.full(len(encoded), content_so_far, dtype=np.int64))
                content_ends.append(content_starts[-1])
            else:
                content_starts.append(encoded.byte_starts + bases[turn])
                content_ends.append(encoded.byte_ends + bases[turn])
                content_so_far = int(bases[turn] + lengths[turn])
            rendered_bytes += len(text.encode("utf-8"))
        tokens = EncodedText(*(np.concatenate(part) for part in (ids, starts, ends)))
        message, content_ends = np.concatenate(turns), np.concatenate(content_ends)
        if (np.diff(content_ends) < 0).any():
            raise ChatTemplateError(f"{conversation.name}: the {self.role} chat template renders the turns out of "
                                    "order or one of them twice, so their bytes cannot be paired with the other "
                                    f"model's; give a template with data.chat.{self.role}_template")
        return EncodedConversation(tokens, message, np.concatenate(content_starts), content_ends,
                                   self._end_of_turn(tokens.ids, message, responses), responses, len(messages))

    def _template(self, text: str) -> EncodedText:
        """A template piece: special-token strings are the special token (their span is their text), the rest text."""
        ids, starts, ends, cursor, offset = [], [], [], 0, 0
        matches = self._special_pattern.finditer(text) if self._special_pattern else ()
        for match in [*matches, None]:
            stop = match.start() if match else len(text)
            if stop > cursor:
                plain = encode_with_byte_spans(self.tokenizer, text[cursor:stop])
                ids.append(plain.ids)
                starts.append(plain.byte_starts + offset)
                ends.append(plain.byte_ends + offset)
                offset += len(text[cursor:stop].encode("utf-8"))
            if match:
                width = len(match.group().encode("utf-8"))
                ids.append(np.array([self._special_ids_by_text[match.group()]], dtype=np.int64))
                starts.append(np.array([offset], dtype=np.int64))
                ends.append(np.array([offset + width], dtype=np.int64))
                offset += width
                cursor = match.end()
        if not ids:
            return EncodedText(*(np.zeros(0, dtype=np.int64) for _ in range(3)))
        return EncodedText(*(np.concatenate(part) for part in (ids, starts, ends)))

    def _end_of_turn(self, ids: np.ndarray, message: np.ndarray, responses: np.ndarray) -> np.ndarray:
        """The template tokens after each response up to and including the first special token (only the first
        template token when no special token follows before the next content)."""
        end_of_turn = np.zeros(len(ids), dtype=bool)
        last_of_content = np.flatnonzero((message[:-1] != TEMPLATE_PIECE) & (message[1:] == TEMPLATE_PIECE))
        for position in last_of_content:
            if message[position] not in responses:
                continue
            following = position + 1
            while following < len(ids) and message[following] == TEMPLATE_PIECE:
                end_of_turn[following] = True
                if ids[following] in self.special_ids:
                    break
                following += 1
            else:
                end_of_turn[position + 2 : following] = False  # no special token: the first template token only
        return end_of_turn


@dataclass(frozen=True)
class ScoredSequence:
    """A model's tokens of a held-out conversation for responses-only evaluation: position i is scored when token
    i+1 is in a response; `scored_bytes` are those tokens' bytes."""

    ids: np.ndarray  # int64 [n]
    scored: np.ndarray  # bool [n]
    scored_bytes: int


@dataclass(frozen=True)
class DualConversation:
    """A conversation in one window: both models' tokens (cut to the window), whether prompts train, whether it was
    cut."""

    student: EncodedConversation
    teacher: EncodedConversation
    train_on_prompts: bool
    truncated: bool
    kd_skip_turn_starts: bool = False

    @property
    def trained_turns(self) -> np.ndarray:
        """The turns whose contents are trained and paired: the responses, or every turn with `train_on_prompts`."""
        return np.arange(self.student.turns) if self.train_on_prompts else self.student.responses

    def student_loss_mask(self) -> np.ndarray:
        return loss_mask(self.student, self.train_on_prompts)

    def window(self) -> DualWindow:
        keyed = [_next_token_keys(side, self.trained_turns) for side in (self.student, self.teacher)]
        if self.kd_skip_turn_starts:
            keyed[0] = _without_turn_starts(self.student, self.trained_turns, *keyed[0])
        pairs = pairs_of_keys(self.student.tokens, self.teacher.tokens, *keyed[0], *keyed[1])
        in_response = self.student.in_turns(self.student.responses)
        student_bytes = self.student.tokens.byte_ends - self.student.tokens.byte_starts
        return DualWindow(student_ids=self.student.tokens.ids, teacher_ids=self.teacher.tokens.ids, pairs=pairs,
                          text_bytes=int(student_bytes[in_response].sum()),
                          student_loss_mask=self.student_loss_mask())

    def scored(self, side: str) -> ScoredSequence:
        encoded: EncodedConversation = getattr(self, side)
        in_response = encoded.in_turns(encoded.responses)
        token_bytes = encoded.tokens.byte_ends - encoded.tokens.byte_starts
        return ScoredSequence(encoded.tokens.ids, np.append(in_response[1:], False),
                              int(token_bytes[1:][in_response[1:]].sum()))


def loss_mask(encoded: EncodedConversation, train_on_prompts: bool) -> np.ndarray:
    """bool [n]: the positions whose next token is trained: in a response or an end of turn (every position with
    `train_on_prompts`)."""
    if train_on_prompts:
        return np.ones(len(encoded), dtype=bool)
    trained = encoded.in_turns(encoded.responses) | encoded.end_of_turn
    return np.append(trained[1:], False)


def _next_token_keys(encoded: EncodedConversation, turns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(key, position) for each position whose next token is in the content of `turns`, keyed by that token's
    content coordinate (2 x start + has bytes, as crosskd.data.alignment keys stream bytes); first occurrences."""
    positions = np.flatnonzero(encoded.in_turns(turns)[1:])
    starts, ends = encoded.content_start[positions + 1], encoded.content_end[positions + 1]
    keys, first = np.unique(2 * starts + (ends > starts), return_index=True)
    return keys, positions[first].astype(np.int64)


def _without_turn_starts(encoded: EncodedConversation, turns: np.ndarray, keys: np.ndarray,
                         positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_next_token_keys`' keys and positions less those of each turn's first content byte (a token with bytes
    there: key 2 x start + 1)."""
    starts = [encoded.content_start[np.flatnonzero(encoded.message == turn)[0]] for turn in turns
              if (encoded.message == turn).any()]
    kept = ~np.isin(keys, 2 * np.asarray(starts, dtype=np.int64) + 1)
    return keys[kept], positions[kept]


def dual_conversation(conversation: Conversation, student: ChatRenderer, teacher: ChatRenderer, window_tokens: int,
                      train_on_prompts: bool, kd_skip_turn_starts: bool = False) -> DualConversation:
    """Both models' tokens of `conversation`, the student's cut after `window_tokens` tokens and the teacher's after
    the same content byte (its tokens that end no later than the student's last kept one)."""
    student_tokens, teacher_tokens = student.encode(conversation), teacher.encode(conversation)
    truncated = len(student_tokens) > window_tokens
    if truncated:
        student_tokens = student_tokens.head(window_tokens)
        last_byte = student_tokens.content_end[-1]
        teacher_tokens = teacher_tokens.head(int(np.searchsorted(teacher_tokens.content_end, last_byte, "right")))
    return DualConversation(student_tokens, teacher_tokens, train_on_prompts, truncated, kd_skip_turn_starts)


@dataclass
class TruncationTally:
    """Conversations of one pass that were cut to the window, and those that kept nothing to train (skipped)."""

    window_tokens: int
    conversations: int = 0
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)

    def count(self, truncated: bool, trains: bool, name: str) -> None:
        self.conversations += 1
        self.truncated += truncated
        if not trains:
            self.skipped.append(name)

    def warn(self, what: str) -> None:
        if self.truncated:
            skipped = (f"; {len(self.skipped)} of them kept no response token and were skipped (first: "
                       f"{self.skipped[0]})" if self.skipped else "")
            warnings.warn(
                f"{what}: {self.truncated} of {self.conversations} conversation(s) are longer than "
                f"data.window_tokens={self.window_tokens} student tokens and were cut after their first "
                f"{self.window_tokens} tokens (the rest of them is not trained){skipped}; raise data.window_tokens "
                "to keep them whole",
                stacklevel=2,
            )


class ChatWindows:
    """The dual windows of conversations for one run: both renderers, the window size, the prompt switch."""

    def __init__(self, chat: ChatConfig, student_tokenizer, teacher_tokenizer, window_tokens: int):
        self.student = ChatRenderer(student_tokenizer, chat, "student")
        self.teacher = ChatRenderer(teacher_tokenizer, chat, "teacher")
        self.window_tokens = window_tokens
        self.train_on_prompts = chat.train_on_prompts
        self.kd_skip_turn_starts = chat.kd_skip_turn_starts

    def dual(self, conversation: Conversation) -> DualConversation:
        return dual_conversation(conversation, self.student, self.teacher, self.window_tokens, self.train_on_prompts,
                                 self.kd_skip_turn_starts)

    def windows(self, conversations: Iterable[Conversation], what: str) -> Iterator[DualWindow]:
        """One window per conversation that has a trained position left in the window; the pass's cuts and skips
        are reported in one warning at its end."""
        tally = TruncationTally(self.window_tokens)
        for conversation in conversations:
            dual = self.dual(conversation)
            window = dual.window()
            trains = bool(window.student_loss_mask[:-1].any())
            tally.count(dual.truncated, trains, conversation.name)
            if trains:
                yield window
        tally.warn(what)

    def survey(self, conversations: Iterable[Conversation]) -> TruncationTally:
        """The cuts and skips of a pass, from the student's tokens alone (what decides them)."""
        tally = TruncationTally(self.window_tokens)
        for conversation in conversations:
            tokens = self.student.encode(conversation)
            trains = loss_mask(tokens.head(self.window_tokens), self.train_on_prompts)[:-1].any()
            tally.count(len(tokens) > self.window_tokens, bool(trains), conversation.name)
        return tally

