"""
The real command line, as an operator runs it: ``twistd -n nuttconch`` and
``python -m nuttconch`` in a fresh directory, checked from outside.

Every child is started here, waited for with a deadline, and killed by its
own pid in cleanup if it is still running.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import stat
import sys
from typing import Any

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# A new installation generates no ECDSA host key (issue 12.6).
HOST_KEYS = ("ssh_host_ed25519_key", "ssh_host_rsa_key")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Child(protocol.ProcessProtocol):
    """Collects a child's output and fires ``ended`` with its exit code."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.running = True
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.running = False
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(reason.value.exitCode)

    @property
    def output(self) -> str:
        return (self.out + self.err).decode("utf-8", "replace")


class _Banner(protocol.Protocol):
    def __init__(self, got: defer.Deferred[bytes]) -> None:
        self.got = got
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data and not self.got.called:
            self.got.callback(self.data.split(b"\n", 1)[0])
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.got.called:
            self.got.errback(reason)


class CommandLineTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def writeConfig(self, name: str, port: int, extra: str = "") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {port}\n{extra}")
        return path

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[_Child, Any]:
        """Start a child in the temp dir and make sure it is gone when the test ends."""
        child = _Child()
        full_env = {"PYTHONPATH": ROOT, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        full_env.update(env or {})
        transport = reactor.spawnProcess(
            child, argv[0], argv, env=full_env, path=self.dir, usePTY=False
        )

        @defer.inlineCallbacks
        def cleanup() -> Any:
            if child.running:
                try:
                    transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass
                yield child.ended

        self.addCleanup(cleanup)
        return child, transport

    @defer.inlineCallbacks
    def waitBanner(self, child: _Child, port: int) -> Any:
        """Poll until the port answers with an SSH banner; fail if the child dies first."""
        deadline = reactor.seconds() + START_TIMEOUT
        while True:
            if not child.running:
                self.fail(f"server exited early:\n{child.output}")
            got: defer.Deferred[bytes] = defer.Deferred()
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
            factory = protocol.Factory.forProtocol(functools.partial(_Banner, got))
            try:
                yield endpoint.connect(factory)
                banner = yield got.addTimeout(5, reactor)
            except (error.ConnectError, error.ConnectionDone, error.ConnectionLost):
                banner = None
            if banner is not None:
                return banner
            if reactor.seconds() > deadline:
                self.fail(f"no banner on port {port} within {START_TIMEOUT}s:\n{child.output}")
            yield task.deferLater(reactor, 0.2, lambda: None)

    @defer.inlineCallbacks
    def stop(self, child: _Child, transport: Any) -> Any:
        """SIGTERM the child by pid; it must shut down cleanly within 10 s.

        A clean stop is exit status 0, or (twistd's own convention since
        Twisted 21.2, which systemd also counts as success) the process
        re-raising the SIGTERM it handled after "Server Shut Down".
        """
        transport.signalProcess("TERM")
        code = yield child.ended.addTimeout(STOP_TIMEOUT, reactor)
        self.assertIn("Server Shut Down", child.output)
        self.assertNotIn("Traceback", child.output)
        if code != 0:
            self.assertEqual(
                (code, child.signal), (None, signal.SIGTERM), f"unclean exit:\n{child.output}"
            )

    @defer.inlineCallbacks
    def waitExit(self, child: _Child) -> Any:
        code = yield child.ended.addTimeout(START_TIMEOUT, reactor)
        return code

    def readKeys(self) -> dict[str, bytes]:
        found = {}
        for name in HOST_KEYS:
            for suffix in ("", ".pub"):
                with open(os.path.join(self.dir, "keys", name + suffix), "rb") as handle:
                    found[name + suffix] = handle.read()
        return found

    @defer.inlineCallbacks
    def startAndCheck(self, argv: list[str], port: int, env: dict[str, str] | None = None) -> Any:
        child, transport = self.spawn(argv, env)
        banner = yield self.waitBanner(child, port)
        self.assertTrue(banner.startswith(b"SSH-2.0-"), banner)
        return child, transport

    @defer.inlineCallbacks
    def test_twistd_start_stop_restart(self) -> None:
        """twistd -n nuttconch makes 0600 host keys, logs, stops on SIGTERM, reuses its keys."""
        port = free_port()
        path = self.writeConfig("x.ini", port)
        argv = [*TWISTD, "-n", "--pidfile=", "nuttconch", "--config", path]
        child, transport = yield self.startAndCheck(argv, port)
        keydir = os.path.join(self.dir, "keys")
        for name in HOST_KEYS:
            key = os.path.join(keydir, name)
            self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600, name)
            self.assertTrue(os.path.exists(key + ".pub"), name)
        self.assertFalse(os.path.exists(os.path.join(keydir, "ssh_host_ecdsa_key")))
        authorized = os.path.join(keydir, "authorized_keys")
        self.assertEqual(os.path.getsize(authorized), 0)
        self.assertIn("nuttconch listening on", child.out.decode("utf-8", "replace"))
        before = self.readKeys()
        yield self.stop(child, transport)

        port = free_port()
        self.writeConfig("x.ini", port)
        child, transport = yield self.startAndCheck(argv, port)
        self.assertEqual(self.readKeys(), before)
        self.assertNotIn("generated", child.output)
        yield self.stop(child, transport)

    @defer.inlineCallbacks
    def test_env_var_selects_config(self) -> None:
        """NUTTSSH_CONFIG_FILE selects the config, ahead of ./nuttssh.ini."""
        port = free_port()
        path = self.writeConfig("custom.ini", port)
        with open(os.path.join(self.dir, "nuttssh.ini"), "w") as handle:
            handle.write("[server]\nlisten_port = 70000\n")
        argv = [*TWISTD, "-n", "--pidfile=", "nuttconch"]
        child, transport = yield self.startAndCheck(argv, port, {"NUTTSSH_CONFIG_FILE": path})
        self.assertIn(path, child.output)
        yield self.stop(child, transport)

    @defer.inlineCallbacks
    def checkBadConfig(self, argv_before_config: list[str]) -> Any:
        path = self.writeConfig("bad.ini", 70000)
        child, _ = self.spawn([*argv_before_config, "--config", path])
        code = yield self.waitExit(child)
        self.assertNotEqual(code, 0)
        output = child.output
        self.assertNotIn("Traceback", output)
        expected = f"{path}: [server] listen_port = '70000': expected a number from 0 to 65535"
        self.assertIn(expected, output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, f"expected one line, got:\n{output}")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "keys")))

    def test_bad_config_twistd(self) -> None:
        """twistd nuttconch with a bad value fails with one line: file, key, reason."""
        return self.checkBadConfig([*TWISTD, "-n", "--pidfile=", "nuttconch"])

    def test_bad_config_module(self) -> None:
        """python -m nuttconch with a bad value fails with one line: file, key, reason."""
        return self.checkBadConfig([sys.executable, "-m", "nuttconch"])

    @defer.inlineCallbacks
    def test_python_m_nuttconch(self) -> None:
        """python -m nuttconch --config X.ini serves SSH and stops cleanly on SIGTERM."""
        port = free_port()
        path = self.writeConfig("x.ini", port)
        argv = [sys.executable, "-m", "nuttconch", "--config", path]
        child, transport = yield self.startAndCheck(argv, port)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "keys", "authorized_keys")))
        yield self.stop(child, transport)
