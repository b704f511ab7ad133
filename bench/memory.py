"""The memory an indexing run costs: the main process's peak RSS plus its workers' unique memory.

Why not `ru_maxrss` of the largest child: a decode worker forked from a process that
holds a model reports the model's pages in its RSS although it shares them with the
main process (1.3 GB "per worker" that are mostly the same 1.3 GB). What a worker adds
is its unique memory, Private_Clean + Private_Dirty in /proc/PID/smaps_rollup, which
only a sampler running beside it can see. So `run_sampled` polls every descendant of
the command while it runs, and reports:

  main_peak_mb     the command's own VmHWM (kernel's high-water mark, from wait4);
  workers_peak_mb  the largest sum, over one sample, of all descendants' unique memory;
  worker_max_mb    the largest unique memory one descendant reached;
  total_mb         the largest sum, over one sample, of the main process's RSS and all
                   descendants' unique memory (at least main_peak_mb): what the run held
                   at once, the figure issue 17's "<= 1.2 GB" is about;
  upper_mb         main_peak_mb + workers_peak_mb, an upper bound that double-counts when
                   the peaks do not coincide: when the main process frees memory (at exit,
                   say) a worker still alive is left as the only holder of pages they
                   shared, and they become its "unique" memory (seen: ~1.09 GB in a worker
                   sampled while the main process tore down).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence

PERIOD_S = 0.05


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children of children too), from /proc's children lists."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def unique_kb(pid: int) -> int | None:
    """Private_Clean + Private_Dirty of `pid` in kB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            text = fh.read()
    except OSError:
        return None
    total = 0
    for line in text.splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` in kB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Polls the descendants of one process until told to stop."""

    def __init__(self, pid: int, period: float = PERIOD_S) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.stop = threading.Event()
        self.sum_peak_kb = 0
        self.together_peak_kb = 0
        self.one_peak_kb = 0
        self.pids: set[int] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for kid in descendants(self.pid):
                kb = unique_kb(kid)
                if kb is None:
                    continue
                self.pids.add(kid)
                total += kb
                self.one_peak_kb = max(self.one_peak_kb, kb)
            self.sum_peak_kb = max(self.sum_peak_kb, total)
            self.together_peak_kb = max(self.together_peak_kb, total + rss_kb(self.pid))
            self.stop.wait(self.period)


def run_sampled(cmd: Sequence[str], env: dict | None = None, cwd: str | None = None,
                stdin: int | None = subprocess.DEVNULL) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `cmd` to completion while sampling its descendants: (its result, the memory figures)."""
    started = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
                            stdin=stdin)
    sampler = Sampler(proc.pid)
    sampler.start()
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    for r in readers:
        r.join()
    main_mb = usage.ru_maxrss / 1024
    workers_mb = sampler.sum_peak_kb / 1024
    figures = {"main_peak_mb": round(main_mb, 1), "workers_peak_mb": round(workers_mb, 1),
               "worker_max_mb": round(sampler.one_peak_kb / 1024, 1), "workers_seen": len(sampler.pids),
               "total_mb": round(max(main_mb, sampler.together_peak_kb / 1024), 1),
               "upper_mb": round(main_mb + workers_mb, 1), "wall_s": round(seconds, 3)}
    result = subprocess.CompletedProcess(list(cmd), proc.returncode, b"".join(out).decode(errors="replace"),
                                         b"".join(err).decode(errors="replace"))
    return result, figures
