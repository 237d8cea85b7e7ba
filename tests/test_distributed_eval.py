"""Bits per byte under two CPU processes (gloo) equals one process: every window is scored exactly once.

`accelerate launch --cpu --num_processes 2` starts ONE process on a machine without MPI (its simple launcher ignores
the count), so the test launches through torchrun (`--multi_gpu`) with ACCELERATE_USE_CPU=true, which makes
accelerate pick MULTI_CPU with the gloo backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from crosskd.data.encoding import encode_with_byte_spans
from crosskd.evaluate import bits_per_byte
from crosskd.models.loading import load_model
from trainer_helpers import REPO, launch_command, write_corpus

WINDOW = 128  # small windows: the text gives an odd number of them, so the processes get unequal shares

SCRIPT = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from crosskd.evaluate import bits_per_byte
    from crosskd.models.loading import load_model

    accelerator = Accelerator()
    student = load_model("tiny:student", "student")
    text = open(sys.argv[1], encoding="utf-8").read()
    result = bits_per_byte(student.model, student.tokenizer, text, window=int(sys.argv[2]), accelerator=accelerator)
    if accelerator.is_main_process:
        with open(sys.argv[3], "w") as handle:  # closed (flushed) now, not at interpreter exit
            json.dump({"processes": accelerator.num_processes, "backend": accelerator.state.backend,
                       **vars(result)}, handle)
    accelerator.wait_for_everyone()  # no process tears the group down while its peer still writes
    accelerator.end_training()  # destroy the process group: gloo aborts a process that exits with it alive
""")


# Gloo's teardown can abort a process during interpreter finalisation, after all its work is done and the process
# group destroyed (pytorch/pytorch#190489; the abandoned fix pytorch/pytorch#179291 describes the race). Seen here
# in about one full-suite run out of two, never in isolation. Only that exact abort is tolerated, and only once the
# result file is complete; everything the test checks is still checked.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def _launch_two_cpu_processes(arguments: list[str], output, timeout: float) -> subprocess.CompletedProcess:
    command = [*launch_command(2), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *arguments]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO)
    aborted_at_teardown = GLOO_TEARDOWN_ABORT in completed.stderr and output.is_file()
    assert completed.returncode == 0 or aborted_at_teardown, completed.stderr[-3000:]
    return completed


@pytest.mark.distributed
def test_bits_per_byte_over_two_processes_counts_every_window_once(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    text_file = corpus / "heldout.txt"
    script, output = tmp_path / "bpb.py", tmp_path / "bpb.json"
    script.write_text(SCRIPT)
    _launch_two_cpu_processes([str(script), str(text_file), str(WINDOW), str(output)], output, timeout=120)
    distributed = json.loads(output.read_text())

    student = load_model("tiny:student", "student")
    single = bits_per_byte(student.model, student.tokenizer, text_file.read_text(encoding="utf-8"), window=WINDOW)
    windows = -(-len(encode_with_byte_spans(student.tokenizer, text_file.read_text(encoding="utf-8"))) // WINDOW)
    assert windows % 2 == 1 and windows >= 3, windows  # an uneven split between the two processes
    assert (distributed["processes"], distributed["backend"]) == (2, "gloo")
    assert distributed["scored_tokens"] == single.scored_tokens
    assert distributed["scored_bytes"] == single.scored_bytes
    assert distributed["bits_per_byte"] == pytest.approx(single.bits_per_byte, rel=1e-9)
    assert distributed["perplexity"] == pytest.approx(single.perplexity, rel=1e-9)
