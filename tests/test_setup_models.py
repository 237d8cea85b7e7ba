"""setup-models logic on small fake files: no download, no conversion, seconds.

The package install, the GGUF conversion and the BPB measurement are replaced by fakes; checksum verification,
the completion marker, atomic installation, idempotence and clean-up are the real code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from crosskd.models import reference
from crosskd.models.cache import resolve_cache_dir
from crosskd.models.reference import (
    MARKER_FILE,
    ChecksumMismatchError,
    GGUFSource,
    ReferenceModelsMissing,
    SetupError,
    ensure_model_folders,
    folder_problem,
)

PART_CONTENTS = (b"first part of the gguf " * 10, b"second part " * 7, b"tail")
GGUF_BYTES = b"".join(PART_CONTENTS)


def make_source(sha256: str | None = None, role: str = "teacher") -> GGUFSource:
    return GGUFSource(
        role=role,
        packages=(f"fake-{role}==1.0",),
        parts=tuple(f"fake_{role}/data/part{i}.bin" for i in range(len(PART_CONTENTS))),
        gguf_name=f"{role}.gguf",
        size=len(GGUF_BYTES),
        sha256=sha256 or hashlib.sha256(GGUF_BYTES).hexdigest(),
        expected_bpb=0.5,
    )


class Fakes:
    """Records calls to the replaced steps; `convert_failure` makes the conversion die half-way."""

    def __init__(self):
        self.installs: list[list[str]] = []
        self.conversions: list[bytes] = []
        self.bpb_measurements = 0
        self.measured_bpb = 0.5
        self.convert_failure: BaseException | None = None

    def install_packages(self, packages, target: Path) -> None:
        self.installs.append(list(packages))
        for package in packages:
            role = package.split("-")[1].split("==")[0]
            for i, content in enumerate(PART_CONTENTS):
                path = target / f"fake_{role}" / "data" / f"part{i}.bin"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)

    def convert(self, gguf_path: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "fake"}))
        if self.convert_failure is not None:
            raise self.convert_failure
        gguf_bytes = gguf_path.read_bytes()
        self.conversions.append(gguf_bytes)
        (out_dir / "model.safetensors").write_bytes(gguf_bytes * 3)

    def measure(self, folder: Path) -> float:
        self.bpb_measurements += 1
        return self.measured_bpb


@pytest.fixture
def fakes(monkeypatch) -> Fakes:
    fakes = Fakes()
    monkeypatch.setattr(reference, "install_packages", fakes.install_packages)
    monkeypatch.setattr(reference, "convert_gguf_to_folder", fakes.convert)
    return fakes


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(reference.BUILD_PREFIX))


def test_build_concatenates_parts_in_order_and_writes_the_marker_last(tmp_path, fakes):
    source = make_source()
    folders = ensure_model_folders(tmp_path, [source], fakes.measure)

    folder = folders["teacher"]
    assert fakes.conversions == [GGUF_BYTES]  # parts joined in order, exactly
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["gguf"]["sha256"] == source.sha256
    assert marker["bpb"]["measured"] == 0.5
    recorded = marker["files"]["model.safetensors"]
    assert recorded["sha256"] == hashlib.sha256(GGUF_BYTES * 3).hexdigest()
    assert set(marker["files"]) == {"config.json", "model.safetensors"}
    assert folder_problem(folder, source) is None
    assert leftovers(tmp_path) == []  # the download and the GGUF are gone


def test_second_run_only_verifies(tmp_path, fakes):
    source = make_source()
    ensure_model_folders(tmp_path, [source], fakes.measure)
    marker_before = (tmp_path / "teacher" / MARKER_FILE).read_text()

    ensure_model_folders(tmp_path, [source], fakes.measure)

    assert len(fakes.installs) == 1 and len(fakes.conversions) == 1 and fakes.bpb_measurements == 1
    assert (tmp_path / "teacher" / MARKER_FILE).read_text() == marker_before


def test_reverify_rehashes_and_remeasures(tmp_path, fakes):
    source = make_source()
    ensure_model_folders(tmp_path, [source], fakes.measure)
    ensure_model_folders(tmp_path, [source], fakes.measure, reverify=True)
    assert fakes.bpb_measurements == 2 and len(fakes.conversions) == 1

    # Same size, different content: only a re-hash can see it, and it triggers a rebuild.
    weights = tmp_path / "teacher" / "model.safetensors"
    weights.write_bytes(b"X" * weights.stat().st_size)
    assert folder_problem(tmp_path / "teacher", source) is None
    assert "sha256 differs" in folder_problem(tmp_path / "teacher", source, rehash=True)
    ensure_model_folders(tmp_path, [source], fakes.measure, reverify=True)
    assert len(fakes.conversions) == 2
    assert weights.read_bytes() == GGUF_BYTES * 3


def test_bpb_skipped_at_build_is_measured_once_when_asked(tmp_path, fakes):
    source = make_source()
    ensure_model_folders(tmp_path, [source], measure_bpb=None)
    assert fakes.bpb_measurements == 0
    assert json.loads((tmp_path / "teacher" / MARKER_FILE).read_text())["bpb"] is None

    ensure_model_folders(tmp_path, [source], fakes.measure)
    ensure_model_folders(tmp_path, [source], fakes.measure)
    assert fakes.bpb_measurements == 1
    assert json.loads((tmp_path / "teacher" / MARKER_FILE).read_text())["bpb"]["measured"] == 0.5


def test_checksum_mismatch_is_a_clear_error_and_installs_nothing(tmp_path, fakes):
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as caught:
        ensure_model_folders(tmp_path, [make_source(sha256=wrong)], fakes.measure)

    message = str(caught.value)
    assert "teacher.gguf" in message
    assert wrong in message and hashlib.sha256(GGUF_BYTES).hexdigest() in message
    assert "crosskd setup-models" in message
    assert not (tmp_path / "teacher").exists()
    assert leftovers(tmp_path) == []
    assert fakes.conversions == []


def test_missing_part_names_the_file(tmp_path, fakes, monkeypatch):
    monkeypatch.setattr(reference, "install_packages", lambda packages, target: target.mkdir(parents=True))
    with pytest.raises(SetupError, match=r"did not contain fake_teacher/data/part0\.bin"):
        ensure_model_folders(tmp_path, [make_source()], fakes.measure)
    assert not (tmp_path / "teacher").exists()


@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), MemoryError("killed")])
def test_interrupted_build_never_leaves_a_valid_looking_folder(tmp_path, fakes, interruption):
    source = make_source()
    fakes.convert_failure = interruption
    with pytest.raises(type(interruption)):
        ensure_model_folders(tmp_path, [source], fakes.measure)
    assert not (tmp_path / "teacher").exists()
    assert folder_problem(tmp_path / "teacher", source) is not None

    fakes.convert_failure = None
    ensure_model_folders(tmp_path, [source], fakes.measure)
    assert folder_problem(tmp_path / "teacher", source) is None


def test_hard_kill_leftovers_are_cleaned_and_a_markerless_folder_is_rebuilt(tmp_path, fakes):
    source = make_source()
    # What a SIGKILL could leave: a build folder, and (from a foreign or older tool) a folder without a marker.
    (tmp_path / f"{reference.BUILD_PREFIX}dead").mkdir(parents=True)
    (tmp_path / f"{reference.BUILD_PREFIX}dead" / "site").mkdir()
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    assert "no readable completion marker" in folder_problem(tmp_path / "teacher", source)

    ensure_model_folders(tmp_path, [source], fakes.measure)

    assert leftovers(tmp_path) == []
    assert folder_problem(tmp_path / "teacher", source) is None
    assert (tmp_path / "teacher" / "model.safetensors").is_file()


def test_changed_file_size_or_new_pin_means_rebuild(tmp_path, fakes):
    source = make_source()
    ensure_model_folders(tmp_path, [source], fakes.measure)
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"truncated")
    assert "changed size" in folder_problem(tmp_path / "teacher", source)

    (tmp_path / "teacher" / "model.safetensors").write_bytes(GGUF_BYTES * 3)
    repinned = GGUFSource(**{**source.__dict__, "sha256": "f" * 64})
    assert "different pinned GGUF" in folder_problem(tmp_path / "teacher", repinned)


def test_bpb_outside_tolerance_is_an_error_and_installs_nothing(tmp_path, fakes):
    fakes.measured_bpb = 0.9
    with pytest.raises(SetupError, match=r"held-out BPB 0\.9000, outside 0\.5 ± 0\.002.*--skip-bpb-check"):
        ensure_model_folders(tmp_path, [make_source()], fakes.measure)
    assert not (tmp_path / "teacher").exists()


def test_only_missing_roles_are_downloaded(tmp_path, fakes):
    teacher, student = make_source(role="teacher"), make_source(role="student")
    ensure_model_folders(tmp_path, [teacher], fakes.measure)
    ensure_model_folders(tmp_path, [teacher, student], fakes.measure)
    assert fakes.installs == [["fake-teacher==1.0"], ["fake-student==1.0"]]


def test_unreachable_registry_is_a_clear_error_with_pips_last_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore this machine's index configuration
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(SetupError) as caught:
        reference.install_packages(["crosskd-no-such-package==0.0.1"], tmp_path / "site")
    message = str(caught.value)
    assert "could not install crosskd-no-such-package==0.0.1 from the package registry" in message
    assert "crosskd setup-models" in message
    assert "pip's last lines:\n" in message and "crosskd-no-such-package" in message.split("pip's last lines:")[1]


def test_reference_model_dirs_names_the_command_when_missing(tmp_path):
    with pytest.raises(ReferenceModelsMissing, match=r"reference teacher is not set up.*`crosskd setup-models --cache-dir"):
        reference.reference_model_dirs(tmp_path)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSKD_CACHE", str(tmp_path / "from-env"))
    assert resolve_cache_dir(tmp_path / "from-flag") == tmp_path / "from-flag"
    assert resolve_cache_dir() == tmp_path / "from-env"
    monkeypatch.delenv("CROSSKD_CACHE")
    assert resolve_cache_dir().name == "crosskd"


def test_cli_reports_setup_errors_without_a_traceback(tmp_path, fakes, monkeypatch, capsys):
    monkeypatch.setattr(reference, "REFERENCE_SOURCES", (make_source(sha256="0" * 64),))
    from crosskd.cli import main

    assert main(["setup-models", "--cache-dir", str(tmp_path)]) == 1
    assert "crosskd setup-models: error:" in capsys.readouterr().err
