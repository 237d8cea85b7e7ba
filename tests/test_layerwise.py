from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_feature_pair import (
    STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    TEACHER_LAYERS,
    gradient_totals,
    optimise_alone,
    tiny_batch,
)

from crosskd.losses.features import AlignedPairs, scale_gradient
from crosskd.losses.layerwise import LayerwiseMatcher, layer_mapping, mapped_teacher_layer


@pytest.mark.parametrize(
    ("student_layers", "teacher_layers", "expected"),
    [
        (4, 3, (1, 2, 2, 3)),  # deeper student: 1.5 rounds half up to 2
        (2, 3, (2, 3)),  # shallower student
        (8, 3, (1, 1, 1, 2, 2, 2, 3, 3)),  # 3/8 would round to the embedding: block outputs start at 1
        (3, 3, (1, 2, 3)),
    ],
)
def test_layer_mapping_for_deeper_and_shallower_students(student_layers, teacher_layers, expected):
    mapping = layer_mapping(student_layers, teacher_layers)
    assert [student for student, _ in mapping] == list(range(1, student_layers + 1))
    assert tuple(teacher for _, teacher in mapping) == expected


@given(st.integers(1, 64), st.integers(1, 64))
def test_mapping_is_monotone_in_range_and_ends_on_the_last_layer(student_layers, teacher_layers):
    targets = [t for _, t in layer_mapping(student_layers, teacher_layers)]
    assert targets == sorted(targets)
    assert all(1 <= t <= teacher_layers for t in targets)
    assert targets[-1] == teacher_layers  # post-norm student state meets post-norm teacher state
    half_up = [int(Fraction(i * teacher_layers, student_layers) + Fraction(1, 2)) for i in range(1, student_layers + 1)]
    assert targets == [max(1, t) for t in half_up]


def test_mapping_rejects_a_block_outside_the_student():
    with pytest.raises(ValueError):
        mapped_teacher_layer(0, 4, 3)


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(5, requires_grad=True)
    y = scale_gradient(x, 0.3)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5,), 0.3))
    assert not scale_gradient(x, 0.0).requires_grad
    with pytest.raises(ValueError):
        scale_gradient(x, -1.0)


def test_pairs_at_window_start_are_dropped_on_either_side():
    pairs = AlignedPairs(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 2, 3]))
    kept = pairs.without_window_start()
    assert kept.student_pos.tolist() == [2, 3] and kept.teacher_pos.tolist() == [2, 3] and kept.batch.tolist() == [0, 1]


def make_matcher(student_layers):
    torch.manual_seed(0)
    return LayerwiseMatcher(STUDENT_HIDDEN, TEACHER_HIDDEN, student_layers, TEACHER_LAYERS)


def run(matcher, batch, weight, student_output=None):
    output = batch.student_forward() if student_output is None else student_output
    return matcher(
        output.hidden_states, batch.teacher_hidden_states, batch.pairs, batch.stats, student_grad_weight=weight
    )


@pytest.mark.parametrize("student_layers", [4, 2])
def test_layerwise_loss_is_finite_and_decreases_for_deeper_and_shallower_students(student_layers):
    batch = tiny_batch(student_layers)
    matcher = make_matcher(student_layers)
    loss = run(matcher, batch, 0.0)
    assert loss.count == len(batch.pairs)
    assert torch.isfinite(loss.sum) and 0.1 < loss.mean().item() < 10
    history = optimise_alone(lambda out: run(matcher, batch, 1.0, out), batch, matcher.parameters(), steps=15)
    assert history[-1] < 0.8 * history[0]


def test_ramp_zero_trains_the_projections_but_not_the_student():
    batch = tiny_batch()
    matcher = make_matcher(4)
    student_grad, head_grad = gradient_totals(run(matcher, batch, 0.0), batch, matcher)
    assert student_grad == 0.0
    assert head_grad > 0.0
    student_grad, _ = gradient_totals(run(matcher, batch, 0.5), batch, matcher)
    assert student_grad > 0.0


def test_calibration_layers_cover_the_mapping():
    assert make_matcher(4).teacher_layers == (1, 2, 3)
