"""objective.kd_balance: gradient-norm scales KD so that, at the student's final hidden states, its gradient is as
strong as the LM term's; fixed leaves the weights alone."""

from __future__ import annotations

import pytest
import torch

from crosskd.config import ConfigError
from crosskd.losses.selection import step_counts
from crosskd.schedules import loss_weights
from trainer_helpers import log_records, objective_and_first_batch, run_training, tiny_config


def _terms(config):
    objective, batch = objective_and_first_batch(config)
    weights = loss_weights(1.0, objective.settings)
    selection = objective.select(batch)
    outputs = objective.student_model(**objective.student_inputs(batch, weights))
    terms = objective(batch, selection, outputs.hidden_states, outputs.attentions,
                      objective.teacher_signal(batch, weights), weights, 1.0)
    return objective, terms, step_counts([selection]), weights, outputs.hidden_states[-1]


def _gradient_norm(value, hidden) -> float:
    return torch.autograd.grad(value, hidden, retain_graph=True)[0].norm().item()


def test_gradient_norm_balance_makes_both_terms_pull_equally_at_the_final_hidden_states(tmp_path):
    config = tiny_config(tmp_path, "objective.kd_balance=gradient-norm")
    objective, terms, counts, weights, hidden = _terms(config)
    lm, kd = terms["lm"], terms["kd"]
    assert kd.scale != 1.0 and objective.diagnostics()["kd_balance"] == kd.scale
    lm_pull = _gradient_norm(lm.value / counts["lm"].float(), hidden)
    kd_pull = _gradient_norm(kd.scale * kd.value / counts["kd"].float(), hidden)
    assert kd_pull == pytest.approx(lm_pull, rel=1e-4)
    # The balance is a number, not part of the graph: the combined loss's KD gradient is the scaled KD gradient.
    combined = objective.combine(terms, counts, weights, 1, 1)
    assert combined.weighted["kd"] == pytest.approx(kd.scale * weights["kd"] * combined.raw["kd"], rel=1e-6)


def test_fixed_balance_leaves_kd_at_its_schedule_weight(tmp_path):
    _, terms, *_ = _terms(tiny_config(tmp_path))
    assert terms["kd"].scale == 1.0


def test_a_balanced_run_trains_and_logs_its_balance(tmp_path):
    config = tiny_config(tmp_path, "objective.kd_balance=gradient-norm", "training.max_steps=2")
    run_training(config)
    balances = [record["kd_balance"] for record in log_records(config.output.run_dir) if "kd_balance" in record]
    assert len(balances) == 2 and all(value > 0 for value in balances)


def test_an_unknown_balance_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="gradient-norm"):
        tiny_config(tmp_path, "objective.kd_balance=gradnorm")
