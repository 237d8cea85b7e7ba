"""Conversational data: rows, each model's own chat template, the response-only mask, the pairs, truncation, errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from crosskd.config import ChatConfig, load_config
from crosskd.data.chat import ChatDataError, Conversation, Message, load_conversations
from crosskd.data.chat_windows import ChatTemplateError, ChatWindows, DualConversation, TEMPLATE_PIECE
from crosskd.data.collate import IGNORE_INDEX, collate_windows
from crosskd.data.corpus import heldout_names
from crosskd.data.stdlib_chat import stdlib_conversations
from crosskd.losses.selection import select_positions
from crosskd.testing.tiny_models import tiny_student_tokenizer, tiny_teacher_tokenizer
from crosskd.testing.tiny_tokenizers import (
    STUDENT_CHAT_TEMPLATE,
    TEACHER_CHAT_TEMPLATE,
    byte_level_bpe,
    sentencepiece_like,
    with_chat_template,
)

CONVERSATION = Conversation("chat.jsonl:1", "chat.jsonl", (
    Message("user", "Write fibonacci."),
    Message("assistant", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"),
    Message("user", "And in one word? 🎉"),
    Message("assistant", "Straße, naïve 日本語 👍🏽 <|endoftext|> done."),
), responses=(1, 3))


def _pairs_of_tokenizers():
    """(student, teacher) tokenizers with two different chat templates: the tiny pair, and a SentencePiece-style
    student (byte fallback, Metaspace) against the tiny teacher."""
    return [
        (tiny_student_tokenizer(), tiny_teacher_tokenizer()),
        (with_chat_template(sentencepiece_like(400), STUDENT_CHAT_TEMPLATE), tiny_teacher_tokenizer()),
    ]


def _rendering(dual: DualConversation, side: str) -> bytes:
    windows = ChatWindows(ChatConfig(), *(_pairs_of_tokenizers()[0]), 10_000)
    renderer = windows.student if side == "student" else windows.teacher
    return renderer.render(renderer.messages(CONVERSATION)).encode("utf-8")


def _assistant_bytes(conversation: Conversation) -> bytes:
    return b"".join(m.content.encode("utf-8") for m in conversation.messages if m.role == "assistant")


def _spans(tokens, positions) -> list[tuple[int, int]]:
    return [(int(tokens.byte_starts[p]), int(tokens.byte_ends[p])) for p in positions]


@pytest.mark.parametrize("pair", range(2))
def test_the_loss_mask_covers_exactly_the_assistant_bytes_and_each_end_of_turn(pair):
    student, teacher = _pairs_of_tokenizers()[pair]
    dual = ChatWindows(ChatConfig(), student, teacher, 10_000).dual(CONVERSATION)
    mask = dual.window().student_loss_mask
    trained_tokens = np.flatnonzero(mask[:-1]) + 1
    encoded = dual.student
    rendering = student.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONVERSATION.messages], tokenize=False).encode("utf-8")
    in_content = [t for t in trained_tokens if encoded.message[t] != TEMPLATE_PIECE]
    assert b"".join(rendering[s:e] for s, e in _spans(encoded.tokens, in_content)) == _assistant_bytes(CONVERSATION)
    end_of_turn = [t for t in trained_tokens if encoded.message[t] == TEMPLATE_PIECE]
    assert [int(encoded.tokens.ids[t]) for t in end_of_turn] == [student.convert_tokens_to_ids("<|endoftext|>")] * 2
    # The user's turns, the template and the default system prompt are context only.
    assert not mask[: np.flatnonzero(encoded.message == 1)[0] - 1].any()


@pytest.mark.parametrize("pair", range(2))
def test_pairs_are_response_positions_whose_next_bytes_match_on_both_sides(pair):
    student, teacher = _pairs_of_tokenizers()[pair]
    windows = ChatWindows(ChatConfig(), student, teacher, 10_000)
    dual = windows.dual(CONVERSATION)
    pairs = dual.window().pairs
    renderings = {side: renderer.render(renderer.messages(CONVERSATION)).encode("utf-8")
                  for side, renderer in (("student", windows.student), ("teacher", windows.teacher))}
    assert len(pairs) > 10
    for i, j in zip(pairs.student_pos, pairs.teacher_pos):
        s_next, t_next = i + 1, j + 1
        turn = dual.student.message[s_next]
        assert turn in (1, 3) and dual.teacher.message[t_next] == turn  # assistant turns only
        assert dual.student.content_start[s_next] == dual.teacher.content_start[t_next]
        rest = len(CONVERSATION.messages[turn].content.encode("utf-8")) - (
            dual.student.content_start[s_next] - dual.student.content_start[dual.student.message == turn][0])
        s_at, t_at = int(dual.student.tokens.byte_starts[s_next]), int(dual.teacher.tokens.byte_starts[t_next])
        assert renderings["student"][s_at : s_at + rest] == renderings["teacher"][t_at : t_at + rest]
    # Every assistant turn's first byte is paired: both models are about to start the response (after the zero-byte
    # '▁' a SentencePiece-style tokenizer may put first).
    paired_starts = set(dual.student.content_start[pairs.student_pos + 1].tolist())
    for turn in (1, 3):
        assert dual.student.content_start[dual.student.message == turn][0] in paired_starts
    # Only positions the mask trains are paired.
    assert dual.window().student_loss_mask[pairs.student_pos].all()


@pytest.mark.parametrize("pair", range(2))
def test_skipping_turn_starts_drops_exactly_each_responses_first_pair_from_kd(pair):
    student, teacher = _pairs_of_tokenizers()[pair]
    every = ChatWindows(ChatConfig(), student, teacher, 10_000).dual(CONVERSATION)
    skipping = ChatWindows(ChatConfig(kd_skip_turn_starts=True), student, teacher, 10_000).dual(CONVERSATION)
    turn_starts = {int(every.student.content_start[every.student.message == turn][0]) for turn in (1, 3)}

    def pairs_by_start(dual):
        pairs = dual.window().pairs
        return {(int(dual.student.content_start[i + 1]), int(i), int(j))
                for i, j in zip(pairs.student_pos, pairs.teacher_pos)}

    dropped = pairs_by_start(every) - pairs_by_start(skipping)
    assert pairs_by_start(skipping) <= pairs_by_start(every)
    assert {start for start, _, _ in dropped} == turn_starts and len(dropped) == 2
    # The LM term still trains every response token: the loss mask is the same.
    np.testing.assert_array_equal(every.window().student_loss_mask, skipping.window().student_loss_mask)


def test_a_prompt_change_leaves_the_response_pairs_unchanged():
    windows = ChatWindows(ChatConfig(), tiny_student_tokenizer(), tiny_teacher_tokenizer(), 10_000)
    other = Conversation("x", "x", (Message("system", "Be brief."),
                                    Message("user", "Something much longer and different: 日本語 and code `x = 1`."),
                                    *CONVERSATION.messages[1:]), responses=(2, 4))

    def response_pairs(conversation):
        dual = windows.dual(conversation)
        pairs = dual.window().pairs
        first_assistant = [n for n, m in enumerate(conversation.messages) if m.role == "assistant"]
        keys = []
        for i, j, s_bytes, t_bytes in zip(pairs.student_pos, pairs.teacher_pos, pairs.student_next_bytes,
                                          pairs.teacher_next_bytes):
            turn = int(dual.student.message[i + 1])
            offset = int(dual.student.content_start[i + 1] - dual.student.content_start[dual.student.message == turn][0])
            keys.append((first_assistant.index(turn), offset, int(s_bytes), int(t_bytes),
                         int(dual.student.tokens.ids[i + 1]), int(dual.teacher.tokens.ids[j + 1])))
        return keys

    assert response_pairs(CONVERSATION) == response_pairs(other)


def test_a_long_conversation_is_cut_between_tokens_and_counted():
    student, teacher = tiny_student_tokenizer(), tiny_teacher_tokenizer()
    whole = ChatWindows(ChatConfig(), student, teacher, 10_000).dual(CONVERSATION)
    window_tokens = int(np.flatnonzero(whole.student.message == 3)[3])  # inside the last response
    windows = ChatWindows(ChatConfig(), student, teacher, window_tokens)
    cut = windows.dual(CONVERSATION)
    assert cut.truncated and len(cut.student) == window_tokens
    assert np.array_equal(cut.student.tokens.ids, whole.student.tokens.ids[:window_tokens])  # whole tokens kept
    # The teacher keeps its tokens up to the same response byte, no further.
    assert cut.teacher.content_end[-1] <= cut.student.content_end[-1]
    assert len(cut.teacher) < len(whole.teacher)
    assert np.array_equal(cut.teacher.tokens.ids, whole.teacher.tokens.ids[: len(cut.teacher)])
    prompt_only = Conversation("long.jsonl:7", "long.jsonl", (Message("user", "x " * 400), Message("assistant", "y")),
                               responses=(1,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        produced = list(windows.windows([CONVERSATION, prompt_only, CONVERSATION], "test"))
    assert len(produced) == 2  # the conversation whose prompt fills the window has nothing to train
    message = str(caught[0].message)
    assert len(caught) == 1
    assert "3 of 3 conversation(s) are longer than data.window_tokens" in message
    assert "1 of them kept no response token and were skipped (first: long.jsonl:7)" in message
    survey = windows.survey([CONVERSATION, prompt_only, CONVERSATION])
    assert (survey.conversations, survey.truncated, survey.skipped) == (3, 3, ["long.jsonl:7"])


def test_the_system_prompt_option_and_the_templates_own_defaults():
    student, teacher = tiny_student_tokenizer(), tiny_teacher_tokenizer()
    default = ChatWindows(ChatConfig(), student, teacher, 10_000)
    assert "You are a tiny student." in default.student.render(default.student.messages(CONVERSATION))
    assert "You are the tiny teacher" in default.teacher.render(default.teacher.messages(CONVERSATION))
    chosen = ChatWindows(ChatConfig(system_prompt="Answer in Python."), student, teacher, 10_000)
    for renderer in (chosen.student, chosen.teacher):
        text = renderer.render(renderer.messages(CONVERSATION))
        assert "Answer in Python." in text and "tiny" not in text
    # The system turn is a prompt: the responses and their pairs do not move.
    assert np.array_equal(default.dual(CONVERSATION).window().pairs.student_next_bytes,
                          chosen.dual(CONVERSATION).window().pairs.student_next_bytes)


def test_training_on_prompts_trains_every_position_and_pairs_the_user_turns():
    windows = ChatWindows(ChatConfig(train_on_prompts=True), tiny_student_tokenizer(), tiny_teacher_tokenizer(),
                          10_000)
    dual = windows.dual(CONVERSATION)
    window = dual.window()
    assert window.student_loss_mask.all()
    paired_turns = set(dual.student.message[window.pairs.student_pos + 1].tolist())
    assert paired_turns == {0, 1, 2, 3}


def test_the_batch_mask_removes_prompt_positions_from_every_term():
    windows = ChatWindows(ChatConfig(), tiny_student_tokenizer(), tiny_teacher_tokenizer(), 10_000)
    short = Conversation("s", "s", (Message("user", "Hi"), Message("assistant", "Hello.")), responses=(1,))
    batch = collate_windows(list(windows.windows([CONVERSATION, short], "test")), teacher_pad_id=0)
    assert batch.student_loss_mask.shape == batch.student_input_ids.shape
    assert not batch.student_loss_mask[1, batch.student_attention_mask[1] == 0].any()  # padding
    selection = select_positions(batch, torch.ones(len(batch.pair_batch), dtype=torch.bool))
    trained = selection.lm_targets.reshape(batch.student_input_ids.shape) != IGNORE_INDEX
    assert torch.equal(trained, batch.student_loss_mask & (batch.student_targets != IGNORE_INDEX))
    assert int(selection.counts()["kd"]) == len(batch.pair_batch)  # every pair is a response position


def test_a_template_that_rewrites_contents_is_refused_naming_the_model():
    stripping = with_chat_template(byte_level_bpe(300), STUDENT_CHAT_TEMPLATE.replace(
        "message['content']", "message['content'] | trim"))
    windows = ChatWindows(ChatConfig(), stripping, tiny_teacher_tokenizer(), 10_000)
    with pytest.raises(ChatTemplateError, match=r"chat.jsonl:1: the student chat template does not render.*"
                                                r"data.chat.student_template"):
        windows.dual(CONVERSATION)


def test_a_tokenizer_without_a_chat_template_is_named_with_the_option():
    with pytest.raises(ChatTemplateError, match=r"the teacher tokenizer .* has no chat template.*"
                                                r"data.chat.teacher_template"):
        ChatWindows(ChatConfig(), tiny_student_tokenizer(), byte_level_bpe(700), 64)
    given = ChatWindows(ChatConfig(teacher_template=TEACHER_CHAT_TEMPLATE), tiny_student_tokenizer(),
                        byte_level_bpe(700), 10_000)
    assert len(given.dual(CONVERSATION).window().pairs) > 0


# --- rows -------------------------------------------------------------------------------------------------------------


def _jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
                    encoding="utf-8")
    return str(path)


MESSAGES_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def test_both_row_formats_and_configurable_field_names(tmp_path):
    messages = load_conversations(_jsonl(tmp_path / "m.jsonl", [MESSAGES_ROW]), "messages", ChatConfig())
    assert messages[0].messages == (Message("user", "Hi"), Message("assistant", "Hello."))
    assert (messages[0].name, messages[0].group) == (f"{tmp_path}/m.jsonl:1", f"{tmp_path}/m.jsonl")
    rows = [{"q": "Hi", "a": "Hello."},
            {"q": [{"who": "system", "text": "Be kind."}, {"who": "user", "text": "Hi"}],
             "a": [{"who": "assistant", "text": "Hello."}]}]
    chat = ChatConfig(prompt_field="q", completion_field="a", role_field="who", content_field="text")
    completions = load_conversations(_jsonl(tmp_path / "pc.jsonl", rows), "prompt-completion", chat)
    assert completions[0].messages == messages[0].messages
    assert completions[1].messages == (Message("system", "Be kind."), *messages[0].messages)
    assert (messages[0].responses, completions[0].responses, completions[1].responses) == ((1,), (1,), (2,))


def test_assistant_turns_of_a_prompt_are_context_only_the_completion_trains(tmp_path):
    few_shot = {"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "3+3?"}], "completion": "6"}
    (conversation,) = load_conversations(_jsonl(tmp_path / "pc.jsonl", [few_shot]), "prompt-completion", ChatConfig())
    assert conversation.responses == (3,)
    dual = ChatWindows(ChatConfig(), tiny_student_tokenizer(), tiny_teacher_tokenizer(), 10_000).dual(conversation)
    trained = np.flatnonzero(dual.window().student_loss_mask[:-1]) + 1
    assert set(dual.student.message[trained].tolist()) == {3, TEMPLATE_PIECE}  # the completion and its end of turn
    assert set(dual.student.message[dual.window().pairs.student_pos + 1].tolist()) == {3}


def test_parquet_and_datasets_folders(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["Hi", "Yo"], "completion": ["Hello.", "Hey."]}), tmp_path / "rows.parquet")
    from_parquet = load_conversations(str(tmp_path / "rows.parquet"), "prompt-completion", ChatConfig())
    assert [c.messages[1].content for c in from_parquet] == ["Hello.", "Hey."]
    datasets.Dataset.from_list([MESSAGES_ROW]).save_to_disk(str(tmp_path / "saved"))
    from_folder = load_conversations(str(tmp_path / "saved"), "messages", ChatConfig())
    assert from_folder[0].messages[1] == Message("assistant", "Hello.")


@pytest.mark.parametrize("row, problem", [
    ({"text": "plain"}, r"m.jsonl:2 has no 'messages' field \(its fields: \['text'\]\); name the right one with "
                        r"data.chat.messages_field, or use data.format=prompt-completion"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"m.jsonl:2: turn 0 has role 'tool'; crosskd trains on the roles system, user, assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"m.jsonl:2: the conversation has no assistant turn.*add the"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     r"m.jsonl:2: assistant turn 1 is empty.*give its response text or drop the row"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "y"}]},
     r"m.jsonl:2: turn 0 \(user\) has content of type list, not a string.*give its text as a string"),
    ({"messages": [{"speaker": "user"}]}, r"m.jsonl:2: turn 0 of 'messages' is not an object with 'role' and "
                                          r"'content'.*data.chat.role_field"),
    ({"messages": "Hi"}, r"m.jsonl:2: field 'messages' holds str, not a list of turns"),
    ("not json", r"m.jsonl:2 is not valid JSON.*each line of a .jsonl file is one object"),
])
def test_each_bad_row_is_named_with_its_line_and_the_fix(tmp_path, row, problem):
    path = _jsonl(tmp_path / "m.jsonl", [MESSAGES_ROW, row, MESSAGES_ROW])
    with pytest.raises(ValueError, match=problem):
        load_conversations(path, "messages", ChatConfig())


def test_a_hub_dataset_the_machine_cannot_reach_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/chats' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"hub:someone/chats could not be loaded \(ConnectionError.*may not "
                                                r"reach the Hugging Face hub.*save_to_disk"):
        load_conversations("hub:someone/chats", "messages", ChatConfig())


def test_a_plain_text_file_is_no_conversation_source(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no rows.*data.format=text"):
        load_conversations(str(tmp_path / "notes.txt"), "messages", ChatConfig())
    with pytest.raises(ChatDataError, match="gave no conversations"):
        load_conversations(str(tmp_path), "messages", ChatConfig())


def test_the_conversational_config_is_checked():
    with pytest.raises(ValueError, match=r"data.format is 'chat', which is not one of text, messages, "
                                         r"prompt-completion"):
        load_config(None, ["data.format=chat"])
    with pytest.raises(ValueError, match=r"'python-stdlib-chat' is a set of conversations: set data.format=messages"):
        load_config(None, ["data.source=python-stdlib-chat"])
    with pytest.raises(ValueError, match=r"unknown config key 'data.chat.system'; did you mean "
                                         r"'data.chat.system_prompt'"):
        load_config(None, ["data.chat.system=x"])


# --- the reference instruction set -----------------------------------------------------------------------------------


def test_the_stdlib_set_asks_by_signature_and_docstring_and_answers_with_the_body():
    conversations = list(stdlib_conversations("python-stdlib-chat:textwrap.py"))
    by_name = {c.name: c for c in conversations}
    dedent = by_name["textwrap.py:dedent"]
    request, answer = (m.content for m in dedent.messages)
    assert dedent.group == "textwrap.py" and [m.role for m in dedent.messages] == ["user", "assistant"]
    assert "module `textwrap`" in request and request.count("def dedent(text):") == 1
    assert '"""Remove any common leading whitespace' in request
    assert "Remove any common" not in answer and answer.startswith("    ")
    assert "textwrap.py:TextWrapper._split" in by_name  # methods, by their qualified name
    # Held out by module: naming the file holds out every function of it.
    others = list(stdlib_conversations("python-stdlib-chat:shlex.py"))
    names = heldout_names(conversations + others, ["textwrap.py"])
    assert set(names) == {c.name for c in conversations}
