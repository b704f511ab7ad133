"""Running the real CLI as a user without root's powers, for permission tests.

Root ignores file modes, and CI runs as root, so a test of "read-only
library" run as root proves nothing. As root this makes (once) a system user
`clipfind-test` and runs `python -m retrieval.cli` as it with `runuser`; run
as anyone else it runs the CLI as that user directly. The files the other
user needs (model, photos, library) must live under a folder it can reach:
`shared_tmpdir` makes one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

USER = "clipfind-test"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class OtherUser:
    """How to run the CLI as a user that file modes apply to."""

    name: str | None  # None: this process's own user (not root)
    uid: int
    gid: int
    python: str
    pythonpath: str

    def chown(self, *paths: Path) -> None:
        """Give `paths` (recursively) to the user, so modes, not ownership, decide."""
        if self.name is None:
            return
        for top in paths:
            for folder, dirs, files in os.walk(top):
                for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                    os.lchown(name, self.uid, self.gid)

    def run(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir(), "PYTHONPATH": self.pythonpath,
               "LANG": "C.UTF-8", "CLIPFIND_CACHE": os.path.join(tempfile.gettempdir(), "cf-nocache")}
        command = [self.python, "-m", "retrieval.cli", *map(str, args)]
        if self.name is not None:
            command = ["runuser", "-u", self.name, "--", "env", *(f"{k}={v}" for k, v in env.items()),
                       *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=None if self.name else {**os.environ, **env}, cwd="/")


def other_user() -> tuple[OtherUser | None, str]:
    """(the user to run as, "") or (None, why it is impossible here)."""
    paths = os.pathsep.join([str(REPO), *site.getsitepackages()])
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return OtherUser(None, me.pw_uid, me.pw_gid, sys.executable, paths), ""
    if shutil.which("runuser") is None:
        return None, "runuser is missing (util-linux)"
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        if shutil.which("useradd") is None:
            return None, "useradd is missing (Debian package passwd)"
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                               USER], capture_output=True, text=True)
        if made.returncode not in (0, 9):  # 9: made meanwhile by a parallel test process
            return None, f"useradd {USER} failed: {made.stderr.strip()}"
        entry = pwd.getpwnam(USER)
    for python in _pythons():
        probe = subprocess.run(["runuser", "-u", USER, "--", "env", f"PYTHONPATH={paths}", python, "-c",
                                "import faiss, sqlalchemy, PIL, click, retrieval.cli"],
                               capture_output=True, text=True, cwd="/")
        if probe.returncode == 0:
            return OtherUser(USER, entry.pw_uid, entry.pw_gid, python, paths), ""
    return None, (f"no Python with this environment's packages can be run by {USER} "
                  f"(tried {', '.join(_pythons())})")


def _pythons() -> list[str]:
    """This interpreter, else a system one of the same version (the venv's may sit under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable, os.path.realpath(sys.executable)]
    found += [p for p in (f"/usr/bin/{version}", f"/usr/local/bin/{version}") if os.path.exists(p)]
    return list(dict.fromkeys(found))


def shared_tmpdir() -> Path:
    """A fresh folder under the system temp dir that any user can enter and read."""
    path = Path(tempfile.mkdtemp(prefix="clipfind-perm-"))
    path.chmod(0o755)
    return path
