"""The budget curve's harness (bench/budget_curve.py): its run overrides and the token multiplier's arithmetic.

The curve itself comes from `python bench/budget_curve.py`; here only what turns runs into figures is checked.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import budget_curve  # noqa: E402  (bench/ is not a package)
from crosskd.config import load_config  # noqa: E402

LM_STEPS, LM_BPB = [60, 120, 240, 480], [0.73, 0.71, 0.70, 0.69]


def test_a_bpb_on_the_lm_only_curve_is_reached_at_its_own_step():
    assert budget_curve.lm_only_steps_for(0.71, LM_STEPS, LM_BPB) == (pytest.approx(120), False)


def test_between_two_points_the_steps_are_interpolated_in_log_steps():
    steps, extrapolated = budget_curve.lm_only_steps_for(0.705, LM_STEPS, LM_BPB)
    assert not extrapolated and steps == pytest.approx(math.sqrt(120 * 240))


def test_beyond_the_curve_the_last_slope_extrapolates_and_is_flagged():
    steps, extrapolated = budget_curve.lm_only_steps_for(0.68, LM_STEPS, LM_BPB)
    assert extrapolated and steps == pytest.approx(960)  # one more 0.01 drop per doubling


def test_a_curve_that_stopped_improving_reaches_nothing_better():
    assert budget_curve.lm_only_steps_for(0.60, [120, 240], [0.70, 0.70]) == (math.inf, True)
    assert budget_curve.lm_only_steps_smoothed(0.60, [120, 240], [0.70, 0.70]) == (math.inf, True)


def test_the_smoothed_curve_pools_the_evaluations_where_bpb_rose():
    assert budget_curve.never_rising([0.73, 0.71, 0.712, 0.70]) == pytest.approx([0.73, 0.711, 0.711, 0.70])
    assert budget_curve.never_rising([0.73, 0.70, 0.71, 0.72, 0.69]) == pytest.approx([0.73, 0.71, 0.71, 0.71, 0.69])
    assert budget_curve.never_rising(LM_BPB) == LM_BPB
    # One noisy evaluation (240 steps worse than 120): interpolation finds LM-only's own 240-step BPB before step
    # 120, a multiplier of 0.47 for LM-only against itself; the smoothed curve reaches the pooled 0.711 first at 120
    # and anything better only after 240.
    noisy = [0.73, 0.71, 0.712, 0.70]
    assert budget_curve.lm_only_steps_for(0.712, LM_STEPS, noisy)[0] < 120
    assert budget_curve.lm_only_steps_smoothed(0.711, LM_STEPS, noisy) == (pytest.approx(120), False)
    steps, extrapolated = budget_curve.lm_only_steps_smoothed(0.7105, LM_STEPS, noisy)
    assert not extrapolated and 240 < steps < 480


def test_the_trend_is_fitted_in_doublings_from_its_first_step():
    intercept, slope = budget_curve.log_linear_trend([60, *LM_STEPS[1:]], [0.80, *LM_BPB[1:]], from_step=120)
    assert slope == pytest.approx(-0.01) and intercept + slope * math.log2(120) == pytest.approx(0.71)
    with pytest.raises(ValueError, match="two or more"):
        budget_curve.log_linear_trend([60, 480], [0.73, 0.69], from_step=120)


def test_the_targets_are_read_on_the_trend_in_each_others_terms():
    # LM-only drops 0.01 per doubling and the teacher sits 0.09 below its last point: a third of the gap is 0.03,
    # three doublings, a multiplier of 8; a 3x multiplier is log2(3) * 0.01 below each point.
    lm = {"steps": LM_STEPS, "bpb": LM_BPB}
    targets = budget_curve.issue_targets(lm, teacher_bpb=0.60, curve_steps=(60, 120, 240, 480))
    assert targets["third_of_gap_at_480"] == {"bpb": pytest.approx(0.66), "multiplier_it_means": pytest.approx(8)}
    assert targets["bpb_at_3x"] == {"120": pytest.approx(0.71 - 0.01 * math.log2(3)),
                                    "240": pytest.approx(0.70 - 0.01 * math.log2(3)),
                                    "480": pytest.approx(0.69 - 0.01 * math.log2(3))}
    assert targets["gap_closed_by_3x_at_480"] == pytest.approx(0.01 * math.log2(3) / 0.09)


@pytest.mark.parametrize("scenario", budget_curve.SCENARIOS)
def test_every_default_method_forms_a_run_of_the_scenarios_length(scenario, tmp_path):
    for method in budget_curve.DEFAULT_METHODS:
        config = load_config(budget_curve.BASE_CONFIG, budget_curve.overrides(method, scenario))
        assert config.training.max_steps == scenario.steps
        assert config.training.eval_every == budget_curve.EVAL_EVERY
        # The KD warm-up spans the protocol's 12 steps whatever the run's length.
        assert config.schedule.kd_warmup_end_progress * scenario.steps == pytest.approx(12)
        if config.teacher.source == "cache":  # the cache of this scenario's windows, not the protocol's
            assert Path(config.teacher.cache_dir).parent == budget_curve.RUN_ROOT / scenario.name


def test_the_teacher_text_scenario_writes_the_text_before_the_cache_and_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_curve, "RUN_ROOT", tmp_path)
    commands = []
    monkeypatch.setattr(budget_curve, "crosskd", lambda arguments: commands.append(arguments[0]))
    scenario = budget_curve.DATA_LIMITED_TEACHER_TEXT
    budget_curve.run("first-token-cached", scenario)
    assert commands == ["write-teacher-text", "cache-teacher", "train"]
    config = load_config(budget_curve.BASE_CONFIG, budget_curve.overrides("first-token-cached", scenario))
    assert config.data.teacher_text.dir == str(budget_curve.TEACHER_TEXT_DIR)
    assert config.data.max_train_windows == 240
    assert not budget_curve.DATA_LIMITED.reads_teacher_text and scenario.reads_teacher_text


def test_a_cached_method_run_online_reads_no_cache_and_keeps_its_other_settings():
    method, scenario = "first-token-lr1e-4", budget_curve.STREAM
    cached = load_config(budget_curve.BASE_CONFIG, budget_curve.overrides(method, scenario))
    online = load_config(budget_curve.BASE_CONFIG, budget_curve.overrides(method, scenario, teacher_online=True))
    assert cached.teacher.source == "cache" and online.teacher.source == "online"
    assert online.optimizer.lr == cached.optimizer.lr == pytest.approx(1e-4)
    assert online.objective == cached.objective


def test_a_method_without_a_run_here_keeps_its_committed_curve(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_curve, "RUN_ROOT", tmp_path)  # no runs on this machine
    committed = {"methods": {"lm-only": {"steps": [60, 120], "bpb": [0.73, 0.71]}}}
    summary = budget_curve.scenario_summary(budget_curve.STREAM, committed)
    assert summary["methods"]["lm-only"]["bpb"] == [0.73, 0.71]
    assert summary["multiplier"]["lm-only"] == {"60": pytest.approx(1.0), "120": pytest.approx(1.0)}


def test_the_data_limited_multipliers_count_steps_of_fresh_text(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_curve, "RUN_ROOT", tmp_path)
    repeated = {"methods": {"lm-only": {"steps": [60, 120], "bpb": [0.73, 0.74]}}}  # overfits in its second epoch
    fresh = {"steps": LM_STEPS, "bpb": LM_BPB}
    summary = budget_curve.scenario_summary(budget_curve.DATA_LIMITED, repeated, fresh_data_lm_only=fresh)
    assert summary["multiplier"]["lm-only"]["60"] == pytest.approx(1.0)  # its first epoch is fresh text
    assert summary["multiplier"]["lm-only"]["120"] < 0.5 and summary["extrapolated"]["lm-only"]["120"]


def test_a_shortened_stream_is_the_full_runs_first_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_curve, "RUN_ROOT", tmp_path)
    short = budget_curve.shortened(budget_curve.STREAM, 240)
    assert (short.name, short.steps, short.curve_steps) == ("stream", 240, (60, 120, 240))
    assert budget_curve.run_dir("lm-only", short) == budget_curve.run_dir("lm-only", budget_curve.STREAM)
    full = load_config(budget_curve.BASE_CONFIG, budget_curve.overrides("first-token-cached", budget_curve.STREAM))
    first = load_config(budget_curve.BASE_CONFIG, budget_curve.overrides("first-token-cached", short))
    assert first.training.max_steps == 240
    # The same KD warm-up in steps, the same constant rate and windows: only the run's length differs.
    assert first.schedule.kd_warmup_end_progress * 240 == pytest.approx(full.schedule.kd_warmup_end_progress * 480)
    assert first.optimizer == full.optimizer and first.data == full.data
    for steps in (250, 540):
        with pytest.raises(ValueError, match="multiple of 60 up to 480"):
            budget_curve.shortened(budget_curve.STREAM, steps)


def test_a_run_started_at_another_length_is_refused_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_curve, "RUN_ROOT", tmp_path)
    commands = []
    monkeypatch.setattr(budget_curve, "crosskd", lambda arguments: commands.append(arguments[0]))
    short = budget_curve.shortened(budget_curve.STREAM, 240)
    budget_curve.run("lm-only", short)  # starts it: writes how it was started, then trains
    assert commands == ["train"] and budget_curve.started_steps("lm-only", short) == 240
    with pytest.raises(SystemExit, match="started as a 240-step run.*--steps 240, or remove the folder"):
        budget_curve.run("lm-only", budget_curve.STREAM)
    assert commands == ["train"]


def test_a_small_corpus_is_worth_the_fresh_text_its_best_epoch_matches(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_curve, "RUN_ROOT", tmp_path)
    repeated = {"methods": {"lm-only": {"steps": [60, 120], "bpb": [0.73, 0.74]},
                            "first-token-cached": {"steps": [60, 120, 180], "bpb": [0.725, 0.705, 0.72]}}}
    fresh = {"steps": LM_STEPS, "bpb": LM_BPB}
    worth = budget_curve.scenario_summary(budget_curve.DATA_LIMITED, repeated, fresh_data_lm_only=fresh)[
        "corpus_multiplier"]
    assert worth["lm-only"] == {"best_bpb": 0.73, "at_step": 60, "fresh_steps": pytest.approx(60),
                                "multiplier": pytest.approx(1.0), "extrapolated": False}
    # Its best epoch (0.705 at 120 steps) is what LM-only reaches halfway between 120 and 240 fresh steps, in log steps.
    assert worth["first-token-cached"]["at_step"] == 120
    assert worth["first-token-cached"]["multiplier"] == pytest.approx(math.sqrt(120 * 240) / 60)
    # The stream's LM-only is fresh text itself: no corpus to be worth.
    assert "corpus_multiplier" not in budget_curve.scenario_summary(budget_curve.STREAM, repeated)
