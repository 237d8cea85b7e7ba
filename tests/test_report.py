"""`crosskd report` and the model card on real tiny runs: the page loads in headless chromium with every image
decoded and no console error, its numbers are the run's own records, several runs overlay, bad input is named."""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

from crosskd.cli import main
from crosskd.report.model_card import model_card
from crosskd.report.page import write_report
from crosskd.report.records import NotARunFolder, read_run, summarise
from headless_browser import check_page, find_chromium
from trainer_helpers import log_records, tiny_config, write_corpus

STEPS = 4
EVAL_EVERY = 2


def _train_with_the_cli(tmp_path, name, *overrides) -> tuple:
    """`crosskd train` as a user runs it (the report at the end is part of the command), on the tiny pair."""
    config = tiny_config(tmp_path, f"training.max_steps={STEPS}", f"training.eval_every={EVAL_EVERY}",
                         f"output.run_dir={tmp_path / name}", *overrides, corpus=tmp_path / "corpus")
    config_file = tmp_path / f"{name}.yaml"
    config.save(config_file)
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's accelerate state
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["crosskd", "train", str(config_file)])  # the command line the run records
        assert main(sys.argv[1:]) == 0
    return Path(config.output.run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A KD run and an LM-only run of the same pair and data (what people compare), each with its printed output."""
    tmp_path = tmp_path_factory.mktemp("runs")
    write_corpus(tmp_path / "corpus")
    printed = {}
    for name, overrides in (("kd", ()), ("lm-only", ("objective.kd_alpha=0",))):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_dir = _train_with_the_cli(tmp_path, name, *overrides)
        printed[name] = (run_dir, out.getvalue())
    return printed


@pytest.fixture(scope="module")
def browser():
    path = find_chromium()
    if path is None:
        pytest.skip("chromium is not installed (and could not be): `apt-get install chromium` to run the browser test")
    return path


def _assert_page_renders(page, browser, expected_images: int):
    check = check_page(page, browser)
    assert check.console_errors == []
    assert len(check.images) == expected_images
    undecoded = [image["alt"] for image in check.images if not image["decoded"] or image["naturalWidth"] == 0]
    assert undecoded == []
    return check


def test_the_browser_check_catches_broken_images_and_console_errors(tmp_path, browser):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><title>broken</title><img alt="bad" src="data:image/png;base64,AAAA">'
                    '<script>console.error("boom")</script>')
    check = check_page(page, browser)
    assert check.images == [{"alt": "bad", "decoded": False, "naturalWidth": 0}]
    assert any("boom" in error for error in check.console_errors)


def test_train_prints_the_report_whose_numbers_are_the_runs_own(runs, browser):
    run_dir, printed = runs["kd"]
    page = run_dir / "report" / "index.html"
    assert f"report: {page}" in printed
    check = _assert_page_renders(page, browser, expected_images=7)  # the tiny teacher is an MoE: diagnostics too
    assert check.title == "crosskd report: kd"

    # The summary against the log itself (and against what `crosskd train` printed at the end).
    start = log_records(run_dir, "start")[0]
    evals = log_records(run_dir, "eval")
    train = log_records(run_dir, "train")
    assert [e["step"] for e in evals] == [2, 4] and start["step"] == 0
    best_bpb, best_step = min([(start["bpb"], 0)] + [(e["bpb"], e["step"]) for e in evals])
    text = html.unescape(page.read_text())
    for what, value in (("held-out BPB before (untouched student)", start["bpb"]),
                        (f"best BPB, the exported student (step {best_step})", best_bpb),
                        (f"final BPB (step {STEPS})", evals[-1]["bpb"]),
                        ("teacher BPB", start["teacher_bpb"])):
        assert f"<th>{what}</th><td>{value:.4f}</td>" in text
    gap = (start["bpb"] - best_bpb) / (start["bpb"] - start["teacher_bpb"])
    assert f"<th>gap to the teacher closed</th><td>{100 * gap:.1f} %</td>" in text
    assert f"student before {start['bpb']:.4f} -> best {best_bpb:.4f} (step {best_step}) | teacher " \
           f"{start['teacher_bpb']:.4f}" in printed
    assert start["command"] == f"crosskd train {run_dir.parent / 'kd.yaml'}"
    summary = summarise(read_run(run_dir))
    assert summary.wall_seconds == train[-1]["wall_seconds"] > train[0]["wall_seconds"] > 0
    assert f"<th>wall time</th><td>{summary.wall_seconds:.0f} s</td>" in text
    assert summary.peak_memory_bytes == max(r["peak_memory_bytes"] for r in train) > 0
    # What the report needed that the log did not hold before: one entry each in every train record.
    for record in train:
        assert record["lr/student"] == pytest.approx(record["lr"])
        assert 0 < record["kd_position_share"] <= 1
        assert record["weight/kd"] > 0


def test_several_runs_overlay_on_one_page_in_the_first_runs_folder(runs, browser, tmp_path, capsys):
    (kd, _), (lm_only, _) = runs["kd"], runs["lm-only"]
    assert main(["report", str(lm_only), str(kd)]) == 0
    page = lm_only / "report" / "index.html"
    assert capsys.readouterr().out.strip() == f"report written to {page}"
    check = _assert_page_renders(page, browser, expected_images=7)
    assert check.title == "crosskd report: lm-only, kd"
    text = html.unescape(page.read_text())
    assert "<th>setting</th><th>lm-only</th><th>kd</th>" in text
    assert "<tr><th>objective.kd_alpha</th><td>0.0</td><td>1.0</td></tr>" in text  # what differs is shown
    for run_dir in (lm_only, kd):
        start = log_records(run_dir, "start")[0]
        assert f"<td>{start['bpb']:.4f}</td>" in text

    assert main(["report", str(kd), str(lm_only), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "index.html").is_file()


def test_the_exported_student_has_a_model_card_from_the_runs_records(runs, tmp_path):
    run_dir, _ = runs["kd"]
    card = (run_dir / "student" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and "base_model" not in metadata  # tiny:student is no Hub id
    start = log_records(run_dir, "start")[0]
    best = min([start["bpb"]] + [e["bpb"] for e in log_records(run_dir, "eval")])
    for expected in ("- **Base student:** `tiny:student`", "- **Teacher:** `tiny:teacher`",
                     "`first-token` vocabulary transfer, divergence `forward_kl`",
                     f"| held-out BPB before (untouched student) | {start['bpb']:.4f} |",
                     f"| teacher BPB | {start['teacher_bpb']:.4f} |",
                     start["command"]):
        assert expected in card
    assert re.search(rf"\| best BPB, the exported student \(step \d+\) \| {best:.4f} \|", card)
    assert f"data:\n  source: {run_dir.parent / 'corpus'}" in card  # the settings: the run's resolved config

    # A student named by its Hub id is linked as the card's base model.
    copy = tmp_path / "hub-student"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("student", "report"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["models"]["student"] = "HuggingFaceTB/SmolLM2-135M"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert yaml.safe_load(model_card(copy).split("---")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def _write_run(folder, *records):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"models": {"student": "s", "teacher": "t"}}))
    (folder / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def test_a_resumed_or_restarted_log_is_read_as_the_student_saw_it(tmp_path):
    def step(number, seconds):
        return {"kind": "train", "step": number, "total": float(number), "wall_seconds": seconds}

    run_dir = _write_run(
        tmp_path / "run",
        {"kind": "start", "step": 0, "bpb": 9.0, "teacher_bpb": 1.0, "command": "an earlier run in this folder"},
        step(1, 50.0),
        {"kind": "start", "step": 0, "bpb": 4.0, "teacher_bpb": 2.0, "command": "crosskd train c.yaml"},
        step(1, 10.0), step(2, 20.0), step(3, 30.0),  # killed after step 3; the checkpoint is step 2
        {"kind": "eval", "step": 2, "bpb": 3.5},
        {"kind": "start", "step": 2, "bpb": 3.5, "teacher_bpb": 2.0, "command": "crosskd train c.yaml --resume"},
        step(3, 5.0), step(4, 7.0),
        {"kind": "eval", "step": 4, "bpb": 3.0},
    )
    run = read_run(run_dir)
    assert [r["step"] for r in run.train] == [1, 2, 3, 4] and run.train[2]["wall_seconds"] == 5.0
    summary = summarise(run)
    assert (summary.before_bpb, summary.best_bpb, summary.best_step, summary.final_bpb) == (4.0, 3.0, 4, 3.0)
    assert summary.gap_closed == pytest.approx(0.5)
    assert summary.wall_seconds == 20.0 + 7.0  # the first process up to its checkpoint's step, then the resumed one
    assert summary.commands == ["crosskd train c.yaml", "crosskd train c.yaml --resume"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "nowhere", "is not a folder"),
    (lambda tmp: tmp, "log.jsonl and config.yaml missing"),
    (lambda tmp: _write_run(tmp / "run", {"kind": "start", "step": 0}), "holds no training step yet"),
    (lambda tmp: _write_run(tmp / "run", {"no": "kind"}), r"log.jsonl:1 is not a crosskd log record"),
], ids=["missing", "not-a-run", "no-steps", "damaged"])
def test_bad_input_names_the_problem_and_the_fix(tmp_path, capsys, make, message):
    folder = make(tmp_path)
    with pytest.raises(NotARunFolder, match=message):
        write_report([folder])
    assert main(["report", str(folder)]) == 2
    assert re.search(message, capsys.readouterr().err)
