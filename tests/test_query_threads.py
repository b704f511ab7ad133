"""Threads of a one-shot query (config.query_threads): the cores that are free right now."""

from __future__ import annotations

import subprocess
import sys
import time

from retrieval import config


def test_free_cores_are_used_up_to_the_cap(monkeypatch):
    monkeypatch.setattr(config, "running_elsewhere", lambda: 0)
    monkeypatch.setattr(config, "usable_cores", lambda: 2)
    assert config.query_threads() == 2
    monkeypatch.setattr(config, "usable_cores", lambda: 64)
    assert config.query_threads() == config.QUERY_THREADS_CAP
    monkeypatch.setattr(config, "running_elsewhere", lambda: 61)
    assert config.query_threads() == 3


def test_cores_busy_right_now_leave_one_thread():
    """Real busy processes, one per usable core: they are counted at once (no minute-old average)."""
    cores = config.usable_cores()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)  # started and spinning
        assert config.running_elsewhere() >= cores
        assert config.query_threads() == 1
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
