"""Mixed precision on CPU is real: fp16 and bf16 activations inside the student, and a live fp16 loss scaler."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from crosskd.models.precision import MixedPrecision
from crosskd.train.recipe import TrainingStopped
from trainer_helpers import inject_nan_loss, log_records, run_training, tiny_config

INF_GRADIENT_STEP = 2


@pytest.fixture
def student_activation_dtypes():
    """The dtypes of the student's MLP outputs in training forwards (evaluation runs without grad). The residual
    stream stays float32 under autocast (an add keeps its widest input), so the MLP's matmul is where it shows."""
    dtypes = set()

    def hook(module, args, output):
        if type(module).__name__ == "LlamaMLP" and torch.is_grad_enabled():
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield dtypes
    handle.remove()


def _record_steps(monkeypatch) -> list[dict]:
    """Per optimizer step: the MixedPrecision in use, the loss scale before and after, whether weights moved."""
    steps = []
    original = MixedPrecision.step

    def step(self, optimizer):
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in parameters]
        scale_before = self.scaler.get_scale() if self.scaler is not None else None
        outcome = original(self, optimizer)
        steps.append({
            "precision": self,
            "scale_before": scale_before,
            "scale_after": self.scaler.get_scale() if self.scaler is not None else None,
            "overflow": outcome.overflow,
            "moved": any(not torch.equal(a, p) for a, p in zip(before, parameters)),
        })
        return outcome

    monkeypatch.setattr(MixedPrecision, "step", step)
    return steps


def _inject_inf_gradient(monkeypatch, at_step: int) -> None:
    """An inf in one (scaled) gradient just before the scaler unscales them, at one optimizer step."""
    original = MixedPrecision.unscale_and_clip
    calls = itertools.count(1)

    def unscale_and_clip(self, optimizer, parameters, max_norm):
        if next(calls) == at_step:
            parameters[0].grad.view(-1)[0] = math.inf
        return original(self, optimizer, parameters, max_norm)

    monkeypatch.setattr(MixedPrecision, "unscale_and_clip", unscale_and_clip)


def test_fp16_on_cpu_runs_fp16_activations_and_a_live_scaler_that_skips_overflow(tmp_path, monkeypatch,
                                                                                 student_activation_dtypes):
    steps = _record_steps(monkeypatch)
    _inject_inf_gradient(monkeypatch, INF_GRADIENT_STEP)
    config = tiny_config(tmp_path, "training.max_steps=3", "training.mixed_precision=fp16")
    result = run_training(config)

    assert student_activation_dtypes == {torch.float16}
    scaler = steps[0]["precision"].scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cpu"
    injected = steps[INF_GRADIENT_STEP - 1]
    assert injected["overflow"] and not injected["moved"]
    assert injected["scale_after"] == injected["scale_before"] / 2
    # Overflow skips are the scaler's: counted apart, never as non-finite steps. (The first steps may overflow by
    # themselves while the scale comes down from 2**16; each such skip is counted the same way.)
    assert result.overflow_skipped == sum(step["overflow"] for step in steps) >= 1
    assert result.nonfinite_skipped == 0
    assert all(step["moved"] != step["overflow"] for step in steps)
    records = log_records(config.output.run_dir)
    assert records[-1]["overflow_skipped"] == result.overflow_skipped
    assert all(record["nonfinite_skipped"] == 0 for record in records)


def test_fp16_nonfinite_loss_is_not_an_overflow_and_stops_the_run(tmp_path, monkeypatch):
    inject_nan_loss(monkeypatch, nan_calls=set(range(1, 100)))
    config = tiny_config(tmp_path, "training.max_steps=20", "training.mixed_precision=fp16",
                         "training.max_consecutive_nonfinite=2")
    with pytest.raises(TrainingStopped, match="2 non-finite steps in a row"):
        run_training(config)
    records = log_records(config.output.run_dir)
    assert [(r["nonfinite_skipped"], r["overflow_skipped"]) for r in records] == [(1, 0), (2, 0)]


def test_bf16_on_cpu_runs_bf16_activations_without_a_scaler(tmp_path, monkeypatch, student_activation_dtypes):
    steps = _record_steps(monkeypatch)
    config = tiny_config(tmp_path, "training.max_steps=2", "training.mixed_precision=bf16")
    result = run_training(config)

    assert student_activation_dtypes == {torch.bfloat16}
    assert steps[0]["precision"].scaler is None
    assert all(step["moved"] for step in steps)
    assert result.overflow_skipped == 0 and result.nonfinite_skipped == 0
    assert all(math.isfinite(record["total"]) for record in log_records(config.output.run_dir))


def test_no_mixed_precision_keeps_fp32(tmp_path, student_activation_dtypes):
    run_training(tiny_config(tmp_path, "training.max_steps=1"))
    assert student_activation_dtypes == {torch.float32}
