import math

import pytest
import torch
from tiny_feature_pair import STUDENT_HIDDEN, TEACHER_HIDDEN, gradient_totals, optimise_alone, tiny_batch

from crosskd.losses.contrastive import ContrastiveMatcher


def make_matcher(temperature=0.1):
    torch.manual_seed(0)
    return ContrastiveMatcher(
        STUDENT_HIDDEN, TEACHER_HIDDEN, temperature=temperature, student_layer=-1, teacher_layer=-1
    )


def run(matcher, batch, weight, student_output=None):
    output = batch.student_forward() if student_output is None else student_output
    return matcher(
        output.hidden_states, batch.teacher_hidden_states, batch.pairs, batch.stats, student_grad_weight=weight
    )


def test_infonce_is_finite_at_init_near_chance():
    batch = tiny_batch()
    loss = run(make_matcher(temperature=1.0), batch, 0.0)
    pairs = len(batch.pairs)
    assert loss.count == pairs
    # With temperature 1 the logits lie in [-1, 1], so the per-pair loss is within 2 of chance (log P).
    assert abs(loss.mean().item() - math.log(pairs)) < 2.0


def test_infonce_decreases_when_optimised_alone():
    batch = tiny_batch()
    matcher = make_matcher()
    history = optimise_alone(lambda out: run(matcher, batch, 1.0, out), batch, matcher.parameters(), steps=15)
    assert math.isfinite(history[0]) and history[-1] < 0.8 * history[0]


def test_ramp_zero_trains_the_projection_but_not_the_student():
    batch = tiny_batch()
    matcher = make_matcher()
    student_grad, head_grad = gradient_totals(run(matcher, batch, 0.0), batch, matcher)
    assert student_grad == 0.0 and head_grad > 0.0


def test_temperature_must_be_positive():
    with pytest.raises(ValueError):
        make_matcher(temperature=0.0)
