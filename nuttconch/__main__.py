# -*- test-case-name: tests.test_install,tests.test_twistd,tests.test_workers -*-
"""``python -m nuttconch`` / ``nuttconch``: the same as ``twistd -n nuttconch``.

It hands twistd its service maker directly instead of letting twistd look
for plugins: an editable install (``pip install -e .``) does not always put
``twisted/plugins`` where plugin discovery looks, and then ``twistd`` would
answer "Unknown command: nuttconch".

``nuttconch --prepare [--config PATH]`` creates the host keys, the alias secret and
authorized_keys, then exits (for ``ExecStartPre`` of the systemd template unit).
``nuttconch --workers N [options]`` runs N worker processes sharing the SSH port
(SO_REUSEPORT) under a small supervisor, for places without systemd (a Docker
container): one Conch process is one core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from twisted.application.service import IServiceMaker, ServiceMaker
from twisted.scripts.twistd import ServerOptions

# A worker that dies sooner than this after its start is restarted after a growing delay,
# so a worker that cannot start (a bad key file, the port taken) does not spin.
STABLE_SECONDS = 10.0
MAX_BACKOFF = 30.0
STOP_SECONDS = 10.0

SERVICE_MAKER = ServiceMaker(
    "nuttconch",
    "nuttconch.tap",
    "SSH switchboard: virtual ports for ssh -R, reached with ssh -L/-W/-J/-D.",
    "nuttconch",
)


class NuttconchServerOptions(ServerOptions):
    """twistd's options with nuttconch as the only service, found without discovery."""

    def _getPlugins(self, interface: Any, package: Any = None) -> Iterable[Any]:
        if interface is IServiceMaker:
            return [SERVICE_MAKER]
        return super()._getPlugins(interface, package)


def main(argv: list[str] | None = None) -> None:
    from twisted.application import app
    from twisted.scripts.twistd import runApp

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        workers, rest = split_workers(args)
    except ValueError as exc:
        raise SystemExit(f"nuttconch: {exc}") from None
    if workers is not None:
        raise SystemExit(supervise(workers, rest))
    if "--prepare" in rest:
        # For systemd's ExecStartPre: make keys once, before instances start together.
        prepare([a for a in rest if a != "--prepare"])
        return
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "nuttconch", *rest]
    app.run(runApp, NuttconchServerOptions)


def split_workers(args: list[str]) -> tuple[int | None, list[str]]:
    """(N from ``--workers N`` or ``--workers=N``, the other arguments)."""
    workers: int | None = None
    rest: list[str] = []
    items = iter(args)
    for arg in items:
        if arg == "--workers" or arg.startswith("--workers="):
            text = arg.split("=", 1)[1] if "=" in arg else next(items, "")
            if not text.isdigit() or not 1 <= int(text) <= 256:
                raise ValueError(f"--workers expects a number from 1 to 256, not {text!r}")
            workers = int(text)
        else:
            rest.append(arg)
    return workers, rest


def say(text: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"{stamp} [nuttconch.workers#info] {text}", file=sys.stderr, flush=True)


def prepare(rest: list[str]) -> None:
    """Create host keys, the alias secret and authorized_keys once, before the workers
    start: N processes creating them at the same moment would race."""
    from . import config as configmod
    from .authkeys import AuthorizedKeysFile
    from .hostkeys import HostKeyError, load_host_keys, load_or_create, load_or_create_secret

    path = None
    for i, arg in enumerate(rest):
        if arg in ("--config", "-c") and i + 1 < len(rest):
            path = rest[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    try:
        cfg = configmod.load(path)
        load_host_keys(
            {
                "ecdsa": cfg.host_key_ecdsa,
                "ed25519": cfg.host_key_ed25519,
                "rsa": cfg.host_key_rsa,
            }
        )
        load_or_create_secret(cfg.host_key_dir)
        if cfg.cluster_key_file:
            # The cluster's key for hops between nodes: one file shared by every node.
            load_or_create(cfg.cluster_key_file, "ed25519")
        AuthorizedKeysFile(cfg.authorized_keys_file).ensure_exists()
    except (configmod.ConfigError, HostKeyError) as exc:
        raise SystemExit(f"nuttconch: {exc}") from None


def supervise(count: int, rest: list[str]) -> int:
    """Start ``count`` workers, restart any that dies, pass SIGHUP on, stop all on
    SIGTERM or SIGINT. Returns the exit status."""
    prepare(rest)
    stopping: list[int] = []
    hup: list[int] = []

    def on_stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    def on_hup(signum: int, _frame: object) -> None:
        hup.append(signum)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)

    def start(index: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "nuttconch", *rest, "--reuse-port", "--worker", str(index)]
        if index > 1:
            argv.append("--no-metrics")  # one metrics listener: the first worker's
        child = subprocess.Popen(argv)
        say(f"worker {index} started (pid {child.pid})")
        return child

    children = {i: start(i) for i in range(1, count + 1)}
    started = {i: time.monotonic() for i in children}
    delay = {i: 1.0 for i in children}
    due: dict[int, float] = {}
    say(f"{count} workers share the SSH port; supervisor pid {os.getpid()}")
    while not stopping:
        if hup:
            hup.clear()
            for child in children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGHUP)
        now = time.monotonic()
        for index, child in list(children.items()):
            if index in due:
                if now >= due[index]:
                    del due[index]
                    children[index] = start(index)
                    started[index] = now
                continue
            code = child.poll()
            if code is None:
                continue
            lived = now - started[index]
            delay[index] = 1.0 if lived >= STABLE_SECONDS else min(MAX_BACKOFF, delay[index] * 2)
            say(
                f"worker {index} (pid {child.pid}) exited with status {code} after"
                f" {lived:.1f} s; restarting in {delay[index]:.0f} s"
            )
            due[index] = now + delay[index]
        time.sleep(0.1)
    say(f"stopping {len(children)} workers")
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"worker pid {child.pid} did not stop in {STOP_SECONDS:.0f} s: killing it")
            child.kill()
            child.wait()
    return 0


if __name__ == "__main__":
    main()
