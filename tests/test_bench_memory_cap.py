"""bench/memory_cap.py's premise, checked on this kernel: a cgroup limit kills a process that
needs more private memory than the limit, and takes mapped file pages back from one that only
reads a file bigger than the limit, which then finishes. Skipped where no cgroup can be made
(not root, or no memory controller)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.memory_cap import CapUnavailable, MemoryCap

LIMIT = 64 << 20
FILE_BYTES = 256 << 20


def run_capped(code: str, *args: str):
    try:
        with MemoryCap(LIMIT, name=f"clipfind-test-{os.getpid()}") as cap:
            done = subprocess.run([sys.executable, "-c", code, *args], preexec_fn=cap.preexec,
                                  capture_output=True, text=True, timeout=120)
            return done, cap.oom_kills()
    except CapUnavailable as err:
        pytest.skip(str(err))


def test_private_memory_over_the_cap_is_killed():
    done, oom_kills = run_capped("x = b'x' * (256 << 20); print(len(x))")
    assert done.returncode == -9 and oom_kills >= 1


def test_a_mapped_file_bigger_than_the_cap_is_read_through_to_the_end(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as fh:
        for _ in range(FILE_BYTES >> 20):
            fh.write(os.urandom(1 << 20))
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # its reads start cold: charged to the cap
    code = """
import mmap, sys
with open(sys.argv[1], "rb") as fh:
    m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    pages = sum(1 for offset in range(0, len(m), 4096) if m[offset] >= 0)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(pages, int(line.split()[1]) * 1024)
"""
    done, oom_kills = run_capped(code, str(path))
    assert done.returncode == 0, done.stderr
    pages, hwm = map(int, done.stdout.split())
    assert pages == FILE_BYTES // 4096 and oom_kills == 0
    # Uncapped, every page read stays mapped: VmHWM >= the file. Capped, the kernel took pages back
    # (VmHWM may pass the limit by the interpreter's own pages, charged to whoever loaded them first).
    assert hwm < FILE_BYTES // 2
