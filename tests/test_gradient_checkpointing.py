"""`training.gradient_checkpointing`: the student recomputes its layers in backward, with the same losses."""

from __future__ import annotations

import pytest
from transformers import PreTrainedModel

from trainer_helpers import log_records, run_training, tiny_config


def test_gradient_checkpointing_switches_on_and_leaves_the_losses_unchanged(tmp_path, monkeypatch):
    enabled = []
    original = PreTrainedModel.gradient_checkpointing_enable

    def recording(self, *args, **kwargs):
        enabled.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", recording)
    totals = {}
    for checkpointing in (False, True):
        run_dir = tmp_path / str(checkpointing)
        config = tiny_config(run_dir, "training.max_steps=2", f"training.gradient_checkpointing={checkpointing}")
        run_training(config)
        totals[checkpointing] = [record["total"] for record in log_records(config.output.run_dir)]
    assert enabled == ["LlamaForCausalLM"]  # the student only, and only when asked
    assert totals[True] == pytest.approx(totals[False], rel=1e-5)
