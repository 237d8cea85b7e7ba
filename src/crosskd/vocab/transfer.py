"""The vocabulary-transfer interface and its registry: how the teacher's signal at the aligned pairs becomes a KD
target on the student's vocabulary.

A transfer is one class in one module, registered under the name `objective.strategy` selects
(`register_transfer`). It declares, from the config alone, what it needs of the teacher (`teacher_needs`: the online
teacher computes and a cache stores only that), the objective options that belong to it alone, and which option
values it refuses; once built for a run it says which aligned pairs it trains on (`kd_pairs`), prepares itself
(pre-fit), gives the KD target and per-chunk loss that the objective's fused LM + KD chunk loop evaluates, adds its
extra terms, and owns its trainable modules with their learning-rate group. Config validation, the teacher cache and
the objective read this registry; nothing else compares strategy names. docs/ARCHITECTURE.md says how to add one.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from crosskd.config import Config, ConfigError, ObjectiveConfig, check_choice, register_config_check
from crosskd.data.collate import DualBatch
from crosskd.losses.divergences import DIVERGENCES, get_divergence
from crosskd.losses.lm import KDLossSum, divergence_kd_loss, scale_kd_sum
from crosskd.losses.selection import PositionSelection
from crosskd.losses.target import MappedTarget, StudentGroups
from crosskd.losses.terms import Term
from crosskd.teacher.online import TeacherNeeds, TeacherSignal

#: (micro-batch) -> the teacher's signal there, as the run's teacher source serves it.
SignalOf = Callable[[DualBatch], TeacherSignal]


@dataclasses.dataclass(frozen=True)
class ParameterGroup:
    """Trainable parameters with their learning-rate multiplier (an optimizer parameter group named `name`)."""

    name: str
    parameters: list[nn.Parameter]
    lr_multiplier: float


class VocabularyTransfer(ABC):
    """One way to express the teacher's distribution on the student's vocabulary. Subclasses set `name`, implement
    the abstract methods and override what differs; the defaults train on every aligned pair and add no terms,
    parameters or preparation."""

    name: ClassVar[str]
    #: Objective options only this transfer reads, with their valid values (checked whatever the strategy); with
    #: another strategy, a value other than the default is refused.
    exclusive_options: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Terms the transfer adds besides KD (`extra_terms`, `likelihood_terms`): they need the teacher even while the
    #: KD weight is 0.
    extra_term_names: ClassVar[tuple[str, ...]] = ()
    #: Whether `likelihood_terms` reads the selection's likelihood chunks and the student's log-probabilities of its
    #: observed tokens (the objective's fused LM + KD chunk loop then keeps them).
    reads_likelihood_chunks: ClassVar[bool] = False

    # --- declarations, from the config alone (config validation, the teacher cache) --------------------------------
    @classmethod
    def check_config(cls, objective: ObjectiveConfig) -> None:
        """Reject option values this transfer cannot run with (ConfigError naming the reason), when it is selected."""

    @classmethod
    @abstractmethod
    def teacher_needs(cls, objective: ObjectiveConfig) -> TeacherNeeds:
        """What the transfer reads of the teacher at the aligned pairs."""

    @classmethod
    def prepares_on_training_windows(cls, objective: ObjectiveConfig) -> bool:
        """Whether `prepare` reads the preparation windows (a teacher cache must then hold their signal)."""
        return False

    @classmethod
    def build_modules(cls, objective: ObjectiveConfig, teacher_hidden: int, student_hidden: int) -> dict[str, nn.Module]:
        """The transfer's trainable modules for models of these hidden sizes, by name (their checkpoint keys): what
        a run trains and what `crosskd plan` counts (built on the meta device there)."""
        return {}

    # --- one run ------------------------------------------------------------------------------------------------
    def __init__(self, config: Config, teacher, student):
        self.config = config
        self.chunk_size = config.objective.chunk_size

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules, registered on the objective under these names (their checkpoint keys)."""
        return {}

    def parameter_groups(self) -> list[ParameterGroup]:
        return []

    def kd_pairs(self, batch: DualBatch) -> Tensor:
        """bool [P]: the aligned pairs the KD term (and the extra terms) train on."""
        return torch.ones_like(batch.pair_batch, dtype=torch.bool)

    @property
    def needs_preparation(self) -> bool:
        return False

    def prepare(self, batches: list[DualBatch], signal_of: SignalOf, student_model: nn.Module, device) -> str | None:
        """Fit what must be sane before the first step; returns a line for the log (or None)."""
        return None

    def micro_batch_inputs(self, signal: TeacherSignal, batch: DualBatch, selection: PositionSelection,
                           student_hidden: Tensor) -> Any:
        """What the KD target and the extra terms of one micro-batch share, computed once (None by default).
        `student_hidden`: the student's flat final hidden states [B * N, H]."""
        return None

    @abstractmethod
    def kd_target(self, signal: TeacherSignal, selection: PositionSelection, inputs: Any,
                  student_embedding: Tensor) -> Any:
        """The target at the selection's KD pairs (detached; anything with `ids` and `select`), in pair order."""

    @abstractmethod
    def kd_loss_sum(self, temperature: float, device) -> KDLossSum:
        """(student log-probabilities of some KD rows, the target there) -> (sum, count): one chunk's KD sum."""

    def scaled_kd_sum(self, kd_sum: Tensor, temperature: float) -> Tensor:
        """The KD sum of the micro-batch as the term enters the objective."""
        return kd_sum

    def extra_terms(self, inputs: Any, selection: PositionSelection, student_embedding: Tensor) -> dict[str, Term]:
        return {}

    def likelihood_terms(self, signal: TeacherSignal, selection: PositionSelection,
                         student_token_logp: Tensor | None) -> dict[str, Term]:
        """Terms on the selection's likelihood chunks (`reads_likelihood_chunks`), from the student's flat [B * N]
        log-probabilities of its observed next tokens (None when the transfer does not read them)."""
        return {}

    def retention_target(self, signal: TeacherSignal, selection: PositionSelection, inputs: Any,
                         student_embedding: Tensor) -> MappedTarget | None:
        """The teacher's distribution on the student's vocabulary at the KD pairs, for the retention metrics (None:
        the transfer has no token-level target; the metrics are then not reported)."""
        return self.kd_target(signal, selection, inputs, student_embedding)

    def student_groups(self, device) -> StudentGroups | None:
        """Student token groups whose members share one atom (on `device`), or None."""
        return None


class DivergenceTransfer(VocabularyTransfer):
    """A transfer whose KD term is a divergence (`objective.divergence`, forward KL by default) between the student's
    atoms and a `MappedTarget`, with the temperature² factor of `objective.scale_by_t2`."""

    @classmethod
    def check_config(cls, objective: ObjectiveConfig) -> None:
        # Any registered divergence; its parameters are checked when the run builds it (`get_divergence`).
        if objective.divergence is not None:
            check_choice(objective.divergence, tuple(DIVERGENCES), "objective.divergence")

    def __init__(self, config: Config, teacher, student):
        super().__init__(config, teacher, student)
        objective = config.objective
        self.divergence = get_divergence(objective.divergence or "forward_kl", **objective.divergence_params)
        self.scale_by_t2 = objective.scale_by_t2

    def kd_loss_sum(self, temperature: float, device) -> KDLossSum:
        return divergence_kd_loss(self.divergence, temperature, self.student_groups(device))

    def scaled_kd_sum(self, kd_sum: Tensor, temperature: float) -> Tensor:
        return scale_kd_sum(kd_sum, temperature, self.scale_by_t2)


TRANSFERS: dict[str, type[VocabularyTransfer]] = {}


def register_transfer(cls: type[VocabularyTransfer]) -> type[VocabularyTransfer]:
    """Make `cls` selectable as `objective.strategy: <cls.name>` (usable as a class decorator)."""
    TRANSFERS[cls.name] = cls
    return cls


def transfer_class(objective: ObjectiveConfig) -> type[VocabularyTransfer]:
    """The registered transfer `objective.strategy` names."""
    check_choice(objective.strategy, tuple(TRANSFERS), "objective.strategy")
    return TRANSFERS[objective.strategy]


def check_objective(config: Config) -> None:
    """The objective section against the registry: a known strategy, every transfer's own options valid, the selected
    transfer's rules, and no option of another transfer set away from its default."""
    objective = config.objective
    selected = transfer_class(objective)
    for transfer in TRANSFERS.values():
        for option, choices in transfer.exclusive_options.items():
            check_choice(getattr(objective, option), choices, f"objective.{option}")
    selected.check_config(objective)
    defaults = ObjectiveConfig()
    for transfer in TRANSFERS.values():
        for option in transfer.exclusive_options:
            value = getattr(objective, option)
            if option not in selected.exclusive_options and value != getattr(defaults, option):
                # A transfer built on another (chunk-likelihood on first-token) shares its options.
                sharing = [other.name for other in TRANSFERS.values()
                           if other is not transfer and option in other.exclusive_options]
                also = f" (and to {', '.join(sharing)}, which shares it)" if sharing else ""
                raise ConfigError(f"objective.{option} {value!r} applies only to the {transfer.name} strategy{also}; "
                                  f"remove objective.{option} or set objective.strategy: {transfer.name}")


register_config_check(check_objective)
