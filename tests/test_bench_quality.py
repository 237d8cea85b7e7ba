"""Smoke tests of the quality benchmark's harness (bench/quality.py) on the tiny random pair.

The reference numbers themselves come from `python bench/quality.py`; here only the plumbing is checked: every
method's overrides form a valid config, a 2-step run yields a complete record, and the summary computes gap closed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402  (bench/ is not a package)

TINY_OVERRIDES = ("data.window_tokens=64", "training.batch_size=2", "data.eval_max_chars=1500")


@pytest.mark.parametrize("method", list(quality.METHODS))
def test_every_method_is_a_valid_protocol_config(method):
    config = quality.protocol_config(method, quality.PROTOCOL_STEPS)
    assert config.training.max_steps == 60
    assert config.data.window_tokens == 256
    # The learning rate, its schedule and the windows per step are the only protocol settings a method may change,
    # and only off-protocol.
    if quality.METHODS[method].off_protocol:
        assert config.optimizer.lr in {1e-4, *map(float, quality.SWEEP_LEARNING_RATES)}
        assert config.optimizer.scheduler in ("constant", "cosine") and config.optimizer.warmup_steps == 6
        assert config.training.batch_size in (4, 8)
    else:
        assert (config.optimizer.lr, config.optimizer.scheduler, config.optimizer.warmup_steps) == (2e-5, "constant", 6)
        assert config.training.batch_size == 4
    assert (config.training.mixed_precision, config.models.teacher_dtype) == ("no", "float32")
    assert config.training.eval_every == 0
    assert config.output.run_dir.endswith(method)


def test_two_steps_on_the_tiny_pair_give_a_complete_record(tmp_path):
    config = quality.protocol_config("first-token", 2, base_config=REPO / "configs" / "tiny.yaml",
                                     run_root=tmp_path, extra_overrides=TINY_OVERRIDES)
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh `train`, as in its own process
    record = quality.measure_training(config, cached=False)

    assert record["steps"] == record["steps_logged"] == 2
    assert record["windows"]["count"] == 4
    assert len(record["windows"]["trainer_sha256"]) == len(record["windows"]["protocol_sha256"]) == 64
    assert record["floor"]["seconds"] > 0 and record["median_step_seconds"] > 0
    assert record["step_over_floor"] == pytest.approx(record["median_step_seconds"] / record["floor"]["seconds"])
    assert record["bpb_best"] <= record["bpb_final"] + 1e-12
    assert not (tmp_path / "first-token" / "checkpoints").exists()


def test_a_cached_method_writes_its_cache_first_and_records_it(tmp_path):
    cache_dir = tmp_path / "teacher-cache"
    config = quality.protocol_config("first-token-cached", 2, base_config=REPO / "configs" / "tiny.yaml",
                                     run_root=tmp_path, extra_overrides=(*TINY_OVERRIDES, f"teacher.cache_dir={cache_dir}"))
    assert quality.METHODS["first-token-cached"].cached and config.teacher.source == "cache"
    AcceleratorState._reset_state(reset_partial_state=True)
    record = quality.measure_training(config, cached=True)
    assert record["steps"] == 2 and record["teacher_cache"]["dir"] == str(cache_dir)
    assert record["teacher_cache"]["bytes"] > 0 and not record["teacher_cache"]["already_complete"]
    AcceleratorState._reset_state(reset_partial_state=True)
    assert quality.measure_training(config, cached=True)["teacher_cache"]["already_complete"]


def test_summary_computes_gap_closed_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS_DIR", tmp_path)
    common = {"bpb_student_before": 0.77, "steps": 60, "median_step_seconds": 10.0, "tokens_per_second": 102.4,
              "step_over_floor": 1.2, "peak_rss_mib": 4096.0}
    results = {
        "lm-only": {"group": "A", "bpb_final": 0.73, "bpb_best": 0.73, "bpb_teacher": 0.56, **common},
        "first-token": {"group": "C", "bpb_final": 0.69, "bpb_best": 0.69, **common},
        "teacher": {"group": "D", "bpb_final": 0.53, "bpb_best": 0.53},
    }
    for method, record in results.items():
        (tmp_path / f"{method}.json").write_text(json.dumps(record))

    table = quality.summarize(plot_path=tmp_path / "quality.png")

    assert json.loads((tmp_path / "first-token.json").read_text())["gap_closed"] == pytest.approx(0.2)
    assert json.loads((tmp_path / "teacher.json").read_text())["gap_closed"] == pytest.approx(1.0)
    assert "| first-token | C | 0.6900 |" in table
    assert (tmp_path / "quality.png").stat().st_size > 0
