import math

import pytest
import torch
from tiny_feature_pair import (
    STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    TEACHER_LAYERS,
    gradient_totals,
    optimise_alone,
    tiny_batch,
)

from crosskd.losses.features import AlignedPairs, SummedLoss, student_features
from crosskd.losses.router import (
    DenseGroupMatcher,
    StudentAwareRouter,
    default_student_layer,
    routing_stats,
    teacher_layer_groups,
)

NUM_EXPERTS = 3  # the tiny teacher has 3 blocks: one group each


@pytest.fixture(scope="module")
def batch():
    return tiny_batch()


def make_router(top_k=2, seed=0):
    torch.manual_seed(seed)
    return StudentAwareRouter(
        STUDENT_HIDDEN, TEACHER_HIDDEN, TEACHER_LAYERS, student_layer=2, num_experts=NUM_EXPERTS, top_k=top_k
    )


def run(matcher, batch, weight=0.0, student_output=None):
    output = batch.student_forward() if student_output is None else student_output
    return matcher(
        output.hidden_states, batch.teacher_hidden_states, batch.pairs, batch.stats, student_grad_weight=weight
    )


@pytest.mark.parametrize(
    ("layers", "groups", "expected"),
    [
        (24, 4, ((1, 2, 3, 4, 5, 6), (7, 8, 9, 10, 11, 12), (13, 14, 15, 16, 17, 18), (19, 20, 21, 22, 23, 24))),
        (6, 4, ((1, 2), (3, 4), (5,), (6,))),
        (3, 3, ((1,), (2,), (3,))),
        (5, 1, ((1, 2, 3, 4, 5),)),
    ],
)
def test_teacher_depth_is_split_into_contiguous_groups(layers, groups, expected):
    assert teacher_layer_groups(layers, groups) == expected


def test_more_groups_than_teacher_layers_is_an_error():
    with pytest.raises(ValueError):
        teacher_layer_groups(3, 4)


def test_default_student_layer_is_the_middle_block():
    assert [default_student_layer(n) for n in (1, 4, 30)] == [1, 2, 15]


def test_router_losses_are_finite_at_init(batch):
    output = run(make_router(), batch)
    routing = output.routing
    assert output.feature.count == len(batch.pairs)
    for value in (output.feature.sum, routing.load_balance, routing.importance, routing.gate_entropy):
        assert torch.isfinite(value)
    assert 0.1 < output.feature.mean().item() < 10  # standardised targets: about 1 per channel, not 150-200
    assert routing.expert_share.sum().item() == pytest.approx(1.0)
    assert 0 < routing.gate_entropy.item() <= math.log(NUM_EXPERTS) + 1e-6
    assert output.group_mse.shape == (NUM_EXPERTS,)


def test_teacher_state_at_window_position_zero_does_not_matter(batch):
    router = make_router()
    student_output = batch.student_forward()
    before = run(router, batch, student_output=student_output).feature.sum
    spiked = tuple(h.clone() for h in batch.teacher_hidden_states)
    for h in spiked:
        h[:, 0] = 1e4
    after = router(student_output.hidden_states, spiked, batch.pairs, batch.stats, student_grad_weight=0.0)
    assert after.feature.sum.item() == pytest.approx(before.item())


def test_top_k_choice_varies_across_tokens(batch):
    router = make_router(top_k=1)
    student = batch.student_forward().hidden_states[2]
    pairs = batch.pairs
    with torch.no_grad():
        chosen = router.gate(student_features(student, pairs, 0.0)).argmax(dim=-1)
    assert chosen.unique().numel() > 1


def test_router_feature_loss_decreases_when_optimised_alone():
    batch = tiny_batch()  # its own: optimising moves the student
    router = make_router()
    history = optimise_alone(lambda out: run(router, batch, 1.0, out).feature, batch, router.parameters(), steps=15)
    assert history[-1] < 0.8 * history[0]


def test_dense_matcher_decreases_and_has_the_routers_experts():
    batch = tiny_batch()
    torch.manual_seed(0)
    dense = DenseGroupMatcher(STUDENT_HIDDEN, TEACHER_HIDDEN, TEACHER_LAYERS, student_layer=2, num_experts=NUM_EXPERTS)
    router = make_router()
    expert_params = sum(p.numel() for p in router.experts.parameters())
    assert sum(p.numel() for p in dense.parameters()) == expert_params
    assert run(dense, batch).routing is None
    history = optimise_alone(lambda out: run(dense, batch, 1.0, out).feature, batch, dense.parameters(), steps=15)
    assert math.isfinite(history[0]) and history[-1] < 0.8 * history[0]


def test_ramp_zero_trains_the_router_but_not_the_student(batch):
    router = make_router()
    output = run(router, batch, weight=0.0)
    routing = output.routing
    regularised = SummedLoss(output.feature.sum + routing.load_balance + routing.importance, output.feature.count)
    student_grad, head_grad = gradient_totals(regularised, batch, router)
    assert student_grad == 0.0
    assert head_grad > 0.0
    assert router.gate.weight.grad.abs().sum() > 0


def test_ramp_scales_the_gradient_into_the_student(batch):
    router = make_router()
    student_output = batch.student_forward()
    full = torch.autograd.grad(run(router, batch, 1.0, student_output).feature.sum, student_output.hidden_states[2])
    student_output = batch.student_forward()
    quarter = torch.autograd.grad(run(router, batch, 0.25, student_output).feature.sum, student_output.hidden_states[2])
    assert full[0].abs().sum() > 0
    torch.testing.assert_close(quarter[0], 0.25 * full[0])


def test_balance_terms_tell_balanced_from_collapsed_routing():
    tokens, experts = 8, 4
    uniform = torch.full((tokens, experts), 1 / experts).log()
    round_robin = torch.arange(tokens).remainder(experts)[:, None]
    balanced = routing_stats(uniform, round_robin)
    assert balanced.load_balance.item() == pytest.approx(1.0)
    assert balanced.importance.item() == pytest.approx(0.0)
    assert balanced.gate_entropy.item() == pytest.approx(math.log(experts))

    collapsed_probs = torch.tensor([[1.0 - 3e-6, 1e-6, 1e-6, 1e-6]]).expand(tokens, experts).log()
    collapsed = routing_stats(collapsed_probs, torch.zeros(tokens, 1, dtype=torch.long))
    assert collapsed.load_balance.item() == pytest.approx(experts, rel=1e-4)
    assert collapsed.importance.item() == pytest.approx(experts - 1, rel=1e-4)  # CV^2 of (1, 0, 0, 0)
    assert collapsed.expert_share.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_batch_aligned_only_at_window_start_gives_zero_not_nan(batch):
    only_start = AlignedPairs(*(torch.zeros(1, dtype=torch.long) for _ in range(3))).without_window_start()
    output = make_router()(
        batch.student_forward().hidden_states, batch.teacher_hidden_states, only_start, batch.stats,
        student_grad_weight=1.0,
    )
    assert output.feature.count == 0
    assert output.feature.sum.item() == 0.0
    assert output.routing.load_balance.item() == 0.0
    assert torch.isfinite(output.group_mse).all()


def test_top_k_outside_the_experts_is_an_error():
    with pytest.raises(ValueError):
        StudentAwareRouter(STUDENT_HIDDEN, TEACHER_HIDDEN, TEACHER_LAYERS, student_layer=2, num_experts=3, top_k=4)
