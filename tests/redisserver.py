"""A real redis-server per test: its own directory, a free loopback port, stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

from twisted.internet import defer, reactor

from .harness import missing


def require_redis() -> str:
    path = shutil.which("redis-server")
    if path is None:
        missing("redis-server", "apt-get install redis-server")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; ``restart`` keeps the port (and the data only if persistent)."""

    def __init__(self, directory: str, *, persistent: bool = False) -> None:
        self.binary = require_redis()
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.port = free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--daemonize", "no",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "always",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start; see {self.dir}/redis.log")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL by pid: nothing is flushed beyond what appendfsync already wrote."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def cli(self, *args: str) -> str:
        """A command with redis-cli's plain output, for setting up and inspecting."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, check=True, timeout=10
        )
        return out.stdout.decode().strip()


def wait_until(
    predicate: Any, timeout: float = 10, what: str = "condition", explain: Any = None
) -> defer.Deferred[Any]:
    """Fires with the predicate's value once it is true; polls every 5 ms, no fixed sleeps."""
    d: defer.Deferred[Any] = defer.Deferred()
    start = reactor.seconds()  # type: ignore[attr-defined]

    def poll() -> None:
        try:
            value = predicate()
        except Exception as exc:  # a predicate that raises is not yet true
            value = None
            last[0] = exc
        if value:
            d.callback(value)
        elif reactor.seconds() - start > timeout:  # type: ignore[attr-defined]
            state = explain() if explain is not None else last[0]
            d.errback(AssertionError(f"timed out after {timeout}s waiting for {what} ({state})"))
        else:
            reactor.callLater(0.005, poll)  # type: ignore[attr-defined]

    last: list[Any] = [None]
    poll()
    return d
