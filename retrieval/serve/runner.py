"""Running the app: a listening socket, uvicorn on it, serve.json while it lives.

    server = WebServer(state, "127.0.0.1", 8765)   # binds now: a taken port fails here
    server.run()                                   # until Ctrl-C / SIGTERM (main thread)
    server.start_in_thread(); ...; server.stop()   # tests, benchmarks

uvicorn's h11 protocol is used (pure Python, strict HTTP/1.1 framing: a bad or
doubled Content-Length is a 400 and the connection closes, so a body is never
read as a request). uvicorn's keep-alive timer starts only after a first
response, so a connection that sends nothing, or never finishes its headers,
would be held forever; `GuardedH11Protocol` closes those after `IDLE_TIMEOUT_S`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from retrieval.serve.app import create_app
from retrieval.serve.client import SERVE_FILE
from retrieval.serve.state import ServeState

IDLE_TIMEOUT_S = 5.0  # a connection must finish a request's headers within this long
BACKLOG = 2048  # pending connections the kernel queues (the old server had 5: bursts were reset)


class GuardedH11Protocol(H11Protocol):
    """h11 with a deadline for every request's headers, also the first one."""

    idle_timeout = IDLE_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        cycle = self.cycle
        self.loop.call_later(self.idle_timeout, self._deadline, cycle)

    def _deadline(self, cycle_when_armed) -> None:
        """No new request began since the deadline was armed: close the connection."""
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            if cycle_when_armed is None or cycle_when_armed.response_complete:
                self.transport.close()


def quiet_logging(verbose: bool) -> None:
    """Warnings (and with -v every request) to stderr as one line each; no tracebacks for hang-ups."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("clipfind serve: %(message)s"))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.propagate = False
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.INFO if verbose else logging.WARNING)


class WebServer:
    def __init__(self, state: ServeState, host: str = "127.0.0.1", port: int = 0, verbose: bool = False,
                 idle_timeout: float = IDLE_TIMEOUT_S) -> None:
        self.state = state
        self.app = create_app(state)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        protocol = type("GuardedH11", (GuardedH11Protocol,), {"idle_timeout": idle_timeout})
        config = uvicorn.Config(self.app, http=protocol, lifespan="off", backlog=BACKLOG,
                                timeout_keep_alive=max(1, round(idle_timeout)), timeout_graceful_shutdown=3,
                                log_config=None, access_log=verbose, server_header=False)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def token(self) -> str:
        return self.state.token

    @property
    def login_url(self) -> str:
        return f"{self.url}/login?token={self.state.token}"

    # -- serve.json ------------------------------------------------------------------------
    def announce(self) -> Path:
        """Write serve.json (0600, atomically) so the CLI on this library can find us."""
        root = self.state.root
        target = root / SERVE_FILE
        tmp = root / f".{SERVE_FILE}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"url": self.url, "pid": os.getpid(), "token": self.state.token}, fh)
        os.replace(tmp, target)
        return target

    def withdraw(self) -> None:
        target = self.state.root / SERVE_FILE
        try:
            if json.loads(target.read_text()).get("pid") == os.getpid():
                target.unlink()
        except (OSError, ValueError):
            pass

    # -- running ---------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn handles both when run in the main thread)."""
        self.server.run(sockets=[self.socket])

    def start_in_thread(self, timeout: float = 30.0) -> WebServer:
        self._thread = threading.Thread(target=self.run, daemon=True, name="clipfind-web")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the web server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.socket.close()
        self.state.close()
