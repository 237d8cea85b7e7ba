"""The KD target is conditioned on the right token: at every aligned pair (i, j), the teacher's observed next token
(j + 1), pushed through the first-token map, is the student's observed next token (i + 1) or its merge group.

A pairing off by one position on either side, or a map that spells teacher tokens wrongly, breaks this on most pairs
(the defects of published cross-tokenizer trainers: probability merging conditioned on the wrong token, text buffers
misaligned between the two tokenisations). The shifted pairings below show that the check would catch one.
"""

from __future__ import annotations

import math

import pytest
import torch

from crosskd.losses.target import TopKTarget
from crosskd.vocab.first_token import (
    load_or_build_first_token_map,
    load_or_build_student_groups,
    push_topk_through_map,
)
from trainer_helpers import models_and_batches, tiny_config


@pytest.fixture(scope="module")
def pair_and_batches(tmp_path_factory):
    teacher, student, batches = models_and_batches(tiny_config(tmp_path_factory.mktemp("conditioning")),
                                                   batch_size=4, count=4)
    logit_size = student.vocab.logit_size
    token_map = load_or_build_first_token_map(student.tokenizer, teacher.tokenizer, teacher.vocab.valid_mask,
                                              logit_size)
    groups = load_or_build_student_groups(student.tokenizer, teacher.tokenizer, logit_size)
    return batches, groups.root_of(token_map.teacher_to_student), groups


def _share_of_pairs_conditioned_right(batches, teacher_to_root, groups, student_shift: int, teacher_shift: int):
    """Share of pairs where the one-hot target of the teacher's token at j + 1 + teacher_shift lands on the group of
    the student's token at i + 1 + student_shift."""
    hits = pairs = 0
    for batch in batches:
        student_next = batch.pair_student_pos + 1 + student_shift
        teacher_next = batch.pair_teacher_pos + 1 + teacher_shift
        inside = ((student_next >= 0) & (student_next < batch.student_attention_mask.sum(-1)[batch.pair_batch])
                  & (teacher_next >= 0) & (teacher_next < batch.teacher_attention_mask.sum(-1)[batch.pair_batch]))
        rows = batch.pair_batch[inside]
        observed = batch.teacher_input_ids[rows, teacher_next[inside]]
        one_hot = TopKTarget(observed[:, None], torch.zeros(len(observed), 1),
                             torch.full((len(observed),), -math.inf))
        target = push_topk_through_map(one_hot, teacher_to_root)
        truth = groups.root_of(batch.student_input_ids[rows, student_next[inside]])
        hits += int(((target.ids[:, 0] == truth) & target.mask[:, 0]).sum())
        pairs += len(truth)
    return hits / pairs


def test_the_teachers_next_token_maps_to_the_students_next_token_at_the_aligned_pairs(pair_and_batches):
    assert _share_of_pairs_conditioned_right(*pair_and_batches, student_shift=0, teacher_shift=0) > 0.99


@pytest.mark.parametrize("student_shift, teacher_shift", [(0, 1), (0, -1), (1, 0), (-1, 0)])
def test_a_pairing_off_by_one_position_is_caught(pair_and_batches, student_shift, teacher_shift):
    assert _share_of_pairs_conditioned_right(*pair_and_batches, student_shift, teacher_shift) < 0.2
