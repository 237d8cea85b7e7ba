"""`crosskd doctor`: every check passes on a sane tiny run and fails (or warns) on a config built to break it; the
command's table, JSON and exit codes; `crosskd train`'s fast checks and their switch; nothing is written into the run
folder."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from accelerate.state import AcceleratorState

from crosskd.cli import main
from crosskd.doctor import (
    FAIL,
    PASS,
    WARN,
    DoctorFailed,
    DtypeProbe,
    check_alignment,
    check_components_sum,
    check_curriculum,
    check_dtypes,
    check_fast_tokenizers,
    check_finite_loss,
    check_gradients,
    check_kd_share,
    check_kd_warmup,
    check_learning_rates,
    check_lr_warmup,
    check_memory,
    check_padded_ids,
    check_run_folder,
    check_run_past_pairs,
    check_separators,
    check_step0_terms,
    check_temperature,
    check_topk_avoids_padded_ids,
    fast_checks,
    folder_state,
    require_fast_checks,
    run_doctor,
    schedule_table,
)
from crosskd.models.loading import load_model
from crosskd.schedules import schedule_settings
from crosskd.train.objective import TermSwitches
from crosskd.vocab.projector import ProjectorTransfer
from trainer_helpers import TINY_CONFIG, objective_and_first_batch, tiny_config

PLAN_DEVICE, PLAN_MEMORY = "cuda", 16 * 2**30  # config-only memory plan: no host-baseline subprocess in tests


def doctor(config):
    """`run_doctor` as a fresh `crosskd doctor` process runs it (accelerate's state is a process-wide singleton)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return run_doctor(config, PLAN_DEVICE, PLAN_MEMORY)


def by_name(report) -> dict:
    return {check.name: check for check in report.checks}


def test_a_sane_tiny_run_passes_every_check_and_leaves_its_run_folder_empty(tmp_path):
    config = tiny_config(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report = doctor(config)
    assert [check for check in report.checks if check.status != PASS] == []
    checks = by_name(report)
    for name in ("models and data load", "tokenizers are fast", "teacher padded ids masked", "alignment rate",
                 "KD pair share", "step 0: kd", "step 0: KD bound", "step: finite gradients", "dtypes",
                 "run folder untouched", "learning-rate warm-up", "KD warm-up"):
        assert name in checks, name
    assert "0 of" in checks["teacher top-k avoids padded ids"].value  # the tiny teacher has 68 padded ids
    assert list(run_dir.iterdir()) == []
    assert [row["p"] for row in report.schedule] == pytest.approx([i / 10 for i in range(11)])
    assert report.not_computed == ["feature", "attention", "layerwise", "contrastive"]


def test_a_run_that_cannot_be_set_up_fails_its_first_check_with_the_trainers_message(tmp_path):
    checks = by_name(doctor(tiny_config(tmp_path, "data.window_tokens=5000")))
    assert checks["models and data load"].status == FAIL
    assert "max_position_embeddings" in checks["models and data load"].value
    assert "step: finite loss" not in checks  # nothing that needs the set-up ran
    assert checks["run folder untouched"].status == PASS


def test_the_run_folder_check_fails_when_the_folder_changed(tmp_path):
    before = folder_state(tmp_path)
    (tmp_path / "log.jsonl").write_text("{}")
    assert check_run_folder(tmp_path, before, folder_state(tmp_path)).status == FAIL
    assert check_run_folder(tmp_path, before, before).status == PASS


@pytest.fixture(scope="module")
def confident_student(tmp_path_factory):
    """The tiny student with its (tied) embedding scaled ×10: as confident as a trained model, unlike the near-uniform
    random one, against which no target can cost more than log V."""
    folder = tmp_path_factory.mktemp("confident") / "student"
    loaded = load_model("tiny:student", "student")
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(10.0)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_a_projector_without_pre_fit_fails_the_kd_bound_and_its_pre_fit_passes_it(tmp_path, monkeypatch,
                                                                                  confident_student):
    overrides = (f"models.student={confident_student}", "objective.strategy=projector",
                 "objective.projector_residual=false")
    fitted = by_name(doctor(tiny_config(tmp_path / "fitted", *overrides)))
    assert fitted["step 0: KD bound"].status == PASS, fitted["step 0: KD bound"]

    def without_pre_fit(self, batches, signal_of, student_model, device):
        # A random plain map at the scale at which its target is confident (on the reference pair the projector's
        # own initialisation is: ~17 nats), without standardisation, least-squares start or pre-fit.
        self.projector.to(device)
        torch.nn.init.normal_(self.projector.linear.weight, std=1.0)
        return None

    monkeypatch.setattr(ProjectorTransfer, "prepare", without_pre_fit)
    unfitted = by_name(doctor(tiny_config(tmp_path / "unfitted", *overrides)))
    assert unfitted["step 0: KD bound"].status == FAIL
    assert "projector_prefit_steps" in unfitted["step 0: KD bound"].fix


def test_a_term_far_above_the_lm_loss_warns_and_kd_above_log_v_fails():
    # The reference pair's orders of magnitude: LM ~1.9 nats; an un-normalised feature term (the teacher's hidden
    # state has norm ~170) in the hundreds; a random projector's KD ~17 nats against log 49,152 = 10.8.
    results = {r.name: r for r in check_step0_terms({"lm": 1.9, "kd": 17.0, "feature": 250.0}, 1.0, 49_152)}
    assert results["step 0: feature"].status == WARN
    assert results["step 0: kd"].status == PASS  # 8.9× LM: under the warning ratio
    assert results["step 0: KD bound"].status == FAIL
    sane = {r.name: r for r in check_step0_terms({"lm": 1.9, "kd": 0.8, "feature": 1.2}, 1.0, 49_152)}
    assert all(result.status == PASS for result in sane.values())
    # The bound reads the divergence: KD with its τ² factor 9 is 9× larger but no worse.
    assert {r.name: r for r in check_step0_terms({"lm": 1.9, "kd": 9 * 5.0}, 9.0, 49_152)}[
        "step 0: KD bound"].status == PASS
    assert check_step0_terms({"lm": float("nan")}, 1.0, 300)[0].status == FAIL


def test_the_feature_terms_step_0_values_are_checked_against_the_lm_loss(tmp_path):
    # The feature terms have no switch that turns their normalisation off (losses/features.py: a parameter-free
    # layer norm on the student side, per-channel standardised teacher targets), so a sane router run is checked.
    checks = by_name(doctor(tiny_config(tmp_path, "router.enabled=true", "router.num_experts=3")))
    assert checks["step 0: feature"].status == PASS and "× LM" in checks["step 0: feature"].value
    assert checks["dtypes"].status == PASS and "heads float32" in checks["dtypes"].value


def test_temperature_3_with_the_t2_factor_warns(tmp_path):
    hot = tiny_config(tmp_path, "schedule.temperature_start=3", "schedule.temperature_end=3")
    assert check_temperature(hot, schedule_settings(hot)).status == WARN
    assert "KD × 9" in check_temperature(hot, schedule_settings(hot)).value
    unscaled = tiny_config(tmp_path, "schedule.temperature_start=3", "schedule.temperature_end=3",
                           "objective.scale_by_t2=false")
    assert check_temperature(unscaled, schedule_settings(unscaled)).status == PASS
    default = tiny_config(tmp_path)
    assert check_temperature(default, schedule_settings(default)).status == PASS


def test_a_kd_warm_up_longer_than_the_run_fails(tmp_path):
    default = schedule_settings(tiny_config(tmp_path))  # warm-up to p = 0.2
    assert check_kd_warmup(default, 4).status == PASS
    assert check_kd_warmup(default, 1).status == FAIL  # one step at p = 0: full KD never reached
    late = schedule_settings(tiny_config(tmp_path, "schedule.kd_warmup_end_progress=1.0"))
    result = check_kd_warmup(late, 4)
    assert result.status == FAIL and "kd_warmup_end_progress at most 0.75" in result.fix
    assert check_kd_warmup(schedule_settings(tiny_config(tmp_path, "schedule.kd_warmup_end_progress=0")), 1).status \
        == PASS


def test_a_learning_rate_warm_up_longer_than_the_run_warns(tmp_path):
    config = tiny_config(tmp_path, "optimizer.warmup_steps=4")
    result = check_lr_warmup(config, 4)
    assert result.status == WARN and "75% of optimizer.lr" in result.value
    assert check_lr_warmup(config, 40).status == PASS
    # The schedule table reads the trainer's own scheduler: linear warm-up over 4 steps.
    lrs = [row["lr"] for row in schedule_table(config, schedule_settings(config), 40)]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(config.optimizer.lr) and lrs[-1] == pytest.approx(
        config.optimizer.lr)


def test_a_learning_rate_of_zero_after_the_first_step_fails():
    assert check_learning_rates([{"name": "student", "lr": 1e-3}, {"name": "projector", "lr": 5e-3}]).status == PASS
    result = check_learning_rates([{"name": "student", "lr": 1e-3}, {"name": "heads", "lr": 0.0}])
    assert result.status == FAIL and "heads at lr 0" in result.fix


def test_a_curriculum_term_that_never_reaches_the_student_warns(tmp_path):
    settings = schedule_settings(tiny_config(tmp_path, "router.enabled=true", "router.contrastive_alpha=0.1"))
    assert check_curriculum(settings, 2).status == WARN  # steps at p 0 and 0.5; contrastive ramps on from 0.7
    assert check_curriculum(settings, 10).status == PASS


def test_alignment_and_run_past_pairs_are_measured_on_windows(tmp_path):
    config = tiny_config(tmp_path)
    _, batch = objective_and_first_batch(config)
    assert check_alignment([batch]).status == PASS
    empty = torch.zeros(0, dtype=torch.int64)
    unaligned = dataclasses.replace(batch, pair_batch=empty, pair_student_pos=empty, pair_teacher_pos=empty,
                                    pair_student_next_bytes=empty, pair_teacher_next_bytes=empty)
    assert check_alignment([unaligned]).status == FAIL
    run_past = dataclasses.replace(batch, pair_student_next_bytes=batch.pair_teacher_next_bytes + 1)
    keep = tiny_config(tmp_path, "objective.mismatch_policy=keep")
    assert check_run_past_pairs([run_past], keep).status == WARN
    assert check_run_past_pairs([run_past], config).status == PASS  # merge pools them
    assert "100.0%" in check_run_past_pairs([run_past], config).value


def test_the_first_steps_checks_fail_on_what_they_guard_against():
    assert check_finite_loss(2.5).status == PASS and check_finite_loss(float("nan")).status == FAIL
    assert check_components_sum(2.5, {"lm": 2.0, "kd": 0.5}).status == PASS
    assert check_components_sum(2.5, {"lm": 2.0, "kd": 0.3}).status == FAIL
    assert check_gradients(3.0, 1.0).status == PASS and "clipped to 1" in check_gradients(3.0, 1.0).value
    assert check_gradients(float("inf"), 1.0).status == FAIL and check_gradients(0.0, 1.0).status == FAIL
    kd_on = TermSwitches(lm_only=False, hidden_states=False, attentions=False)
    assert check_kd_share({"lm": torch.tensor(100.0), "kd": torch.tensor(80.0)}, kd_on).status == PASS
    assert check_kd_share({"lm": torch.tensor(100.0), "kd": torch.tensor(0.0)}, kd_on).status == FAIL
    lm_only = dataclasses.replace(kd_on, lm_only=True)
    assert check_kd_share({"lm": torch.tensor(100.0), "kd": torch.tensor(0.0)}, lm_only).status == PASS


def test_an_lm_only_run_passes_without_kd_checks(tmp_path):
    checks = by_name(doctor(tiny_config(tmp_path, "objective.kd_alpha=0")))
    assert [check for check in checks.values() if check.status != PASS] == []
    assert "step 0: kd" not in checks and "teacher top-k avoids padded ids" not in checks
    assert checks["KD warm-up"].value.startswith("no KD")


def test_padded_ids_in_the_separator_or_the_top_k_fail():
    teacher = load_model("tiny:teacher", "teacher")
    student = load_model("tiny:student", "student")
    tokenizers = {"teacher": teacher.tokenizer, "student": student.tokenizer}
    vocabs = {"teacher": teacher.vocab, "student": student.vocab}
    assert check_separators(tokenizers, vocabs).status == PASS
    assert check_fast_tokenizers(tokenizers).status == PASS
    assert check_fast_tokenizers({**tokenizers, "teacher": types.SimpleNamespace(is_fast=False)}).status == FAIL
    assert check_padded_ids("teacher", teacher.vocab, teacher.tokenizer).status == PASS
    unmasked = dataclasses.replace(teacher.vocab, padded_ids=torch.zeros(0, dtype=torch.long))
    assert check_padded_ids("teacher", unmasked, teacher.tokenizer).status == FAIL  # its 48 rows past the tokenizer
    separator_padded = dict(vocabs, student=dataclasses.replace(student.vocab, padded_ids=torch.tensor([0])))
    assert check_separators(tokenizers, separator_padded).status == FAIL
    padded = int(teacher.vocab.padded_ids[0])
    assert check_topk_avoids_padded_ids(torch.tensor([[1, 2], [3, padded]]), teacher.vocab).status == FAIL
    assert check_topk_avoids_padded_ids(torch.tensor([[1, 2]]), teacher.vocab).status == PASS


def test_dtypes_in_bf16_training_and_evaluation(tmp_path):
    checks = by_name(doctor(tiny_config(tmp_path / "float32-teacher", "training.mixed_precision=bf16")))
    training_part, evaluation_part = checks["dtypes"].value.split(";")[:2]
    assert "student compute bfloat16" in training_part  # autocast is applied in training
    # The float32 teacher runs under the step's autocast in training, not in evaluation: a warning naming it.
    assert checks["dtypes"].status == WARN and "the teacher computes in bfloat16 in training" in checks["dtypes"].fix
    same = by_name(doctor(tiny_config(tmp_path / "bf16-teacher", "training.mixed_precision=bf16",
                                      "models.teacher_dtype=bfloat16")))
    assert same["dtypes"].status == PASS, same["dtypes"]


def test_a_half_precision_term_or_master_weight_or_missing_autocast_fails():
    training, evaluation = DtypeProbe(), DtypeProbe()
    for probe in (training, evaluation):
        probe.note("student compute", torch.bfloat16)
        probe.note("terms", torch.float32)
    assert check_dtypes(training, evaluation, {"student": {"float32"}}, "bfloat16").status == PASS
    # Mixed precision that is not applied (the run would silently train in another dtype).
    assert check_dtypes(training, evaluation, {"student": {"float32"}}, "float16").status == FAIL
    assert check_dtypes(training, evaluation, {"student": {"bfloat16"}}, "bfloat16").status == FAIL
    training.note("terms", torch.float16)
    assert check_dtypes(training, evaluation, {"student": {"float32"}}, "bfloat16").status == FAIL


def test_a_plan_that_does_not_fit_fails_with_a_configuration_that_does(tmp_path):
    config = tiny_config(tmp_path)
    assert check_memory(config, "cuda", 16 * 2**30, 1).status == PASS
    result = check_memory(config, "cuda", 2 * 2**20, 1)
    assert result.status == FAIL and result.fix  # a smaller micro-batch or a switch, or the reason there is none


def test_the_fast_checks_load_no_model_and_train_refuses_a_failing_config(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the fast checks must not load a model")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    report = fast_checks(tiny_config(tmp_path))
    assert not report.failures and report.schedule
    printed = []
    require_fast_checks(tiny_config(tmp_path), echo=printed.append)
    assert len(printed) == 1 and "fast checks, 0 fail, 0 warn" in printed[0]
    with pytest.raises(DoctorFailed, match="KD warm-up.*--no-doctor"):
        require_fast_checks(tiny_config(tmp_path, "schedule.kd_warmup_end_progress=1.0"))


def test_crosskd_train_runs_the_fast_checks_first_unless_told_not_to(tmp_path, capsys):
    config = tiny_config(tmp_path, "training.max_steps=1")  # one step: the KD warm-up never ends
    config_file = tmp_path / "one-step.yaml"
    config.save(config_file)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(["train", str(config_file)]) == 1
    assert "KD warm-up" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(["train", str(config_file), "--no-doctor"]) == 0
    assert "doctor:" not in capsys.readouterr().out
    assert (tmp_path / "run" / "student").is_dir()


def test_the_doctor_command_prints_a_table_or_json_and_exits_1_on_a_failure(tmp_path, capsys):
    config = tiny_config(tmp_path)
    config_file = tmp_path / "tiny.yaml"
    config.save(config_file)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(["doctor", str(config_file), "--json", "--device", "cuda", "--memory", "16GiB"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert not printed["failed"] and {check["status"] for check in printed["checks"]} == {PASS}
    assert printed["schedule"][0]["p"] == 0
    assert main(["doctor", str(config_file), "--fast", "optimizer.warmup_steps=10"]) == 0  # a warning only
    assert "warn  learning-rate warm-up" in capsys.readouterr().out
    assert main(["doctor", str(config_file), "--fast", "schedule.kd_warmup_end_progress=1.0"]) == 1
    table = capsys.readouterr().out
    assert "fail  KD warm-up" in table and "1 fail" in table
    assert main(["doctor", str(TINY_CONFIG), "--memory", "lots"]) == 2
