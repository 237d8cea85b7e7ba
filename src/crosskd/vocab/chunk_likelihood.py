"""The `chunk-likelihood` strategy: approximate likelihood matching (Minixhofer, Vulić & Ponti 2025; tokenkit's ALM)
on the chunks of text between the token boundaries both tokenisations share, beside first-token's token-level KD.

Each chunk's teacher log-likelihood is the sum of the teacher's log-probabilities of its own observed tokens there
(`TeacherSignal.observed_logprobs`), the student's the same from its LM log-probabilities, read from the objective's
fused chunk loop (no second pass over the vocabulary). The term compares the two per chunk
(`objective.chunk_likelihood_loss`, crosskd.losses.likelihood) and is normalised by the step's chunk count. It needs
no vocabulary map: it reaches the positions inside a multi-token teacher span and past the teacher's next token,
where first-token has no correct target (docs/VOCAB.md).

The strategy is first-token (its map, mismatch policies and KD term "kd", weighted by `kd_alpha` and the KD warm-up)
plus the term "chunk_likelihood" at the constant weight `objective.chunk_likelihood_weight`. With `kd_alpha: 0` it is
the chunk term alone: no token-level target is built and the teacher computes (and a cache stores) only its
observed-token log-probabilities.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from crosskd.config import Config, ConfigError, ObjectiveConfig, register_config_check
from crosskd.losses.likelihood import CHUNK_LOSSES
from crosskd.losses.terms import PER_TOKEN, Term
from crosskd.teacher.online import TeacherNeeds
from crosskd.vocab.first_token import FirstTokenTransfer
from crosskd.vocab.transfer import register_transfer

CHUNK_LIKELIHOOD = "chunk-likelihood"
#: Its options that take a number (`chunk_likelihood_loss`, a choice, is one of its `exclusive_options`).
NUMBER_OPTIONS = ("chunk_likelihood_temperature", "chunk_likelihood_weight")


def _has_token_kd(objective: ObjectiveConfig) -> bool:
    return objective.kd_alpha > 0


@register_transfer
class ChunkLikelihoodTransfer(FirstTokenTransfer):
    """First-token KD (while `kd_alpha` > 0) plus the chunk-likelihood term."""

    name = CHUNK_LIKELIHOOD
    exclusive_options = {**FirstTokenTransfer.exclusive_options, "chunk_likelihood_loss": tuple(CHUNK_LOSSES)}
    extra_term_names = ("chunk_likelihood",)
    reads_likelihood_chunks = True

    @classmethod
    def check_config(cls, objective: ObjectiveConfig) -> None:
        super().check_config(objective)
        if not objective.chunk_likelihood_temperature > 0:
            raise ConfigError(f"objective.chunk_likelihood_temperature must be positive, got "
                              f"{objective.chunk_likelihood_temperature} (tokenkit uses 100)")
        if not objective.chunk_likelihood_weight >= 0:
            raise ConfigError(f"objective.chunk_likelihood_weight must be 0 or more, got "
                              f"{objective.chunk_likelihood_weight}")

    @classmethod
    def teacher_needs(cls, objective: ObjectiveConfig) -> TeacherNeeds:
        token_level = super().teacher_needs(objective)
        return dataclasses.replace(token_level, topk=_has_token_kd(objective), observed_logprobs=True)

    def __init__(self, config: Config, teacher, student):
        super().__init__(config, teacher, student)
        objective = config.objective
        self.token_kd = _has_token_kd(objective)
        self.chunk_loss = CHUNK_LOSSES[objective.chunk_likelihood_loss]
        self.chunk_temperature = objective.chunk_likelihood_temperature
        self.chunk_weight = objective.chunk_likelihood_weight

    def kd_pairs(self, batch) -> Tensor:
        if not self.token_kd:
            return torch.zeros_like(batch.pair_batch, dtype=torch.bool)
        return super().kd_pairs(batch)

    def kd_target(self, signal, selection, inputs, student_embedding):
        return super().kd_target(signal, selection, inputs, student_embedding) if self.token_kd else None

    def likelihood_terms(self, signal, selection, student_token_logp: Tensor) -> dict[str, Term]:
        chunks = selection.chunks
        losses = self.chunk_loss(chunks.student(student_token_logp), chunks.teacher(signal.observed_logprobs),
                                 self.chunk_temperature)
        return {"chunk_likelihood": Term(losses.sum(), PER_TOKEN, count_key="chunks", scale=self.chunk_weight)}


def check_number_options(config: Config) -> None:
    """The chunk-likelihood numbers set away from their defaults with another strategy are refused (they would be
    silently ignored)."""
    objective, defaults = config.objective, ObjectiveConfig()
    if objective.strategy == CHUNK_LIKELIHOOD:
        return
    for option in NUMBER_OPTIONS:
        if getattr(objective, option) != getattr(defaults, option):
            raise ConfigError(f"objective.{option} {getattr(objective, option)!r} applies only to the "
                              f"{CHUNK_LIKELIHOOD} strategy; remove objective.{option} or set objective.strategy: "
                              f"{CHUNK_LIKELIHOOD}")


register_config_check(check_number_options)
