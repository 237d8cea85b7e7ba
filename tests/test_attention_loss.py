import pytest
import torch
from tiny_feature_pair import STUDENT_LAYERS, TEACHER_LAYERS, optimise_alone, tiny_batch

from crosskd.losses.attention import attention_alignment_loss, attention_layer_pairs
from crosskd.losses.features import AlignedPairs


def random_attention(batch, heads, length, generator):
    scores = torch.randn(batch, heads, length, length, generator=generator)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def identity_pairs(length):
    """Two rows aligned position by position, as the position selection passes them on (window start left out)."""
    positions = torch.arange(length).repeat(2)
    return AlignedPairs(torch.arange(2).repeat_interleave(length), positions, positions).without_window_start()


def test_layer_pairs_follow_the_depth_map():
    # attentions[k] belongs to block k + 1; student blocks 1..4 map to teacher blocks 1, 2, 2, 3.
    assert attention_layer_pairs([0, 1, 2, 3], 4, 3) == ((0, 0), (1, 1), (2, 1), (3, 2))


def test_identical_attention_gives_zero_and_different_attention_positive():
    generator = torch.Generator().manual_seed(0)
    teacher = (random_attention(2, 3, 6, generator),)
    pairs = identity_pairs(6)
    same = attention_alignment_loss(teacher, teacher, pairs, [(0, 0)], student_grad_weight=1.0)
    assert same.count == 2 * 5
    assert same.sum.abs().item() < 1e-6
    other = (random_attention(2, 5, 6, generator),)  # a different head count is fine: heads are averaged
    assert attention_alignment_loss(other, teacher, pairs, [(0, 0)], student_grad_weight=1.0).sum.item() > 1e-3


def test_key_position_zero_and_unaligned_keys_do_not_matter():
    generator = torch.Generator().manual_seed(1)
    student, teacher = random_attention(2, 3, 6, generator), random_attention(2, 3, 6, generator)
    pairs = AlignedPairs(torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 3, 5, 2, 4]),
                         torch.tensor([0, 2, 3, 4, 1, 5])).without_window_start()
    before = attention_alignment_loss((student,), (teacher,), pairs, [(0, 0)], student_grad_weight=1.0)
    # Move mass onto the sink (key 0) and an unaligned key: renormalised aligned rows are unchanged.
    sink_heavy = student.clone()
    sink_heavy[..., 0] *= 50.0
    sink_heavy[0, :, :, 2] *= 7.0
    after = attention_alignment_loss((sink_heavy,), (teacher,), pairs, [(0, 0)], student_grad_weight=1.0)
    assert after.count == before.count == 5
    assert after.sum.item() == pytest.approx(before.sum.item(), rel=1e-5)


def test_attention_loss_on_the_tiny_pair_is_finite_and_decreases_when_optimised_alone():
    batch = tiny_batch()
    layer_pairs = attention_layer_pairs(range(STUDENT_LAYERS), STUDENT_LAYERS, TEACHER_LAYERS)

    def loss_of(output):
        return attention_alignment_loss(
            output.attentions, batch.teacher_attentions, batch.pairs, layer_pairs, student_grad_weight=1.0
        )

    first = loss_of(batch.student_forward())
    assert first.count == len(batch.pairs) and torch.isfinite(first.sum) and first.sum >= 0
    history = optimise_alone(loss_of, batch, [], steps=15)
    assert history[-1] < 0.8 * history[0]


def test_ramp_zero_sends_nothing_into_the_student():
    batch = tiny_batch()
    output = batch.student_forward()
    loss = attention_alignment_loss(
        output.attentions, batch.teacher_attentions, batch.pairs, [(0, 0)], student_grad_weight=0.0
    )
    assert torch.isfinite(loss.sum) and not loss.sum.requires_grad
