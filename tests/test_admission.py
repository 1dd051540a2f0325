"""Admission on its own: MaxStartups, per-source limits, penalties and staller eviction,
driven with a clock and stand-in transports, without a socket."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from nuttconch import config as configmod
from nuttconch.admission import NO_KEXINIT_AGE, STALLER_AGE, Admission
from nuttconch.events import EventBus


class _TCP:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeTransport:
    """What Admission reads of an SSH transport."""

    def __init__(self, host: str, kexinit: bool = False, kexdone: bool = False) -> None:
        self._peerHost = host
        self.gotKexInit = kexinit
        self.firstKexDone = kexdone
        self.transport = _TCP()
        self.penaltyKind = "noauth"
        self.preauthCounted = False


class AdmissionTests(unittest.TestCase):
    def admission(self, **server: str) -> tuple[Admission, Clock, list[tuple[str, dict[str, Any]]]]:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("[server]\n" + "".join(f"{k} = {v}\n" for k, v in server.items()))
        clock = Clock()
        bus = EventBus()
        seen: list[tuple[str, dict[str, Any]]] = []
        bus.subscribe(lambda event, fields: seen.append((event, fields)))
        return Admission(configmod.load(path), clock, bus), clock, seen

    def test_table(self) -> None:
        """Each row: settings, then arrivals (host, whether the previous ones completed
        key exchange); the admit results and the refusal reasons must match."""
        rows = [
            # MaxStartups full: the third is refused, nobody can be evicted (all finished kex).
            (
                {"max_startups": "2:100:2"},
                ["192.0.2.1", "192.0.2.2", "192.0.2.3"],
                [True, True, False],
                ["startups full"],
            ),
            # Per-source cap: the same source's second is refused, another source is not.
            (
                {"per_source_max_startups": "1"},
                ["192.0.2.1", "192.0.2.1", "192.0.2.2"],
                [True, False, True],
                ["per-source startups exceeded"],
            ),
            # IPv6 sources count by /64.
            (
                {"per_source_max_startups": "1"},
                ["2001:db8::1", "2001:db8::2", "2001:db8:1::1"],
                [True, False, True],
                ["per-source startups exceeded"],
            ),
        ]
        for settings, hosts, expected, reasons in rows:
            admission, clock, seen = self.admission(**settings)
            results = []
            for host in hosts:
                ok = admission.admit(host)
                results.append(ok)
                if ok:
                    admission.started(FakeTransport(host, kexinit=True, kexdone=True))
            self.assertEqual(results, expected, settings)
            self.assertEqual(
                [f["reason"] for e, f in seen if e == "connection.refused"], reasons, settings
            )
            self.assertEqual(admission.dropped, len(reasons))

    def test_done_frees_the_place(self) -> None:
        """A connection that authenticated or closed leaves the count, once."""
        admission, _, _ = self.admission(max_startups="1:100:1")
        first = FakeTransport("192.0.2.1", kexinit=True, kexdone=True)
        self.assertTrue(admission.admit("192.0.2.1"))
        admission.started(first)
        self.assertFalse(admission.admit("192.0.2.2"))
        admission.done(first)
        admission.done(first)
        self.assertEqual(admission.startups.total, 0)
        self.assertTrue(admission.admit("192.0.2.2"))

    def test_staller_evicted_for_newcomer(self) -> None:
        """When full, the oldest connection without KEXINIT after NO_KEXINIT_AGE (or
        without finished kex after STALLER_AGE) is aborted to admit a newcomer."""
        admission, clock, _ = self.admission(max_startups="2:100:2")
        silent = FakeTransport("192.0.2.1")
        slow = FakeTransport("192.0.2.2", kexinit=True)
        for t in (silent, slow):
            self.assertTrue(admission.admit(t._peerHost))
            admission.started(t)
        self.assertFalse(admission.admit("192.0.2.3"))  # nobody stalls yet
        clock.advance(NO_KEXINIT_AGE)
        self.assertTrue(admission.admit("192.0.2.3"))
        self.assertTrue(silent.transport.aborted)
        self.assertEqual(silent.penaltyKind, "grace-exceeded")
        self.assertFalse(slow.transport.aborted)
        admission.started(FakeTransport("192.0.2.3", kexinit=True, kexdone=True))
        clock.advance(STALLER_AGE)
        self.assertTrue(admission.admit("192.0.2.4"))
        self.assertTrue(slow.transport.aborted)

    def test_penalties(self) -> None:
        """Failed logins add up to a refusal that ends with time; an exempt source is
        never refused; the penalty is announced on the bus once."""
        admission, clock, seen = self.admission(per_source_penalty_exempt_list="192.0.2.9")
        for host in ("192.0.2.1", "192.0.2.9"):
            for _ in range(3):
                admission.penalise(host, "authfail")
        self.assertFalse(admission.admit("192.0.2.1"))
        self.assertTrue(admission.admit("192.0.2.9"))
        self.assertEqual([f["peer"] for e, f in seen if e == "penalty"], ["192.0.2.1"])
        clock.advance(16)
        self.assertTrue(admission.admit("192.0.2.1"))

    def test_drop_logged_once_a_minute(self) -> None:
        """Every drop is counted and emitted, but logged once per source and reason a
        minute."""
        admission, clock, seen = self.admission(max_startups="1:100:1")
        admission.started(FakeTransport("192.0.2.1", kexinit=True, kexdone=True))
        admission.startups.total = 1
        logged: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        for _ in range(5):
            admission.admit("192.0.2.2")
        clock.advance(60)
        admission.admit("192.0.2.2")
        lines = [e for e in logged if e.get("log_format", "").startswith("refused connection")]
        self.assertEqual(len(lines), 2)
        self.assertEqual({e["log_namespace"] for e in lines}, {"nuttconch.server"})
        self.assertEqual(admission.dropped, 6)
        self.assertEqual(len([e for e, _ in seen if e == "connection.refused"]), 6)
