import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crosskd.schedules import (
    CURRICULUM_TERMS,
    ScheduleSettings,
    linear_ramp,
    loss_weights,
    temperature,
    term_is_computed,
)

DEFAULTS = ScheduleSettings(
    kd_alpha=0.7, feature_alpha=0.2, attention_alpha=0.3, layerwise_alpha=0.4, contrastive_alpha=0.5
)
progress = st.floats(min_value=0.0, max_value=1.0)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.0, {"kd": 0.07, "feature": 0.0, "attention": 0.0, "layerwise": 0.0, "contrastive": 0.0}),
        (0.1, {"kd": 0.385, "feature": 0.0, "attention": 0.0, "layerwise": 0.0, "contrastive": 0.0}),
        (0.2, {"kd": 0.7, "feature": 0.2 / 3, "attention": 0.1, "layerwise": 0.0, "contrastive": 0.0}),
        (0.4, {"kd": 0.7, "feature": 0.2, "attention": 0.3, "layerwise": 0.0, "contrastive": 0.0}),
        (0.55, {"kd": 0.7, "feature": 0.2, "attention": 0.3, "layerwise": 0.2, "contrastive": 0.0}),
        (0.8, {"kd": 0.7, "feature": 0.2, "attention": 0.3, "layerwise": 0.4, "contrastive": 0.25}),
        (0.9, {"kd": 0.7, "feature": 0.2, "attention": 0.3, "layerwise": 0.4, "contrastive": 0.5}),
        (1.0, {"kd": 0.7, "feature": 0.2, "attention": 0.3, "layerwise": 0.4, "contrastive": 0.5}),
    ],
)
def test_weights_at_key_progress_values(p, expected):
    weights = loss_weights(p, DEFAULTS)
    for term, value in expected.items():
        assert weights[term] == pytest.approx(value), term


@pytest.mark.parametrize(("p", "expected"), [(0.0, 2.0), (0.5, 1.75), (1.0, 1.5)])
def test_temperature_anneals_linearly(p, expected):
    assert temperature(p, ScheduleSettings(temperature_start=2.0, temperature_end=1.5)) == pytest.approx(expected)


def test_temperature_range_is_configurable():
    settings = ScheduleSettings(temperature_start=3.0, temperature_end=1.0, temperature_end_progress=0.5)
    assert temperature(0.25, settings) == pytest.approx(2.0)
    assert temperature(0.75, settings) == pytest.approx(1.0)


@given(progress)
def test_without_curriculum_every_term_is_at_its_alpha(p):
    settings = ScheduleSettings(use_curriculum=False, feature_alpha=0.2, contrastive_alpha=0.5)
    weights = loss_weights(p, settings)
    assert [weights[t] for t in CURRICULUM_TERMS] == [settings.alpha(t) for t in CURRICULUM_TERMS]


@given(progress, progress)
def test_weights_never_decrease_and_stay_within_alpha(p, q):
    early, late = sorted((p, q))
    w_early, w_late = loss_weights(early, DEFAULTS), loss_weights(late, DEFAULTS)
    for term in ("kd", *CURRICULUM_TERMS):
        assert 0.0 <= w_early[term] <= w_late[term] <= getattr(DEFAULTS, f"{term}_alpha") + 1e-12


def test_kd_warmup_starts_at_a_fraction_of_kd_alpha():
    settings = ScheduleSettings(kd_alpha=2.0, kd_warmup_start=0.25, kd_warmup_end_progress=0.5)
    assert loss_weights(0.0, settings)["kd"] == pytest.approx(0.5)
    assert loss_weights(0.5, settings)["kd"] == pytest.approx(2.0)
    assert loss_weights(0.3, ScheduleSettings(kd_warmup_end_progress=0.0))["kd"] == 1.0


def test_router_regularisers_are_constant():
    assert {loss_weights(p, DEFAULTS)["load_balance"] for p in (0.0, 0.5, 1.0)} == {DEFAULTS.load_balance_alpha}


def test_zero_length_ramp_is_a_step():
    assert linear_ramp(0.49, 0.5, 0.5) == 0.0
    assert linear_ramp(0.5, 0.5, 0.5) == 1.0


def test_heads_are_computed_from_step_zero_but_attention_only_once_weighted():
    assert term_is_computed("feature", 0.0, DEFAULTS)
    assert not term_is_computed("attention", 0.0, DEFAULTS)
    assert term_is_computed("attention", 0.2, DEFAULTS)
    assert not term_is_computed("feature", 0.5, ScheduleSettings(feature_alpha=0.0))


@pytest.mark.parametrize("p", [-0.01, 1.01, math.nan])
def test_progress_outside_unit_interval_is_an_error(p):
    with pytest.raises(ValueError):
        loss_weights(p, DEFAULTS)


@pytest.mark.parametrize(
    "overrides",
    [{"feature_ramp_start": 0.5, "feature_ramp_end": 0.4}, {"kd_alpha": -1.0}, {"temperature_end": 0.0}, {"kd_warmup_start": 1.5},
     {"contrastive_ramp_end": 1.5}, {"layerwise_alpha": math.inf}],
)
def test_invalid_settings_are_rejected(overrides):
    with pytest.raises(ValueError):
        ScheduleSettings(**overrides)
