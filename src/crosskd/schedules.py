"""Loss weights and KD temperature as pure functions of training progress.

Progress is ``p = optimizer_step / total_optimizer_steps`` in [0, 1]. Nothing here keeps state, so a resumed run,
the logger and the docs table (``bench/schedule_table.py``) all see exactly the weights the loop used.

What a weight means for the auxiliary terms (feature, attention, layerwise, contrastive): it is the factor on the
gradient that flows *into the student*. Their heads (router, projections) train at full strength from step 0 on
detached student states (see ``crosskd.losses.features.scale_gradient``), so a weight of 0 means "the student is not
touched yet", never "the head is not trained". The router's load-balancing and expert-importance terms only reach the
gate, so their weights are constants and are not part of the curriculum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from crosskd.config import Config, ObjectiveConfig, RouterConfig, ScheduleConfig

# Terms whose weight is ramped in by the curriculum, in the order the curriculum switches them on.
CURRICULUM_TERMS = ("feature", "attention", "layerwise", "contrastive")
# Terms with a learned head that must train from step 0, even while the student receives none of their gradient.
TERMS_WITH_HEADS = ("feature", "layerwise", "contrastive")


@dataclass(frozen=True)
class ScheduleSettings:
    """Plain values; the trainer's config maps onto these field names one to one (`schedule_settings`), and the
    defaults are the config's."""

    kd_alpha: float = ObjectiveConfig.kd_alpha
    # The logit projector starts untrained, so KD starts small and reaches kd_alpha at kd_warmup_end_progress.
    # A fraction of kd_alpha (not an absolute weight), so kd_alpha = 0 means no KD at any p.
    kd_warmup_start: float = ScheduleConfig.kd_warmup_start
    kd_warmup_end_progress: float = ScheduleConfig.kd_warmup_end_progress

    temperature_start: float = ScheduleConfig.temperature_start
    temperature_end: float = ScheduleConfig.temperature_end
    temperature_start_progress: float = 0.0
    temperature_end_progress: float = 1.0

    # Only the feature (router) term is on by default; the others are opt-in until benchmarked.
    feature_alpha: float = RouterConfig.feature_alpha
    attention_alpha: float = RouterConfig.attention_alpha
    layerwise_alpha: float = RouterConfig.layerwise_alpha
    contrastive_alpha: float = RouterConfig.contrastive_alpha
    # Gate-only regularisers of the router; constant because no gradient from them reaches the student.
    load_balance_alpha: float = RouterConfig.load_balance_alpha
    importance_alpha: float = RouterConfig.importance_alpha

    # False: every curriculum term sits at its alpha from p = 0 (the KD warm-up is separate; set
    # kd_warmup_end_progress = 0 to switch it off).
    use_curriculum: bool = ScheduleConfig.use_curriculum
    feature_ramp_start: float = 0.1
    feature_ramp_end: float = 0.4
    attention_ramp_start: float = 0.1
    attention_ramp_end: float = 0.4
    layerwise_ramp_start: float = 0.4
    layerwise_ramp_end: float = 0.7
    contrastive_ramp_start: float = 0.7
    contrastive_ramp_end: float = 0.9

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise ValueError(f"schedule setting {field.name} must be finite, got {value}")
            if field.name.endswith("_alpha") and value < 0:
                raise ValueError(f"{field.name} must be >= 0, got {value}")
        if not 0.0 <= self.kd_warmup_start <= 1.0:
            raise ValueError(f"kd_warmup_start is a fraction of kd_alpha in [0, 1], got {self.kd_warmup_start}")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ValueError("temperatures must be > 0")
        ranges = {
            "kd_warmup": (0.0, self.kd_warmup_end_progress),
            "temperature": (self.temperature_start_progress, self.temperature_end_progress),
            **{term: self.ramp_range(term) for term in CURRICULUM_TERMS},
        }
        for name, (start, end) in ranges.items():
            if not 0.0 <= start <= end <= 1.0:
                raise ValueError(f"{name} progress range must satisfy 0 <= start <= end <= 1, got ({start}, {end})")

    def alpha(self, term: str) -> float:
        return getattr(self, f"{term}_alpha")

    def ramp_range(self, term: str) -> tuple[float, float]:
        return getattr(self, f"{term}_ramp_start"), getattr(self, f"{term}_ramp_end")


def _check_progress(p: float) -> None:
    # A progress outside [0, 1] means the step or the total is wrong; a silent clamp would hide it.
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {p}")


def linear_ramp(p: float, start: float, end: float) -> float:
    """0 before ``start``, 1 from ``end`` on, linear in between; a zero-length range is a step at ``start``."""
    if p < start:
        return 0.0
    if p >= end:
        return 1.0
    return (p - start) / (end - start)


def _interpolate(p: float, start_value: float, end_value: float, start: float, end: float) -> float:
    return start_value + (end_value - start_value) * linear_ramp(p, start, end)


def kd_weight(p: float, settings: ScheduleSettings) -> float:
    _check_progress(p)
    fraction = _interpolate(p, settings.kd_warmup_start, 1.0, 0.0, settings.kd_warmup_end_progress)
    return settings.kd_alpha * fraction


def temperature(p: float, settings: ScheduleSettings) -> float:
    """KD temperature, linear from temperature_start to temperature_end over its progress range."""
    _check_progress(p)
    return _interpolate(
        p,
        settings.temperature_start,
        settings.temperature_end,
        settings.temperature_start_progress,
        settings.temperature_end_progress,
    )


def curriculum_weight(term: str, p: float, settings: ScheduleSettings) -> float:
    _check_progress(p)
    if not settings.use_curriculum:
        return settings.alpha(term)
    return settings.alpha(term) * linear_ramp(p, *settings.ramp_range(term))


def loss_weights(p: float, settings: ScheduleSettings) -> dict[str, float]:
    """Every term's weight at progress p.

    ``kd``: factor on the KD loss. ``feature``/``attention``/``layerwise``/``contrastive``: factor on the gradient
    into the student. ``load_balance``/``importance``: factors on the router's gate-only regularisers.
    """
    weights = {"kd": kd_weight(p, settings)}
    weights.update({term: curriculum_weight(term, p, settings) for term in CURRICULUM_TERMS})
    weights["load_balance"] = settings.load_balance_alpha
    weights["importance"] = settings.importance_alpha
    return weights


def term_is_computed(term: str, p: float, settings: ScheduleSettings) -> bool:
    """Whether the loop must compute a curriculum term at progress p.

    A term with a head is computed whenever it is configured (alpha > 0), because its head trains from step 0.
    The attention term has no head, so it is skipped (and attentions are not requested) while its weight is 0.
    """
    if term in TERMS_WITH_HEADS:
        return settings.alpha(term) > 0
    return curriculum_weight(term, p, settings) > 0


def schedule_settings(config: Config) -> ScheduleSettings:
    """The schedule of this run: config values, with terms that are switched off at weight 0."""
    router = config.router
    on = router.enabled
    return ScheduleSettings(
        kd_alpha=config.objective.kd_alpha,
        kd_warmup_start=config.schedule.kd_warmup_start,
        kd_warmup_end_progress=config.schedule.kd_warmup_end_progress,
        temperature_start=config.schedule.temperature_start,
        temperature_end=config.schedule.temperature_end,
        use_curriculum=config.schedule.use_curriculum,
        feature_alpha=router.feature_alpha if on else 0.0,
        attention_alpha=router.attention_alpha if on else 0.0,
        layerwise_alpha=router.layerwise_alpha if on else 0.0,
        contrastive_alpha=router.contrastive_alpha if on else 0.0,
        load_balance_alpha=router.load_balance_alpha if on else 0.0,
        importance_alpha=router.importance_alpha if on else 0.0,
    )
