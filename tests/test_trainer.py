"""The training loop on the tiny pair: finite, decreasing losses, honest logs, non-finite steps, the export."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import crosskd.train.recipe as recipe
from crosskd.config import load_config
from crosskd.data.collate import collate_windows
from crosskd.data.corpus import TrainingCorpus
from crosskd.evaluate import bits_per_byte
from crosskd.losses.selection import step_counts
from crosskd.models.loading import load_model
from crosskd.schedules import loss_weights, schedule_settings, temperature
from crosskd.train.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint
from crosskd.train.logbook import check_sum
from crosskd.train.objective import DistillationObjective
from crosskd.train.recipe import TrainingStopped
from trainer_helpers import (
    inject_nan_loss,
    log_records,
    objective_and_first_batch,
    run_training,
    tiny_config,
    write_single_window_corpus,
)


def test_loop_runs_with_finite_losses_whose_components_add_up(tmp_path, capsys):
    config = tiny_config(tmp_path, "training.max_steps=4")
    result = run_training(config, debug=True)  # --debug asserts the sum at every step itself

    records = log_records(config.output.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        components = {k: v for k, v in record.items() if k.startswith("loss/")}
        assert set(components) == {"loss/lm", "loss/kd"}
        assert all(math.isfinite(v) for v in [record["total"], *components.values()])
        assert math.isclose(sum(components.values()), record["total"], rel_tol=1e-5)
        assert record["lr"] == pytest.approx(1e-3)
        # Raw values are logged too: the LM term has weight 1, KD's weight is the warm-up's at the step's progress.
        kd_weight = loss_weights((record["step"] - 1) / 4, schedule_settings(config))["kd"]
        assert record["raw/lm"] == pytest.approx(record["loss/lm"])
        assert record["raw/kd"] * kd_weight == pytest.approx(record["loss/kd"], rel=1e-5)
    assert "'raw'" in capsys.readouterr().out  # the debug switch prints raw and weighted components

    assert result.steps == 4 and result.nonfinite_skipped == 0
    assert math.isfinite(result.initial_bpb) and math.isfinite(result.final_bpb)
    assert [r["step"] for r in log_records(config.output.run_dir, "eval")] == [4]
    # The resolved config is saved in the run directory and reproduces the run's config.
    assert load_config(f"{config.output.run_dir}/config.yaml") == config


@pytest.mark.parametrize("overrides", [
    ("objective.strategy=projector",),
    ("objective.strategy=projector", "objective.projector_residual=false"),
    ("objective.strategy=projector", "objective.projector_features=topk_embeddings"),
    ("objective.strategy=uld", "objective.divergence=null"),
    ("objective.strategy=student-projection",),
    ("objective.strategy=chunk-likelihood",),
], ids=["projector-residual", "projector-plain", "projector-topk-embeddings", "uld", "student-projection",
        "chunk-likelihood"])
def test_every_strategy_trains_with_finite_components_that_add_up(tmp_path, capsys, overrides):
    config = tiny_config(tmp_path, "training.max_steps=3", *overrides)
    result = run_training(config, debug=True)
    projector = config.objective.strategy == "projector"
    extra_terms = {"projector": {"loss/anchor"}, "chunk-likelihood": {"loss/chunk_likelihood"}}
    expected = {"loss/lm", "loss/kd", *extra_terms.get(config.objective.strategy, ())}
    for record in log_records(config.output.run_dir):
        components = {k: v for k, v in record.items() if k.startswith("loss/")}
        assert set(components) == expected
        assert all(math.isfinite(v) for v in components.values())
        assert math.isclose(sum(components.values()), record["total"], rel_tol=1e-5)
    assert result.steps == 3 and result.nonfinite_skipped == 0
    assert ("projector pre-fit:" in capsys.readouterr().out) == projector


def test_debug_sum_check_can_fail():
    check_sum(1.5, {"lm": 1.0, "kd": 0.5})
    with pytest.raises(AssertionError, match="sum to 1.400000 but the total is 1.500000"):
        check_sum(1.5, {"lm": 1.0, "kd": 0.4})


def test_loss_decreases_on_a_repeated_batch(tmp_path):
    corpus = write_single_window_corpus(tmp_path / "corpus")  # one window: every step trains on the same batch
    config = tiny_config(tmp_path, "training.max_steps=8", "training.batch_size=1", corpus=corpus)
    run_training(config)
    records = log_records(config.output.run_dir)
    lm = [r["loss/lm"] for r in records]
    assert all(later < earlier for earlier, later in itertools.pairwise(lm)), lm
    assert lm[-1] < 0.9 * lm[0], lm
    assert records[-1]["total"] < records[0]["total"]


def test_merge_policy_distils_every_aligned_pair_and_its_kd_decreases(tmp_path):
    corpus = write_single_window_corpus(tmp_path / "corpus")
    config = tiny_config(tmp_path, "training.max_steps=6", "training.batch_size=1", "objective.mismatch_policy=merge",
                         "schedule.kd_warmup_start=1.0",
                         corpus=corpus)
    objective, batch = objective_and_first_batch(config, batch_size=1)
    assert int(objective.select(batch).counts()["kd"]) == len(batch.pair_batch)
    run_training(config)
    kd = [r["loss/kd"] for r in log_records(config.output.run_dir)]
    assert all(math.isfinite(v) for v in kd) and kd[-1] < kd[0], kd


def test_moe_teachers_expert_usage_entropy_is_logged(tmp_path):
    config = tiny_config(tmp_path, "training.max_steps=2")  # the tiny teacher is a Qwen2-MoE
    run_training(config)
    for record in log_records(config.output.run_dir):
        lowest, mean = record["teacher_expert_entropy/min"], record["teacher_expert_entropy/mean"]
        assert 0.0 < lowest <= mean <= 1.0  # normalised to [0, 1]; a random router is far from collapsed (0)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def test_nonfinite_loss_skips_the_step_and_counts_it(tmp_path, monkeypatch):
    weights_seen = inject_nan_loss(monkeypatch, nan_calls={2})
    config = tiny_config(tmp_path, "training.max_steps=4")
    result = run_training(config)

    assert result.nonfinite_skipped == 1 and result.steps == 4
    assert not _same_weights(weights_seen[0], weights_seen[1])  # a normal step moves the weights
    assert _same_weights(weights_seen[1], weights_seen[2])  # the NaN step did not
    assert not _same_weights(weights_seen[2], weights_seen[3])  # and training went on
    records = log_records(config.output.run_dir)
    assert [r["nonfinite_skipped"] for r in records] == [0, 1, 1, 1]
    assert math.isnan(records[1]["total"])
    assert all(math.isfinite(r["total"]) for r in records[2:])


def test_consecutive_nonfinite_steps_stop_the_run_with_a_checkpoint_and_the_likely_causes(tmp_path, monkeypatch,
                                                                                            capsys):
    weights_seen = inject_nan_loss(monkeypatch, nan_calls=set(range(2, 100)))
    config = tiny_config(tmp_path, "training.max_steps=20", "training.max_consecutive_nonfinite=3")
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row. Likely causes: a learning rate"):
        run_training(config)

    assert len(weights_seen) == 4  # one good step, then three skipped ones, then the stop
    emergency = [path for path in list_checkpoints(tmp_path / "run" / "checkpoints") if "emergency" in path.name]
    assert len(emergency) == 1
    loaded = load_checkpoint(emergency[0])
    assert loaded.state.nonfinite_skipped == 3 and loaded.state.consecutive_nonfinite == 3
    assert loaded.state.step == 4  # skipped steps are steps: they consumed their data
    saved = loaded.trainable["student.model.embed_tokens.weight"]
    assert torch.equal(saved, weights_seen[1]["model.embed_tokens.weight"])  # the weights after the only good step
    assert f"emergency checkpoint: {emergency[0]}" in capsys.readouterr().err


def test_exported_student_is_the_best_checkpoint_and_a_plain_hf_model(tmp_path, monkeypatch):
    # The student's evaluations are scripted so that the best BPB comes first; the real values are kept to check
    # which weights were exported.
    scripted_bpb = iter([5.0, 1.0, 2.0, 3.0])  # before training, then steps 1, 2, 3
    real_student_bpb = {}

    def scripted(model, tokenizer, text, **kwargs):
        real = bits_per_byte(model, tokenizer, text, **kwargs)
        if model.config.model_type != "llama":  # the teacher
            return real
        real_student_bpb[len(real_student_bpb)] = real.bits_per_byte
        return dataclasses.replace(real, bits_per_byte=next(scripted_bpb))

    monkeypatch.setattr(recipe, "bits_per_byte", scripted)
    config = tiny_config(tmp_path, "training.max_steps=3", "training.eval_every=1", "training.keep_checkpoints=1",
                         "optimizer.lr=1e-2")
    result = run_training(config)

    assert (result.best_step, result.best_bpb) == (1, 1.0)
    checkpoints = tmp_path / "run" / "checkpoints"
    # Keep the last checkpoint and the best one; the others are pruned.
    assert [p.name for p in list_checkpoints(checkpoints)] == [checkpoint_name(1), checkpoint_name(3)]

    model = AutoModelForCausalLM.from_pretrained(result.student_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.student_dir)
    best = load_checkpoint(checkpoints / checkpoint_name(1)).trainable
    last = load_checkpoint(checkpoints / checkpoint_name(3)).trainable
    exported = model.model.embed_tokens.weight
    assert torch.equal(exported, best["student.model.embed_tokens.weight"])
    assert not torch.equal(exported, last["student.model.embed_tokens.weight"])
    assert model.lm_head.weight.data_ptr() == exported.data_ptr()  # still tied after the round trip
    assert bits_per_byte(model, tokenizer, _eval_text(config)).bits_per_byte == pytest.approx(real_student_bpb[1])

    prompt = tokenizer("def add(a, b):", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(output[0]), str)


def _eval_text(config) -> str:
    from crosskd.data.sources import load_documents

    (heldout,) = [d for d in load_documents(config.data.source) if d.name in config.data.heldout_documents]
    return heldout.text


def _student_gradients(student_model) -> torch.Tensor:
    gradients = torch.cat([p.grad.reshape(-1) for p in student_model.parameters() if p.grad is not None])
    student_model.zero_grad(set_to_none=True)
    return gradients


def test_accumulating_unequal_micro_batches_equals_one_large_batch(tmp_path):
    config = tiny_config(tmp_path)
    teacher = load_model(config.models.teacher, "teacher")
    student = load_model(config.models.student, "student")
    corpus = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    settings = schedule_settings(config)
    objective = DistillationObjective(config, teacher, student, settings)
    weights, tau = loss_weights(0.5, settings), temperature(0.5, settings)
    windows = next(corpus.train_windows(start=0, process_index=0, num_processes=1, batch_size=3))
    small, large = (collate_windows(part, teacher.vocab.pad_id) for part in (windows[:1], windows[1:]))
    whole = collate_windows(windows, teacher.vocab.pad_id)

    def counts_of(micro_batches):
        return step_counts([objective.select(batch) for batch in micro_batches])

    def gradient(micro_batches, counts) -> torch.Tensor:
        for batch, batch_counts in zip(micro_batches, counts):
            signal = objective.teacher_signal(batch, weights)
            outputs = student.model(**objective.student_inputs(batch, weights))
            terms = objective(batch, objective.select(batch), outputs.hidden_states, outputs.attentions, signal,
                              weights, tau)
            objective.combine(terms, batch_counts, weights, len(micro_batches), 1).total.backward()
        return _student_gradients(student.model)

    both = counts_of([small, large])
    small_counts, large_counts = counts_of([small]), counts_of([large])
    assert small_counts["lm"] != large_counts["lm"] and small_counts["kd"] != large_counts["kd"]

    one_batch = gradient([whole], [counts_of([whole])])
    accumulated = gradient([small, large], [both, both])
    torch.testing.assert_close(accumulated, one_batch, rtol=1e-5, atol=1e-5)
    # Normalising each micro-batch by its own counts (a mean per micro-batch) is measurably different.
    per_micro_batch = gradient([small, large], [small_counts, large_counts])
    assert (per_micro_batch - one_batch).abs().max() > 1e-3
