"""The projector strategy on random small tensors: no dense teacher-vocabulary product, a detached student embedding,
a pre-fit that lowers the anchor NLL, and float64 gradients."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crosskd.vocab.projector import (
    AnchorData,
    LogitProjector,
    anchor_loss,
    least_squares_init,
    prefit_projector,
    projected_logits,
    projected_target,
    teacher_features_from_topk,
)

TEACHER_VOCAB, TEACHER_DIM, STUDENT_VOCAB, STUDENT_DIM = 5000, 12, 50, 8


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_topk_features_never_build_a_positions_by_teacher_vocab_product():
    g = _generator()
    positions, k = 64, 16
    teacher_embedding = torch.randn(TEACHER_VOCAB, TEACHER_DIM, generator=g)
    ids = torch.randint(0, TEACHER_VOCAB, (positions, k), generator=g)
    probs = torch.rand(positions, k, generator=g).softmax(-1).requires_grad_(True)
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM, residual=False)
    student_embedding = torch.randn(STUDENT_VOCAB, STUDENT_DIM, generator=g)
    with LargestOutput() as recorder:
        features = teacher_features_from_topk(ids, probs, teacher_embedding)
        total, _ = anchor_loss(projector, features, student_embedding, torch.zeros(positions, dtype=torch.long))
        total.backward()
    assert features.shape == (positions, TEACHER_DIM)
    # The biggest thing allowed is the [positions, student vocab] logits; [positions, teacher vocab] is 80x larger.
    assert recorder.largest <= max(positions * STUDENT_VOCAB, positions * k * TEACHER_DIM)
    expected = (probs.detach().unsqueeze(-1) * teacher_embedding[ids]).sum(1)
    torch.testing.assert_close(features.detach(), expected)


def test_anchor_and_kd_target_leave_the_tied_student_embedding_alone():
    g = _generator()
    student_embedding = torch.nn.Parameter(torch.randn(STUDENT_VOCAB, STUDENT_DIM, generator=g))
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM, residual=False)
    features = torch.randn(20, TEACHER_DIM, generator=g)
    targets = torch.randint(0, STUDENT_VOCAB, (20,), generator=g)
    total, count = anchor_loss(projector, features, student_embedding, targets, chunk_size=7)
    total.backward()
    assert student_embedding.grad is None
    assert projector.linear.weight.grad is not None and projector.linear.weight.grad.abs().sum() > 0
    assert count == 20
    target = projected_target(projector, features, student_embedding, top_k=5)
    assert not target.logp.requires_grad and not target.tail_logmass.requires_grad


def test_anchor_ignores_masked_targets_and_is_zero_when_all_are():
    g = _generator()
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM, residual=False)
    features = torch.randn(6, TEACHER_DIM, generator=g)
    embedding = torch.randn(STUDENT_VOCAB, STUDENT_DIM, generator=g)
    total, count = anchor_loss(projector, features, embedding, torch.full((6,), -100))
    assert total.item() == 0.0 and count.item() == 0


def test_projected_target_is_the_topk_of_the_projected_distribution_with_its_tail():
    g = _generator()
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM, residual=False)
    features = torch.randn(9, TEACHER_DIM, generator=g) * 30
    embedding = torch.randn(STUDENT_VOCAB, STUDENT_DIM, generator=g)
    target = projected_target(projector, features, embedding, top_k=4, chunk_size=4)
    full = projected_logits(projector, features, embedding).log_softmax(-1)
    torch.testing.assert_close(target.logp, full.topk(4).values)
    total = target.logp.exp().sum(-1) + target.tail_logmass.exp()
    torch.testing.assert_close(total, torch.ones(9))


def _anchor_task(g: torch.Generator, positions: int):
    """Teacher features that linearly determine the next student token, as a good teacher's hidden state does."""
    embedding = torch.randn(STUDENT_VOCAB, STUDENT_DIM, generator=g)
    truth = torch.randn(STUDENT_DIM, TEACHER_DIM, generator=g)
    features = torch.randn(positions, TEACHER_DIM, generator=g) * 40  # large norm, like the real teacher's ~160
    logits = (features @ truth.T) @ embedding.T / 40
    targets = torch.distributions.Categorical(logits=logits).sample()
    return embedding, features, targets


def test_prefit_beats_the_baseline_and_reduces_the_anchor_nll():
    g = _generator()
    torch.manual_seed(0)
    embedding, features, targets = _anchor_task(g, 600)
    train, heldout = AnchorData(features[:400], targets[:400]), AnchorData(features[400:], targets[400:])
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM, residual=False)
    before = heldout.mean_nll(projector, embedding, chunk_size=128)
    uniform_nll = torch.log(torch.tensor(float(STUDENT_VOCAB))).item()
    report = prefit_projector(projector, embedding, train, heldout, student_heldout_nll=uniform_nll, max_steps=300,
                              lr=1e-2)
    assert report.beats_student, report.describe()
    assert report.heldout_nll < min(before, uniform_nll)


def test_prefit_reports_an_exhausted_budget():
    g = _generator()
    embedding, features, targets = _anchor_task(g, 100)
    data = AnchorData(features, targets)
    report = prefit_projector(LogitProjector(TEACHER_DIM, STUDENT_DIM, residual=False), embedding, data, data,
                              student_heldout_nll=0.0, max_steps=3)
    assert report.steps == 3 and not report.beats_student


def test_least_squares_init_reproduces_a_linear_relation():
    g = _generator()
    features = torch.randn(200, TEACHER_DIM, generator=g)
    relation = torch.randn(STUDENT_DIM, TEACHER_DIM, generator=g)
    hidden = features @ relation.T + 0.5
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM, residual=False)
    least_squares_init(projector, features, hidden, ridge=1e-9)
    torch.testing.assert_close(projector(features), hidden, atol=1e-4, rtol=1e-4)


def test_projector_path_gradcheck_float64():
    g = _generator()
    projector = LogitProjector(4, 3, residual=False).double()
    teacher_embedding = torch.randn(30, 4, generator=g, dtype=torch.float64)
    student_embedding = torch.randn(7, 3, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 30, (5, 6), generator=g)
    probs = torch.rand(5, 6, generator=g, dtype=torch.float64).softmax(-1).requires_grad_(True)
    targets = torch.tensor([0, 3, -100, 6, 2])

    class AnchorOfTopk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.projector = projector

        def forward(self, probs):
            features = teacher_features_from_topk(ids, probs, teacher_embedding)
            return anchor_loss(self.projector, features, student_embedding, targets, chunk_size=2)[0]

    def anchor_of(probs, weight, bias):
        parameters = {"projector.linear.weight": weight, "projector.linear.bias": bias}
        return torch.func.functional_call(AnchorOfTopk(), parameters, (probs,))

    weight = projector.linear.weight.detach().clone().requires_grad_(True)
    bias = projector.linear.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(anchor_of, (probs, weight, bias))


def _residual_task(g: torch.Generator, positions: int):
    """A student whose final state misses part of what decides the next token, and a teacher whose features carry
    that part: the residual projector has something to add."""
    embedding = torch.randn(STUDENT_VOCAB, STUDENT_DIM, generator=g)
    known = torch.randn(positions, STUDENT_DIM, generator=g)
    missing = torch.randn(positions, STUDENT_DIM, generator=g)
    mixing = torch.randn(TEACHER_DIM, STUDENT_DIM, generator=g)
    features = (known + missing) @ mixing.T * 50 + 7  # large and offset, like the real teacher's state
    targets = torch.distributions.Categorical(logits=(known + missing) @ embedding.T).sample()
    return embedding, features, known, targets


def test_residual_projector_starts_as_the_student_and_leaves_its_state_alone():
    g = _generator()
    embedding, features, student_hidden, targets = _residual_task(g, 40)
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM)
    torch.testing.assert_close(projected_logits(projector, features, embedding, student_hidden),
                               student_hidden @ embedding.T)
    hidden = student_hidden.clone().requires_grad_(True)
    anchor_loss(projector, features, embedding, targets, chunk_size=16, student_hidden=hidden)[0].backward()
    assert hidden.grad is None
    assert projector.linear.weight.grad.abs().sum() > 0


def test_residual_projector_refuses_to_run_without_the_student_state():
    g = _generator()
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM)
    try:
        projector(torch.randn(3, TEACHER_DIM, generator=g))
    except ValueError as error:
        assert "student's final hidden state" in str(error)
    else:
        raise AssertionError("a residual projector ran without the student's state")


def test_standardisation_centres_and_scales_each_channel_and_survives_a_constant_one():
    g = _generator()
    features = torch.randn(300, TEACHER_DIM, generator=g) * torch.linspace(0.1, 300, TEACHER_DIM) + 40
    features[:, 0] = 5.0  # a channel that never varies
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM)
    projector.fit_standardisation(features)
    standard = projector.standardise(features)
    assert torch.isfinite(standard).all()
    torch.testing.assert_close(standard.mean(0), torch.zeros(TEACHER_DIM), atol=1e-4, rtol=0)
    torch.testing.assert_close(standard[:, 1:].std(0), torch.ones(TEACHER_DIM - 1), atol=1e-4, rtol=0)


def test_residual_prefit_beats_the_student_and_keeps_its_best_state():
    g = _generator()
    embedding, features, student_hidden, targets = _residual_task(g, 900)
    train = AnchorData(features[:700], targets[:700], student_hidden[:700])
    heldout = AnchorData(features[700:], targets[700:], student_hidden[700:])
    projector = LogitProjector(TEACHER_DIM, STUDENT_DIM)
    projector.fit_standardisation(train.teacher_features)
    student_nll = heldout.mean_nll(projector, embedding, chunk_size=128)  # zero correction: the student itself
    report = prefit_projector(projector, embedding, train, heldout, student_nll, max_steps=200, lr=1e-2,
                              batch_pairs=128)
    assert report.beats_student, report.describe()
    assert report.heldout_nll < student_nll - 0.1
    # The projector left behind is the best one seen, the one the report describes.
    assert abs(heldout.mean_nll(projector, embedding, chunk_size=128) - report.heldout_nll) < 1e-6
