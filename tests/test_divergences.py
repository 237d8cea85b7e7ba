"""Divergences: values against TRL and closed forms, empty atoms, gradients, the registry."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from crosskd.losses.divergences import (
    DIVERGENCES,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from crosskd.losses.target import student_atoms, target_atoms, teacher_topk

ALL_DIVERGENCES = sorted(DIVERGENCES)


def random_logp(*shape: int, seed: int, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=dtype)).log_softmax(-1)


@pytest.fixture(scope="module")
def trl_generalized_jsd_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl(trl_generalized_jsd_loss, beta):
    generator = torch.Generator().manual_seed(7)
    student_logits = 4 * torch.randn(64, 300, generator=generator)
    teacher_logits = 4 * torch.randn(64, 300, generator=generator)
    # 2-D input: TRL's "batchmean" then divides by the number of positions, i.e. a per-token mean.
    expected = trl_generalized_jsd_loss(student_logits, teacher_logits, beta=beta, temperature=1.0)
    ours = generalized_jsd(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), beta=beta).mean()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_full_vocabulary_pipeline_matches_trl(trl_generalized_jsd_loss, beta):
    """teacher_topk with k = V and the student's atoms on that support reduce to TRL's full-vocabulary loss."""
    generator = torch.Generator().manual_seed(8)
    student_logits = 3 * torch.randn(32, 120, generator=generator)
    teacher_logits = 3 * torch.randn(32, 120, generator=generator)
    target = teacher_topk(teacher_logits, k=120, valid_mask=torch.ones(120, dtype=torch.bool)).as_support()
    ours = generalized_jsd(
        student_atoms(student_logits, target.ids, target.mask, 1.0), target_atoms(target, 1.0), beta=beta
    ).mean()
    expected = trl_generalized_jsd_loss(student_logits, teacher_logits, beta=beta, temperature=1.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_closed_forms_in_float64():
    s = random_logp(16, 9, seed=1, dtype=torch.float64)
    t = random_logp(16, 9, seed=2, dtype=torch.float64)
    p_s, p_t = s.exp(), t.exp()
    kl = lambda p, q: (p * (p / q).log()).sum(-1)  # noqa: E731 - closed form on strictly positive probabilities
    torch.testing.assert_close(forward_kl(s, t), kl(p_t, p_s))
    torch.testing.assert_close(reverse_kl(s, t), kl(p_s, p_t))
    torch.testing.assert_close(total_variation(s, t), 0.5 * (p_s - p_t).abs().sum(-1))
    torch.testing.assert_close(skew_kl(s, t, alpha=0.3), kl(p_t, 0.3 * p_t + 0.7 * p_s))
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.3), kl(p_s, 0.3 * p_s + 0.7 * p_t))
    mixture = 0.25 * p_t + 0.75 * p_s
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.25), 0.25 * kl(p_t, mixture) + 0.75 * kl(p_s, mixture))


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_nonnegative_and_zero_on_identical(name):
    divergence = get_divergence(name)
    s, t = random_logp(50, 40, seed=3), random_logp(50, 40, seed=4)
    assert (divergence(s, t) >= 0).all()
    assert divergence(s, t).min() > 0
    torch.testing.assert_close(divergence(s, s), torch.zeros(50), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_empty_atoms_contribute_nothing_and_keep_gradients_finite(name):
    """An atom that is -inf on both sides (a padded support slot) behaves as if it were not there."""
    divergence = get_divergence(name)
    s_logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    empty = torch.tensor([False, True, False, False, True])
    s = s_logits.masked_fill(empty, -math.inf).log_softmax(-1)
    t = t_logits.masked_fill(empty, -math.inf).log_softmax(-1)
    value = divergence(s, t)
    torch.testing.assert_close(value, divergence(s[:, ~empty], t[:, ~empty]))
    value.sum().backward()
    assert torch.isfinite(s_logits.grad).all() and torch.isfinite(t_logits.grad).all()


def test_teacher_mass_where_student_has_none_is_infinite_not_nan():
    s = torch.tensor([[0.0, -math.inf]])
    t = torch.tensor([[math.log(0.5), math.log(0.5)]])
    assert forward_kl(s, t).item() == math.inf
    assert reverse_kl(s, t).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_gradcheck_float64(name):
    divergence = get_divergence(name)
    empty = torch.tensor([False, False, True, False, False, False])  # gradients must also survive an empty atom

    def from_logits(s_logits, t_logits):
        return divergence(
            s_logits.masked_fill(empty, -math.inf).log_softmax(-1),
            t_logits.masked_fill(empty, -math.inf).log_softmax(-1),
        )

    generator = torch.Generator().manual_seed(5)
    s_logits = torch.randn(4, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    t_logits = torch.randn(4, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(from_logits, (s_logits, t_logits))


def test_registry_suggests_nearest_name_and_parameter():
    with pytest.raises(ValueError, match="did you mean 'forward_kl'"):
        get_divergence("forward_kld")
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        get_divergence("generalized_jsd", betta=0.5)
    with pytest.raises(ValueError, match="takes no parameters"):
        get_divergence("total_variation", beta=0.5)
    with pytest.raises(ValueError, match="0 <= beta <= 1"):
        get_divergence("generalized_jsd", beta=1.5)
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        get_divergence("skew_kl", alpha=0.0)


def test_registry_binds_parameters():
    s, t = random_logp(3, 7, seed=9), random_logp(3, 7, seed=10)
    torch.testing.assert_close(get_divergence("generalized_jsd", beta=0.2)(s, t), generalized_jsd(s, t, beta=0.2))
    torch.testing.assert_close(get_divergence("skew_kl")(s, t), skew_kl(s, t, alpha=0.1))
    assert not torch.allclose(get_divergence("generalized_jsd", beta=0.2)(s, t), generalized_jsd(s, t))


def test_extreme_but_finite_log_probabilities_stay_finite():
    """Log-probabilities whose probabilities underflow to 0 in float32 must not produce inf or NaN."""
    s = F.log_softmax(torch.tensor([[0.0, -80.0, -200.0]]), -1)
    t = F.log_softmax(torch.tensor([[-200.0, 0.0, -80.0]]), -1)
    for name in ALL_DIVERGENCES:
        assert torch.isfinite(get_divergence(name)(s, t)).all(), name
