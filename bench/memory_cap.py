"""Run a benchmark phase under a cgroup memory limit: what a search needs, not what it maps.

A process that memory-maps an index counts every index page it touched in its RSS, even
though those pages are clean page cache that the kernel can take back at any time. So an
uncapped RSS says how much of the index the queries visited, not how much memory the search
needs. Under a cgroup limit the kernel reclaims those pages when the group reaches it; if
the phase finishes (no OOM kill) with its recall and latency, the limit was enough.

The page cache is dropped first (`drop_page_cache`), so the index pages the phase reads
are charged to its group rather than to whoever read them before.

Needs root and a cgroup memory controller (v1 `memory`, or v2 with `memory` enabled for the
group's children); `MemoryCap` raises `CapUnavailable` otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CapUnavailable(RuntimeError):
    """This machine (or this user) cannot make a memory-limited cgroup."""


class MemoryCap:
    """A child cgroup of this process's own, limited to `limit` bytes of memory (anon + page cache).

    Use `preexec` as a subprocess's `preexec_fn`: the child joins the group before it execs.
    """

    def __init__(self, limit: int, name: str | None = None) -> None:
        self.limit = limit
        self.name = name or f"clipfind-bench-{os.getpid()}"
        self.path, self.v2 = _child_group(self.name)

    def __enter__(self) -> MemoryCap:
        try:
            self.path.mkdir()
            if self.v2:
                (self.path / "memory.max").write_text(str(self.limit))
                if (self.path / "memory.swap.max").exists():  # else no swap accounting: nothing to forbid
                    (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        except OSError as err:
            self._remove()
            raise CapUnavailable(f"cannot make a memory-limited cgroup at {self.path}: {err}") from err
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def preexec(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        """The group's highest charge in bytes (anon + page cache): the limit itself once reclaim began."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return 0

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def _remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _child_group(name: str) -> tuple[Path, bool]:
    """Where a child of this process's memory cgroup goes, and whether it is cgroup v2."""
    v1_path = v2_path = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1_path = path
        elif controllers == "":
            v2_path = path
    if v1_path is not None and (CGROUP_ROOT / "memory").is_dir():
        return CGROUP_ROOT / "memory" / v1_path.lstrip("/") / name, False
    if v2_path is not None:
        parent = CGROUP_ROOT / v2_path.lstrip("/")
        controllers = (parent / "cgroup.subtree_control")
        if controllers.exists() and "memory" in controllers.read_text().split():
            return parent / name, True
        raise CapUnavailable(f"cgroup v2 at {parent} does not give its children the memory controller")
    raise CapUnavailable("no cgroup memory controller on this machine")


def drop_page_cache() -> None:
    """Write back dirty pages, then drop the clean page cache (root only), so reads start cold."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as err:
        raise CapUnavailable(f"cannot drop the page cache ({err}): run as root") from err
