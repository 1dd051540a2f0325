"""Load cases of THREATS.md (24, 26, 28, 29) with bounded, scalable counts.

Counts are CI-modest by default so the module stays well under a minute;
``NUTTCONCH_STRESS_SCALE=20`` (or more) turns them into the real load test.
Figures (F1, F4, F6, F7, F12, F13 and friends) are printed to stderr as
``FIGURE name value`` lines, and appended to ``$NUTTCONCH_FIGURES`` if set.
"""

from __future__ import annotations

import gc
import os
import resource
import struct
import sys
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from nuttconch import circuit

from . import rawssh
from .rawssh import NS, connect_client, connect_raw, direct_tcpip, packet
from .test_threats import ThreatMixin

SCALE = float(os.environ.get("NUTTCONCH_STRESS_SCALE", "1"))


def scaled(base: int) -> int:
    return max(1, int(base * SCALE))


def figure(name: str, value: Any) -> None:
    line = f"FIGURE {name} {value}"
    sys.stderr.write(line + "\n")
    path = os.environ.get("NUTTCONCH_FIGURES")
    if path:
        with open(path, "a") as handle:
            handle.write(line + "\n")


def rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class StressTests(ThreatMixin, unittest.TestCase):
    """Load: floods, idle swarms, circuit churn, rekey storms and malformed-input floods."""

    timeout = 300

    @defer.inlineCallbacks
    def timedLogin(self, attempts: int = 20) -> Any:
        """Seconds until a legit whoami succeeds, retrying a dropped connection."""
        started = time.monotonic()
        for _ in range(attempts):
            out, err, code = yield self.ssh(self.legit, "legit", command=("whoami",))
            if code == 0:
                return time.monotonic() - started
        self.fail(f"legit login never succeeded: {err!r}")

    @defer.inlineCallbacks
    def test_24_unauthenticated_flood(self) -> Any:
        """Case 24 (F1): a banner-and-stop flood from one address and from 100 loopback
        addresses is shed by the pre-auth caps; a legit login completes in < 2 s, and full
        service returns once the flood stops."""
        raise_fd_limit()
        per = scaled(300)
        conns = []
        for _ in range(per):
            r = yield connect_raw(self.port, bind="127.0.0.3")
            r.send(rawssh.SSH_VERSION)
            conns.append(r)
        for i in range(100):
            for _ in range(scaled(3)):
                r = yield connect_raw(self.port, bind=f"127.0.1.{i + 1}")
                r.send(rawssh.SSH_VERSION)
                conns.append(r)
        yield task.deferLater(reactor, 0.5, lambda: None)
        held = len(self.factory.transports)
        figure("F1.flood_connections", len(conns))
        figure("F1.held_preauth", held)
        figure("F1.shed", self.factory.dropped)
        self.assertLessEqual(self.factory.startups.total, self.config.max_startups[2])
        times = []
        for _ in range(5):
            elapsed = yield self.timedLogin()
            times.append(elapsed)
        figure("F1.legit_login_p95_s", f"{percentile(times, 95):.3f}")
        self.assertLess(percentile(times, 95), 2.0)
        for r in conns:
            r.abort()
        yield self.waitFor(lambda: self.factory.startups.total == 0, 10, "flood gone")
        elapsed = yield self.timedLogin(1)
        self.assertLess(elapsed, 2.0)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    @defer.inlineCallbacks
    def test_26_idle_authenticated(self) -> Any:
        """Case 26: idle authenticated connections without forwards are closed after the
        unused-connection timeout; idle initiators are kept and dead ones found by keepalive."""
        yield self.stopServer()
        # Many connections with one key from one address, on purpose: no caps on those.
        self.startServer(
            unused_connection_timeout="60",
            max_startups="1000",
            per_source_max_startups="1000",
            max_connections_per_key="0",
            max_connections_per_source="0",
        )
        self.legit = self.key("legit7", options='access="listen",access="initiate"')
        clock = task.Clock()
        self.factory.clock = clock
        n = scaled(40)
        key = self.key("idle", options='access="initiate"')
        rssBefore = rss_kib()
        idle = []
        for i in range(n):
            c = yield connect_client(self.port, key=key, user=f"idle{i}".encode())
            self.addCleanup(c.close)
            idle.append(c)
        forwarding = []
        for i in range(n):
            c = yield connect_client(self.port, key=key, user=f"fwd{i}".encode())
            self.addCleanup(c.close)
            num, _ = yield c.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", 80))
            self.assertEqual(num, 81)
            forwarding.append(c)
        figure("F26.rss_per_idle_connection_kib", f"{(rss_kib() - rssBefore) / (2 * n):.1f}")
        for half in forwarding[: n // 2]:
            half.playDead = True
        interval = self.config.client_alive_interval
        for _ in range(5):
            clock.advance(interval)
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield self.waitFor(lambda: all(c.isLost for c in idle), 10, "idle closed")
        yield self.waitFor(
            lambda: all(c.isLost for c in forwarding[: n // 2]), 10, "dead initiators closed"
        )
        self.assertFalse(any(c.isLost for c in forwarding[n // 2 :]))
        self.assertEqual(len(self.registry.listeners()), n - n // 2)
        self.factory.clock = reactor

    @defer.inlineCallbacks
    def test_28_circuit_churn(self) -> Any:
        """Case 28 (F6): open/transfer/close cycles, ending by EOF, abrupt CLOSE or client
        disconnect, return registry, channels, circuit objects and fds to baseline."""
        proc, listener = yield self.echoInitiator(tag=b"")
        name = listener.connect_name.encode()
        cycles = scaled(60)
        c = yield self.authed('access="listen"', name="churn")
        gc.collect()
        baseFds, baseRss = fd_count(), rss_kib()
        baseEnds = sum(isinstance(o, circuit.CircuitEnd) for o in gc.get_objects())
        for i in range(cycles):
            mode = i % 3
            if mode == 2:
                c.close()
                yield c.waitLost()
                c = yield self.authed('access="listen"', name=f"churn{i}")
            num, payload = yield c.conn.openRaw(b"direct-tcpip", direct_tcpip(name, 7100), sender=i)
            self.assertEqual(num, 91)
            remote = struct.unpack(">2L", payload[:8])[1]
            c.sendPacket(94, struct.pack(">L", remote) + NS(b"ping %d" % i))
            yield c.inbox.expect(94, channel=i)
            if mode == 0:
                c.sendPacket(96, struct.pack(">L", remote))
            else:
                c.sendPacket(97, struct.pack(">L", remote))
            yield c.inbox.expect(97, channel=i)
            if mode == 0:
                c.sendPacket(97, struct.pack(">L", remote))
            c.inbox.messages.clear()
        c.close()
        yield c.waitLost()
        yield self.waitFor(lambda: not listener.opener.conn.channels, what="initiator clean")
        yield task.deferLater(reactor, 0.2, lambda: None)
        gc.collect()
        ends = sum(isinstance(o, circuit.CircuitEnd) for o in gc.get_objects())
        figure("F6.cycles", cycles)
        figure("F6.rss_drift_kib", rss_kib() - baseRss)
        figure("F6.fd_drift", fd_count() - baseFds)
        figure("F6.circuit_ends_drift", ends - baseEnds)
        self.assertEqual([len(x.ports) for x in self.registry.listeners()], [1])
        self.assertLessEqual(fd_count() - baseFds, 2)
        self.assertLessEqual(ends - baseEnds, 0)
        self.assertLess(rss_kib() - baseRss, 5 * 1024)

    @defer.inlineCallbacks
    def test_29_malformed_flood_log_budget(self) -> Any:
        """Case 29 (F13): malformed-packet connections each cost under 300 log bytes and no
        traceback."""
        n = scaled(100)
        before = len(self.logs.out.getvalue())
        for i in range(n):
            r = yield connect_raw(self.port)
            r.send(rawssh.SSH_VERSION + struct.pack(">LB", 0xFFFFFFF0 - i, 4) + b"\0" * 11)
            yield r.closed
        yield task.deferLater(reactor, 0.2, lambda: None)
        text = "".join(
            x + "\n" for x in self.logs.out.getvalue()[before:].splitlines() if "[nuttconch." in x
        )
        perConn = len(text.encode()) / n
        figure("F13.log_bytes_per_malformed_connection", f"{perConn:.0f}")
        self.assertLess(perConn, 300)
        self.assertNotIn("Traceback", text)

    @defer.inlineCallbacks
    def test_29_rekey_storm_is_limited(self) -> Any:
        """Case 29: an authenticated client re-keying every 100 ms is disconnected after a few."""
        c = yield self.authed()
        rekeys = 0
        for _ in range(30):
            if c.isLost:
                break
            if c._keyExchangeState == c._KEY_EXCHANGE_NONE:
                c.sendKexInit()
                rekeys += 1
            yield task.deferLater(reactor, 0.1, lambda: None)
        figure("F29.rekeys_before_disconnect", rekeys if c.isLost else f">{rekeys} (no limit)")
        self.assertTrue(c.isLost, f"{rekeys} client rekeys in 3 s were all accepted")

    @defer.inlineCallbacks
    def test_29_handshake_flood_latency(self) -> Any:
        """Case 29 (F12): full handshakes per second, and legit login p95 < 1 s during a
        key-exchange flood."""
        yield self.stopServer()
        self.startServer(max_startups="1000", per_source_max_startups="1000")
        self.legit = self.key("legit8", options='access="listen",access="initiate"')
        parallel = scaled(8)
        duration = 3.0 * min(SCALE, 10)
        stop = time.monotonic() + duration
        done = [0]

        @defer.inlineCallbacks
        def loop() -> Any:
            while time.monotonic() < stop:
                c = yield connect_client(self.port, stage="kex")
                done[0] += 1
                c.close()
                yield c.waitLost()

        loops = [loop() for _ in range(parallel)]
        times = []
        while time.monotonic() < stop:
            started = time.monotonic()
            out, err, code = yield self.ssh(self.legit, "legit8", command=("whoami",))
            self.assertEqual(code, 0, err)
            times.append(time.monotonic() - started)
        yield defer.gatherResults(loops)
        figure("F12.handshakes_per_s", f"{done[0] / duration:.0f}")
        figure("F12.legit_login_p95_s", f"{percentile(times, 95):.3f}")
        self.assertLess(percentile(times, 95), 1.0)

    @defer.inlineCallbacks
    def test_10_caps_at_default_limits(self) -> Any:
        """Case 10 (F7): channel and forward opens on one connection stop at max_channels and
        max_forwards."""
        c = yield self.authed()
        opened = 0
        cap = self.config.max_channels
        for _ in range(scaled(cap + 50) if SCALE >= 1 else cap + 50):
            num, payload = yield c.conn.openRaw(b"session", window=0)
            if num == 92:
                self.assertEqual(rawssh.open_failure_code(payload), 4)
                break
            opened += 1
        forwards = 0
        for port in range(1, self.config.max_forwards + 20):
            num, _ = yield c.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", port))
            if num == 82:
                break
            forwards += 1
        figure("F7.channels_before_refusal", opened)
        figure("F7.forwards_before_refusal", forwards)
        self.assertEqual((opened, forwards), (cap, self.config.max_forwards))

    @defer.inlineCallbacks
    def test_05_kex_flood_memory(self) -> Any:
        """Case 5 (F4): a never-finished kex followed by a message flood is cut off early, with
        little buffered server-side (RSS of a separate server: bench/threat_figures.py)."""
        ignore = packet(bytes([2]) + NS(b"x" * 1000))
        peak = 0
        for _ in range(scaled(20)):
            r = yield connect_raw(self.port)
            r.send(rawssh.SSH_VERSION + packet(rawssh.kexinit()) + ignore * 500)
            while r.closedAt is None:
                peak = max([peak] + [len(t.buf) for t in self.factory.transports])
                yield task.deferLater(reactor, 0.001, lambda: None)
        figure("F4.peak_server_buffer_bytes", peak)
        self.assertLess(peak, 2 * 1024 * 1024)
