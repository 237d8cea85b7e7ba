"""The `crosskd` command line: arguments reach the right places."""

from __future__ import annotations

import pytest

from crosskd.cli import build_parser, main, parse_arguments
from crosskd.config import ConfigError


def test_resume_is_a_flag_that_leaves_the_next_override_an_override():
    args = parse_arguments(["train", "runs/x/config.yaml", "--resume", "training.max_steps=5"])
    assert args.resume == "latest"
    assert args.overrides == ["training.max_steps=5"]


def test_resume_from_names_a_checkpoint():
    args = parse_arguments(["train", "c.yaml", "training.max_steps=5", "--resume-from", "runs/x/checkpoints/s"])
    assert args.resume == "runs/x/checkpoints/s" and args.overrides == ["training.max_steps=5"]


def test_resume_and_resume_from_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "c.yaml", "--resume", "--resume-from", "x"])
    assert "not allowed with" in capsys.readouterr().err


def test_an_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["train", "c.yaml", "--resume", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_overwrite_is_a_train_flag():
    assert parse_arguments(["train", "c.yaml", "--overwrite"]).overwrite
    assert not parse_arguments(["train", "c.yaml"]).overwrite


def test_an_error_is_its_message_and_a_nonzero_exit_the_traceback_behind_a_switch(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CROSSKD_TRACEBACK", raising=False)
    missing = tmp_path / "missing.yaml"
    assert main(["train", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"crosskd train: error: config file {missing} does not exist; pass a YAML or JSON file" in err
    assert "Traceback" not in err
    with pytest.raises(ConfigError, match="does not exist"):
        main(["--traceback", "train", str(missing)])
