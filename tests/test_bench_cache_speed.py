"""bench/cache_speed.py's per-round ratios, their median and spread (pure functions; the benchmark itself loads the
reference models and is not run here)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cache_speed  # noqa: E402


def measured(step: float, load: float = 1.0) -> dict:
    return {"median_step_seconds": step, "load_average_before": [load] * 3, "load_average_after": [load] * 3}


def test_round_ratios_divide_within_the_round_and_flag_contention():
    ratios = cache_speed.round_ratios(measured(5.0), measured(5.5), measured(14.0), 2.0, cpus=2)
    assert ratios == {"cache_over_lm_only": 1.1, "online_over_teacher_plus_lm_only": 2.0,
                      "teacher_forward_seconds": 2.0, "contended": False}
    without_online = cache_speed.round_ratios(measured(5.0), measured(6.0, load=3.0), None, None, cpus=2)
    assert without_online == {"cache_over_lm_only": 1.2, "contended": True}


def test_median_and_spread_over_the_rounds_that_have_each_ratio():
    rounds = [{"cache_over_lm_only": 1.1, "online_over_teacher_plus_lm_only": 1.5}, {"cache_over_lm_only": 1.3},
              {"cache_over_lm_only": 1.0, "online_over_teacher_plus_lm_only": 1.7}, {"cache_over_lm_only": 1.2}]
    median, spread = cache_speed.median_and_spread(rounds)
    assert median == {"cache_over_lm_only": 1.15, "online_over_teacher_plus_lm_only": 1.6}
    assert spread["cache_over_lm_only"] == {"min": 1.0, "max": 1.3, "rounds": 4}
    assert spread["online_over_teacher_plus_lm_only"] == {"min": 1.5, "max": 1.7, "rounds": 2}


def test_each_transfer_has_its_ratio_and_its_median_over_the_rounds():
    transfers = {"first-token-chain-rule": measured(5.25), "chunk-likelihood": measured(6.0, load=3.0)}
    ratios = cache_speed.round_ratios(measured(5.0), measured(5.5), None, None, cpus=2, transfers=transfers)
    assert ratios == {"cache_over_lm_only": 1.1, "first-token-chain-rule_over_lm_only": 1.05,
                      "chunk-likelihood_over_lm_only": 1.2, "contended": True}
    median, spread = cache_speed.median_and_spread([ratios, {**ratios, "chunk-likelihood_over_lm_only": 1.0}])
    assert list(median) == ["cache_over_lm_only", "first-token-chain-rule_over_lm_only",
                            "chunk-likelihood_over_lm_only"]
    assert median["chunk-likelihood_over_lm_only"] == 1.1
    assert spread["chunk-likelihood_over_lm_only"] == {"min": 1.0, "max": 1.2, "rounds": 2}


def test_rounds_alternate_which_run_goes_first():
    transfers = ["first-token-chain-rule"]
    assert cache_speed.round_order(0, transfers) == ["lm_only", "cache", "first-token-chain-rule"]
    assert cache_speed.round_order(1, transfers) == ["first-token-chain-rule", "cache", "lm_only"]
    assert cache_speed.round_order(2, []) == ["lm_only", "cache"]
