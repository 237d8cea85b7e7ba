"""bench/step_pairs.py's summary of paired steps (a pure function; the benchmark itself loads the reference models and
is not run here)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import step_pairs  # noqa: E402


def test_kd_own_cost_and_ratios_are_taken_pair_by_pair():
    # (wall s, CPU s, kernel CPU s, page faults) per side; the second pair ran on a slower moment of the machine.
    pairs = [{"cached": (6.6, 13.0, 1.0, 15_000), "lm_only": (6.0, 12.0, 0.9, 13_000)},
             {"cached": (8.8, 17.0, 1.2, 16_000), "lm_only": (8.0, 16.0, 1.2, 14_000)},
             {"cached": (7.0, 14.0, 1.1, 15_500), "lm_only": (7.0, 14.5, 1.0, 13_500)}]
    summary = step_pairs.summarise(pairs)
    assert summary["wall_seconds"]["cached_step"] == {"median": 7.0, "min": 6.6, "max": 8.8}
    assert summary["wall_seconds"]["kd_own"] == {"median": 0.6, "min": 0.0, "max": 0.8}
    assert summary["wall_seconds"]["cached_over_lm_only"] == {"median": 1.1, "min": 1.0, "max": 1.1}
    assert summary["cpu_seconds"]["cached_over_lm_only"]["min"] == round(14.0 / 14.5, 4)
    assert summary["minor_page_faults"]["kd_own"] == {"median": 2000, "min": 2000, "max": 2000}
    # Kernel time and page faults can be 0 on either side: no ratio is taken of them.
    assert "cached_over_lm_only" not in summary["kernel_cpu_seconds"]
    assert "cached_over_lm_only" not in summary["minor_page_faults"]
