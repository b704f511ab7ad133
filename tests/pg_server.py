"""A throw-away PostgreSQL server for tests and benchmarks: initdb in a temp dir, a free loopback port.

Why its own server: CI starts with none running, and tests must not touch a developer's
databases. PostgreSQL refuses to run as root, so as root (CI, these machines) every server
command runs as the `postgres` system user through `runuser`, in a folder that user owns.
TCP logins need a password (scram), so a wrong password is a real failure to test; the unix
socket in the temp dir trusts its owner. `CLIPFIND_REQUIRE_POSTGRES=1` (set by `.ci/run`) turns
"cannot start a server" from a skip into a failure.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PASSWORD = "clipfind-test"
USER = "postgres"
REQUIRE_ENV = "CLIPFIND_REQUIRE_POSTGRES"
# Durability off for tests only: nothing here must survive a power cut, and fsync per commit
# would cost minutes over the suite. The benchmark starts a server with the defaults.
FAST_SETTINGS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")


class ServerUnavailable(RuntimeError):
    """No PostgreSQL binaries, or the server would not start (the message says which)."""


def server_binaries() -> Path:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<ver>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        raise ServerUnavailable("no PostgreSQL server binaries (initdb) on this machine: "
                                "apt-get install postgresql")
    return Path(candidates[-1]).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One running server; `database()` makes a fresh empty database and returns its URL."""

    _names = itertools.count()

    def __init__(self, settings: str = FAST_SETTINGS) -> None:
        self.bin = server_binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="clipfind-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.settings = settings
        self.as_root = os.geteuid() == 0
        self.running = False

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", USER, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ServerUnavailable(f"{argv[0]} failed: {(result.stderr or result.stdout).strip()[-500:]}")
        return result

    def start(self) -> PostgresServer:
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_root:
            shutil.chown(self.dir, USER, USER)
            shutil.chown(pwfile, USER, USER)
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   f"-c max_connections=200 {self.settings}")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (ServerUnavailable, subprocess.TimeoutExpired):
                pass
            self.running = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def database(self, template: str | None = None) -> str:
        """A new database (a copy of `template`'s, if given: PostgreSQL copies it file by file)."""
        name = f"t{os.getpid()}_{next(self._names)}"
        source = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else " STRATEGY FILE_COPY"
        self.admin(f"CREATE DATABASE {name}{source}")
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]
