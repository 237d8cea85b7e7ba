"""crosskd.models.allocator: while training, the large CPU buffers a step frees are reused by the next step instead of
coming back from the kernel as fresh pages (glibc); afterwards the freed memory goes back to the system. Each case runs in a fresh
interpreter, because malloc's settings belong to the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crosskd.models.allocator import _glibc

# Ten [256, 49152] float32 buffers (48 MiB each), made and freed one after the other, inside or outside the context:
# the minor page faults they cost and the process's resident memory after the context, as the child prints them.
FRESH_CHUNKS = """
import resource, sys
import torch
from crosskd.models.allocator import freed_memory_kept

def faults_of_ten_chunks():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        chunk = torch.empty(256, 49152).fill_(1.0)
        del chunk
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20

if sys.argv[1] == "nested":
    with freed_memory_kept() as outer:
        with freed_memory_kept() as inner:
            pass
        faults_of_ten_chunks()  # the first one comes from the kernel
        after_inner = faults_of_ten_chunks()
        resident_inside = resident_mib()
    print(outer and inner, after_inner, round(resident_inside), round(resident_mib()))
    sys.exit()
enabled = sys.argv[1] == "kept"
with freed_memory_kept(enabled) as kept:
    inside = faults_of_ten_chunks()
    held = torch.empty(256, 49152).fill_(1.0)  # a buffer that lives on after the context
    resident_inside = resident_mib()
resident_after = resident_mib()
print(kept, inside, faults_of_ten_chunks(), round(resident_inside), round(resident_after))
"""

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc: malloc is left as it is")


def run_child(mode: str) -> tuple[bool, int, int, int, int]:
    finished = subprocess.run([sys.executable, "-c", FRESH_CHUNKS, mode], capture_output=True, text=True, check=True)
    kept, inside, after, resident_inside, resident_after = finished.stdout.split()[-5:]
    return kept == "True", int(inside), int(after), int(resident_inside), int(resident_after)


def test_freed_buffers_are_reused_while_kept():
    kept, inside, _, _, _ = run_child("kept")
    assert kept
    # The first buffer's 12k pages come from the kernel once; the nine after it reuse them. (After the context, how
    # many faults a buffer costs depends on where glibc finds room in the heap the run left: the test below checks
    # what the context guarantees, that the freed memory goes back.)
    assert inside < 30_000


def test_disabled_leaves_malloc_as_it_is():
    kept, inside, after, _, _ = run_child("default")
    assert not kept
    assert inside > 100_000 and after > 100_000


def test_the_memory_kept_during_the_run_goes_back_after_it():
    _, _, _, resident_inside, resident_after = run_child("kept")
    # Inside: the reused 48 MiB, the held buffer and the interpreter; after: the freed 48 MiB are returned to the
    # system (malloc_trim), the held buffer stays.
    assert resident_after < resident_inside - 30


def test_nested_contexts_keep_the_memory_until_the_outermost_closes():
    finished = subprocess.run([sys.executable, "-c", FRESH_CHUNKS, "nested"], capture_output=True, text=True,
                              check=True)
    kept, after_inner, resident_inside, resident_after = finished.stdout.split()[-4:]
    assert kept == "True"
    assert int(after_inner) < 10_000  # still reused after the inner context closed
    assert int(resident_after) < int(resident_inside) - 30  # given back when the outermost one closed
