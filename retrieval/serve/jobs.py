"""Index and tagging runs started from the pages, each a `clipfind` child process.

A child process, not a thread: an index run decodes and encodes for minutes,
and in its own process it neither competes with searches for the GIL and the
model nor takes the server down if it fails; the server keeps answering from
the database (SQLite WAL) while the run commits, and its searcher catches up
with the new rows on the next query. Progress is read from the database the
run writes (rows added so far), and the run's own `--json` summary when it
ends. One run at a time: the library's write lock allows no more anyway.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.config import ENV_DB
from retrieval.errors import InputError

_ids = itertools.count(1)


@dataclass
class Job:
    kind: str  # "index" or "tag"
    argv: list[str]
    id: int = field(default_factory=lambda: next(_ids))
    started: float = field(default_factory=time.time)
    finished: float | None = None
    state: str = "running"  # running, done, failed
    images_before: int = 0
    result: dict | None = None
    error: str | None = None
    process: subprocess.Popen | None = None

    def to_dict(self, images_now: int) -> dict:
        return {"id": self.id, "kind": self.kind, "state": self.state,
                "elapsed_s": round((self.finished or time.time()) - self.started, 1),
                "images_before": self.images_before, "images_now": images_now,
                "new_images": images_now - self.images_before, "result": self.result, "error": self.error}


class Jobs:
    def __init__(self, library_root: Path, database_url: str | None = None) -> None:
        self.root = Path(library_root)
        self.database_url = database_url  # a PostgreSQL library: the child connects as we did
        self.jobs: dict[int, Job] = {}
        self._lock = threading.Lock()

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def start_index(self, folders: list[str], images_now: int) -> Job:
        if not folders:
            raise InputError("name at least one folder to index")
        for folder in folders:
            if not os.path.isabs(folder) or not os.path.isdir(folder):
                raise InputError(f"not a folder on the server: {folder}")
        return self._start("index", ["index", *folders, "--workers", "0", "--quiet"], images_now)

    def start_tag(self, labels: str, images_now: int) -> Job:
        if not labels:
            raise InputError("name a labels file (one label per line) or a built-in set")
        if os.sep in labels and not os.path.isfile(labels):
            raise InputError(f"no labels file {labels} on the server")
        return self._start("tag", ["tag", "--labels", labels, "--quiet"], images_now)

    def _start(self, kind: str, args: list[str], images_now: int) -> Job:
        with self._lock:
            if self.running() is not None:
                raise InputError("a run is already going; wait for it to finish")
            argv = [sys.executable, "-m", "retrieval.cli", *args, "-L", str(self.root), "--json"]
            job = Job(kind, argv, images_before=images_now)
            job.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           stdin=subprocess.DEVNULL, text=True,
                                           env=_child_env(self.database_url))
            self.jobs[job.id] = job
        threading.Thread(target=self._wait, args=(job,), daemon=True, name=f"job-{job.id}").start()
        return job

    def _wait(self, job: Job) -> None:
        out, err = job.process.communicate()
        job.finished = time.time()
        try:
            job.result = json.loads(out) if out.strip() else None
        except ValueError:
            job.result = {"output": out[-2000:]}
        if job.process.returncode == 0:
            job.state = "done"
        else:
            job.state = "failed"
            lines = [line for line in err.splitlines() if line.strip()]
            job.error = lines[-1] if lines else f"exit code {job.process.returncode}"

    def get(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def stop_all(self) -> None:
        for job in self.jobs.values():
            if job.state == "running" and job.process is not None:
                job.process.terminate()  # the CLI treats SIGTERM as Ctrl-C: the run resumes next time


def _child_env(database_url: str | None = None) -> dict:
    """The child finds this very `retrieval` package, even from a checkout that is not installed,
    and the server's database (with the password the folder does not keep)."""
    env = dict(os.environ)
    if database_url:
        env[ENV_DB] = database_url
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env
