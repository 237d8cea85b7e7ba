"""The first-token map (tiny tokenizers) and the scatter-add that pushes a teacher top-k through it."""

from __future__ import annotations

import math

import pytest
import torch

from crosskd.data.encoding import token_bytes_table
from crosskd.losses.target import TopKTarget
from crosskd.testing.tiny_tokenizers import byte_level_bpe, sentencepiece_like
from crosskd.vocab import first_token
from crosskd.vocab.first_token import (
    UNMAPPED,
    build_first_token_table,
    build_group_roots,
    first_token_kd_pairs,
    load_or_build_first_token_map,
    load_or_build_student_groups,
    mid_text_tokenizer,
    push_topk_through_map,
)

PADDED = 5  # logit ids beyond the tokenizer, as the reference teacher has 271 of


def _valid_mask(tokenizer) -> torch.Tensor:
    mask = torch.ones(len(tokenizer) + PADDED, dtype=torch.bool)
    mask[len(tokenizer):] = False
    return mask


PAIRS = {
    "sentencepiece student, byte-level teacher": (sentencepiece_like(400), byte_level_bpe(500)),
    "byte-level student, sentencepiece teacher": (byte_level_bpe(300), sentencepiece_like(420)),
    "byte-level student, byte-level teacher": (byte_level_bpe(300), byte_level_bpe(500)),
}


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair_and_table(request):
    student, teacher = PAIRS[request.param]
    return student, teacher, build_first_token_table(student, teacher, _valid_mask(teacher).numpy())


def test_every_mapped_token_begins_with_its_student_token(pair_and_table):
    student, teacher, table = pair_and_table
    student_bytes, teacher_bytes = token_bytes_table(student), token_bytes_table(teacher)
    for teacher_id, raw in enumerate(teacher_bytes):
        if raw is None:
            continue
        student_id = int(table[teacher_id])
        assert student_id != UNMAPPED, raw
        assert raw.startswith(student_bytes[student_id]), (raw, student_bytes[student_id])


def test_text_tokens_map_to_the_first_token_of_the_mid_text_tokenisation(pair_and_table):
    student, teacher, table = pair_and_table
    backend = mid_text_tokenizer(student)
    for teacher_id, raw in enumerate(token_bytes_table(teacher)):
        if raw is not None and _is_utf8(raw):
            assert table[teacher_id] == backend.encode(raw.decode("utf-8"), add_special_tokens=False).ids[0]


def test_specials_and_padded_ids_are_unmapped(pair_and_table):
    _, teacher, table = pair_and_table
    assert table.shape == (len(teacher) + PADDED,)
    assert (table[len(teacher):] == UNMAPPED).all()
    assert table[teacher.convert_tokens_to_ids("<|endoftext|>")] == UNMAPPED


def test_cut_characters_map_to_the_byte_fallback_token_of_their_first_byte():
    student, teacher = PAIRS["sentencepiece student, byte-level teacher"]
    table = build_first_token_table(student, teacher, _valid_mask(teacher).numpy())
    cut = [(i, raw) for i, raw in enumerate(token_bytes_table(teacher)) if raw and not _is_utf8(raw) and raw[0] >= 0x80]
    assert cut, "the tiny byte-level teacher should have tokens that cut a character"
    # The ASCII-only student spells every non-ASCII character byte by byte.
    for teacher_id, raw in cut:
        assert student.convert_ids_to_tokens(int(table[teacher_id])) == f"<0x{raw[0]:02X}>"


def test_byte_fallback_teacher_tokens_map_through_the_byte_level_students_bpe():
    student, teacher = PAIRS["byte-level student, sentencepiece teacher"]
    table = build_first_token_table(student, teacher, _valid_mask(teacher).numpy())
    single_byte_ids = {raw: i for i, raw in enumerate(token_bytes_table(student)) if raw is not None and len(raw) == 1}
    for byte in (0xE6, 0xF0, 0x9F):
        teacher_id = teacher.convert_tokens_to_ids(f"<0x{byte:02X}>")
        assert table[teacher_id] == single_byte_ids[bytes([byte])]


def test_cut_characters_after_text_keep_the_students_merge():
    # ' \xe6' must map like the student's BPE of ' æ' (one chunk: the regex never splits before a letter's bytes).
    student = byte_level_bpe(300)
    backend = mid_text_tokenizer(student)
    first = first_token.first_tokens(student, [b" \xe6\x97"])[0]
    assert first == backend.encode(" 日", add_special_tokens=False).ids[0]


def test_map_is_cached_and_the_key_follows_the_tokenizers(tmp_path, monkeypatch):
    student, teacher = byte_level_bpe(300), byte_level_bpe(500)
    built = load_or_build_first_token_map(student, teacher, _valid_mask(teacher), len(student), cache_dir=tmp_path)

    def must_not_build(*args):
        raise AssertionError("the cached map should have been reused")

    monkeypatch.setattr(first_token, "build_first_token_table", must_not_build)
    reused = load_or_build_first_token_map(student, teacher, _valid_mask(teacher), len(student), cache_dir=tmp_path)
    assert reused.key == built.key and torch.equal(reused.teacher_to_student, built.teacher_to_student)

    monkeypatch.undo()
    other_teacher = byte_level_bpe(520)
    changed = load_or_build_first_token_map(student, other_teacher, _valid_mask(other_teacher), len(student),
                                            cache_dir=tmp_path)
    other_mask = _valid_mask(teacher)
    other_mask[3] = False
    masked = load_or_build_first_token_map(student, teacher, other_mask, len(student), cache_dir=tmp_path)
    assert len({built.key, changed.key, masked.key}) == 3
    assert len(list((tmp_path / "vocab").glob("*.npy"))) == 3


def _topk(probs: torch.Tensor, ids: torch.Tensor) -> TopKTarget:
    tail = (1 - probs.sum(-1)).log()
    return TopKTarget(ids, probs.log(), tail)


def test_scatter_add_merges_duplicates_and_conserves_mass():
    generator = torch.Generator().manual_seed(0)
    teacher_vocab, student_vocab, k = 40, 6, 12
    token_map = torch.randint(0, student_vocab, (teacher_vocab,), generator=generator)
    token_map[[3, 7]] = UNMAPPED
    ids = torch.stack([torch.randperm(teacher_vocab, generator=generator)[:k] for _ in range(5)])
    ids[0, :2] = torch.tensor([3, 7])  # row 0 has unmapped ids in its top-k
    probs = torch.rand(5, k, generator=generator, dtype=torch.float64)
    probs = 0.9 * probs / probs.sum(-1, keepdim=True)
    mapped = push_topk_through_map(_topk(probs, ids), token_map)

    expected = torch.zeros(5, student_vocab, dtype=torch.float64)
    keep = token_map[ids] != UNMAPPED
    expected.scatter_add_(-1, token_map[ids].clamp_min(0), probs * keep)
    got = torch.zeros(5, student_vocab, dtype=torch.float64)
    got.scatter_add_(-1, mapped.ids, mapped.logp.exp() * mapped.mask)
    torch.testing.assert_close(got, expected)
    for row in range(5):  # unique ids on the real slots
        real = mapped.ids[row][mapped.mask[row]]
        assert real.unique().numel() == real.numel()
    total = (mapped.logp.exp() * mapped.mask).sum(-1) + mapped.tail_logmass.exp()
    torch.testing.assert_close(total, torch.ones(5, dtype=torch.float64))
    assert math.isclose(mapped.tail_logmass[0].exp().item(), 0.1 + (probs[0, :2]).sum().item(), rel_tol=1e-9)


def test_scatter_add_passes_gradients_without_nan():
    token_map = torch.tensor([0, 0, 1, UNMAPPED])
    probs = torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64)
    logp = probs.log().requires_grad_(True)
    target = TopKTarget(torch.tensor([[0, 1, 2]]), logp, torch.tensor([0.2], dtype=torch.float64).log())
    mapped = push_topk_through_map(target, token_map)
    (mapped.logp.masked_fill(~mapped.mask, 0.0).sum() + mapped.tail_logmass.sum()).backward()
    assert torch.isfinite(logp.grad).all()


def test_pairs_whose_student_token_runs_past_the_teacher_are_left_out():
    keep = first_token_kd_pairs(torch.tensor([1, 4, 3]), torch.tensor([1, 1, 5]))
    assert keep.tolist() == [True, False, True]


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_group_members_run_past_the_teachers_token_and_roots_are_its_student_token(pair):
    student, teacher = PAIRS[pair]
    roots = build_group_roots(student, teacher, len(student) + PADDED)
    student_bytes, teacher_bytes = token_bytes_table(student), token_bytes_table(teacher)
    members = [i for i in range(len(roots)) if roots[i] != i]
    # The byte-level pair shares its training text, so the larger vocabulary holds every merge of the smaller one:
    # no student token runs past the teacher's there. The mixed pairs must have some, or this test would be vacuous.
    assert members or pair == "byte-level student, byte-level teacher"
    first_teacher = first_token.first_tokens(teacher, [student_bytes[i] for i in members])
    for member, teacher_first in zip(members, first_teacher):
        root = int(roots[member])
        assert roots[root] == root  # one level deep
        assert len(teacher_bytes[teacher_first]) < len(student_bytes[member])
        assert student_bytes[root] == student_bytes[member][: len(student_bytes[root])]
        assert root == first_token.first_tokens(student, [teacher_bytes[teacher_first]])[0]
    assert all(roots[i] == i for i in range(len(student), len(roots)))  # padded ids stay their own roots


def test_groups_are_cached_and_follow_the_tokenizers(tmp_path, monkeypatch):
    student, teacher = PAIRS["sentencepiece student, byte-level teacher"]
    built = load_or_build_student_groups(student, teacher, len(student), cache_dir=tmp_path)
    monkeypatch.setattr(first_token, "build_group_roots", lambda *args: pytest.fail("the cached groups were rebuilt"))
    reused = load_or_build_student_groups(student, teacher, len(student), cache_dir=tmp_path)
    assert torch.equal(reused.root_table, built.root_table) and len(built.members) > 0
    monkeypatch.undo()
    other = load_or_build_student_groups(student, byte_level_bpe(520), len(student), cache_dir=tmp_path)
    assert len(list((tmp_path / "vocab").glob("groups-*.npy"))) == 2 and other.root_table.shape == built.root_table.shape
