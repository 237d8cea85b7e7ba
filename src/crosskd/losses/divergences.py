"""Divergences between a student and a teacher distribution over the same atoms.

Every divergence is a pure function ``(student_logp [P, A], teacher_logp [P, A], **params) -> [P]``: both
arguments are log-probabilities over the same A atoms (each row sums to 1), the result is one value per
position. Reductions (sums, counts, the tau^2 factor) belong to the caller.

Empty atoms: an atom with probability 0 (log-probability -inf, e.g. a padded support slot) contributes
exactly 0 to p * log(p / q), the limit of x log x at 0. This is done by replacing the empty entries with a
finite value *before* the arithmetic and selecting 0 afterwards, so neither the forward value nor the
gradient ever sees ``0 * inf``. A teacher atom with mass where the student has none gives a true +inf
forward KL: it is not clamped.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

Divergence = Callable[..., Tensor]

# Parameter name -> (predicate, human-readable range). One table serves the functions and get_divergence.
_PARAM_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    # 0 and 1 are TRL's special cases (forward and reverse KL).
    "beta": (lambda v: 0.0 <= v <= 1.0, "0 <= beta <= 1"),
    # alpha = 0 would be forward (or reverse) KL and alpha = 1 is identically 0: use those by name instead.
    "alpha": (lambda v: 0.0 < v < 1.0, "0 < alpha < 1"),
}


def _require_in_range(name: str, value: float) -> None:
    accepts, description = _PARAM_RANGES[name]
    if not accepts(value):
        raise ValueError(f"{name}={value!r} is out of range: need {description}")


def _kl_terms(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """Per-atom p * (log p - log q); exactly 0 where p is 0, whatever q is."""
    empty = p_logp.exp() == 0
    safe_p_logp = p_logp.masked_fill(empty, 0.0)
    safe_q_logp = q_logp.masked_fill(empty, 0.0)
    return torch.where(empty, 0.0, safe_p_logp.exp() * (safe_p_logp - safe_q_logp))


def _kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p || q) per position."""
    return _kl_terms(p_logp, q_logp).sum(-1)


def _log_mixture(a_logp: Tensor, b_logp: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space like TRL (needs 0 < weight_a < 1).

    Atoms empty on both sides stay -inf; they are masked before logsumexp because its gradient at an
    all -inf input is NaN.
    """
    both_empty = torch.isneginf(a_logp) & torch.isneginf(b_logp)
    weighted = torch.stack(
        [
            a_logp.masked_fill(both_empty, 0.0) + math.log(weight_a),
            b_logp.masked_fill(both_empty, 0.0) + math.log1p(-weight_a),
        ]
    )
    return weighted.logsumexp(0).masked_fill(both_empty, -math.inf)


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(teacher || student): mass-covering, the classic distillation loss."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(student || teacher): mode-seeking."""
    return _kl(student_logp, teacher_logp)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence with TRL's convention (GKD, Agarwal et al. 2024, eq. 1).

    With the mixture M = beta * teacher + (1 - beta) * student:
    JSD_beta = beta * KL(teacher || M) + (1 - beta) * KL(student || M).
    As in TRL, beta = 0 is forward KL and beta = 1 is reverse KL by special case (the formula itself tends to
    0 at both ends, so the value is discontinuous there, exactly as in ``GKDTrainer.generalized_jsd_loss``).
    """
    _require_in_range("beta", beta)
    if beta == 0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1:
        return reverse_kl(student_logp, teacher_logp)
    mixture_logp = _log_mixture(teacher_logp, student_logp, weight_a=beta)
    return beta * _kl(teacher_logp, mixture_logp) + (1 - beta) * _kl(student_logp, mixture_logp)


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation distance: half the L1 distance between the probability vectors, in [0, 1]."""
    return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)


def skew_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024): KL(teacher || alpha * teacher + (1 - alpha) * student).

    Mixing a little of the teacher into the student keeps the divergence finite and its gradient bounded
    where the student puts almost no mass; alpha = 0.1 is DistiLLM's default.
    """
    _require_in_range("alpha", alpha)
    return _kl(teacher_logp, _log_mixture(teacher_logp, student_logp, weight_a=alpha))


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL of DistiLLM: KL(student || alpha * student + (1 - alpha) * teacher)."""
    _require_in_range("alpha", alpha)
    return _kl(student_logp, _log_mixture(student_logp, teacher_logp, weight_a=alpha))


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}

_DISTRIBUTION_ARGS = ("student_logp", "teacher_logp")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_divergence(name: str, **params: float) -> Divergence:
    """The divergence ``name`` with its parameters bound, checked now rather than at the first step."""
    if name not in DIVERGENCES:
        known = sorted(DIVERGENCES)
        raise ValueError(f"unknown divergence {name!r}{_did_you_mean(name, known)}; known: {', '.join(known)}")
    divergence = DIVERGENCES[name]
    accepted = [p for p in inspect.signature(divergence).parameters if p not in _DISTRIBUTION_ARGS]
    for param, value in params.items():
        if param not in accepted:
            hint = _did_you_mean(param, accepted)
            takes = ", ".join(accepted) if accepted else "no parameters"
            raise ValueError(f"divergence {name!r} has no parameter {param!r}{hint}; it takes {takes}")
        _require_in_range(param, value)
    return functools.partial(divergence, **params)
