"""Composition: ``makeService`` builds the whole server on the reactor it is given.

With a ``MemoryReactorClock`` nothing really listens: the test sees which
ports would be opened, that the key poll runs on that clock, and that every
part shares one event bus and one admission object.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from nuttconch.admission import Admission
from nuttconch.events import EventBus
from nuttconch.tap import KEYS_POLL_SECONDS, Options, makeService

from .harness import host_key_dir


class MakeServiceTests(unittest.TestCase):
    def options(self, extra: str = "") -> Options:
        keydir = os.path.abspath(self.mktemp())
        shutil.copytree(host_key_dir(), keydir)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write(
                f"[server]\nlisten_host = 127.0.0.1\nlisten_port = 2299\n"
                f"[keys]\nhost_key_dir = {keydir}\n"
                f"authorized_keys_file = {keydir}/authorized_keys\n{extra}"
            )
        options = Options()
        options.parseOptions(["--config", path])
        return options

    def start(self, options: Options) -> tuple[Any, MemoryReactorClock, list[Any]]:
        reactor = MemoryReactorClock()
        # A signal handler runs between bytecodes: it must go through callFromThread.
        reactor.callFromThread = lambda f, *a, **kw: f(*a, **kw)  # type: ignore[attr-defined]
        handlers: list[Any] = []
        self.patch(signal, "signal", lambda signum, handler: handlers.append((signum, handler)))
        top = makeService(options, reactor=reactor)
        top.startService()
        self.addCleanup(top.stopService)
        return top, reactor, handlers

    def test_everything_on_the_given_reactor(self) -> None:
        """The SSH and metrics listeners open on the given reactor, and the factory
        keeps it as its clock."""
        top, reactor, _ = self.start(self.options("[metrics]\nlisten = 9100\n"))
        factory = top.factory
        self.assertIs(factory.clock, reactor)
        # The SSH listener is bound through makeBinding (backlog, SO_REUSEPORT): its "port"
        # is a binding that carries the number.
        servers = [
            (getattr(port, "_port", port), f, interface)
            for port, f, _, interface in reactor.tcpServers
        ]
        ports = sorted((port, interface) for port, _, interface in servers)
        self.assertEqual(ports, [(2299, "127.0.0.1"), (9100, "127.0.0.1")])
        factories = {port: f for port, f, _ in servers}
        self.assertIs(factories[2299], factory)

    def test_key_poll_runs_on_the_given_clock(self) -> None:
        """authorized_keys is polled every KEYS_POLL_SECONDS of the given clock, and
        SIGHUP asks that reactor to poll at once."""
        top, reactor, handlers = self.start(self.options())
        calls: list[float] = []
        factory = top.factory
        real = factory.keysFile.reload_cost

        def counting() -> int:
            calls.append(reactor.seconds())
            return int(real())

        factory.keysFile.reload_cost = counting
        reactor.advance(KEYS_POLL_SECONDS)
        reactor.advance(KEYS_POLL_SECONDS)
        self.assertEqual(calls, [KEYS_POLL_SECONDS, 2 * KEYS_POLL_SECONDS])
        ((signum, handler),) = handlers
        self.assertEqual(signum, signal.SIGHUP)
        handler(signal.SIGHUP, None)
        self.assertEqual(len(calls), 3)

    def test_one_bus_and_one_admission(self) -> None:
        """The factory gets the bus and admission the composition made; metrics and
        webhooks are subscribed to that bus, and penalties announce themselves on it."""
        top, reactor, _ = self.start(self.options("[events]\nurl = http://127.0.0.1:9/hook\n"))
        factory = top.factory
        self.assertIsInstance(factory.events, EventBus)
        self.assertIsInstance(factory.admission, Admission)
        self.assertIs(factory.admission.events, factory.events)
        self.assertIn(factory.metrics.observe, factory.events.observers)
        self.assertIn(factory.webhooks.observe, factory.events.observers)
        seen: list[str] = []
        factory.events.subscribe(lambda event, fields: seen.append(event))
        for _ in range(3):
            factory.penalise("192.0.2.1", "authfail")
        self.assertEqual(seen, ["penalty"])


class WorkerConfigTests(unittest.TestCase):
    """What each worker of ``--workers`` runs with in a cluster, and the derived address."""

    def test_worker_endpoints(self) -> None:
        """Each row: worker N's relay endpoint is the port plus N - 1, or the path -wN."""
        from nuttconch.tap import _CLIENT_PORT, _SERVER_PORT, _worker_endpoint

        rows = [
            ("tcp:2300", 1, _SERVER_PORT, "tcp:2300"),
            ("tcp:2300", 3, _SERVER_PORT, "tcp:2302"),
            ("tcp:2300:interface=127.0.0.1", 2, _SERVER_PORT, "tcp:2301:interface=127.0.0.1"),
            ("tcp6:2300:interface=\\:\\:1", 2, _SERVER_PORT, "tcp6:2301:interface=\\:\\:1"),
            ("unix:/run/relay.sock", 2, _SERVER_PORT, "unix:/run/relay.sock-w2"),
            ("tcp:127.0.0.1:2300", 2, _CLIENT_PORT, "tcp:127.0.0.1:2301"),
            ("tcp6:\\:\\:1:2300", 2, _CLIENT_PORT, "tcp6:\\:\\:1:2301"),
            ("", 2, _CLIENT_PORT, ""),
        ]
        for text, index, pattern, expected in rows:
            self.assertEqual(_worker_endpoint(text, index, pattern), expected, text)
        with self.assertRaises(ValueError):
            _worker_endpoint("tcp:host=a:port=3", 2, _CLIENT_PORT)

    def test_default_relay_address(self) -> None:
        """Each row: an empty relay_address becomes HOSTNAME:PORT only for a relay on
        every address."""
        import socket

        from nuttconch.tap import default_relay_address

        host = socket.gethostname()
        rows = [
            ("tcp:2300", f"tcp:{host}:2300"),
            ("tcp:2300:interface=0.0.0.0", f"tcp:{host}:2300"),
            ("tcp:2300:interface=127.0.0.1", ""),
            ("unix:/run/relay.sock", ""),
            ("", ""),
        ]
        for text, expected in rows:
            self.assertEqual(default_relay_address(text), expected, text)
