"""Fleet scale (issue 13): admission sized for fleets, reconnect storms, the open-file limit.

The fleets are real SSH clients (asyncssh, ``bench/fleet.py``) in a child
process, so the server in this process meets them as it would meet devices:
each from its own loopback address of 127.0.0.0/8, all at the same moment.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from twisted.internet import defer, protocol, reactor, task, threads, utils
from twisted.trial import unittest

from nuttconch.limits import DescriptorGuard, Startups
from nuttconch.tap import LISTEN_BACKLOG
from tests.harness import SwitchboardTestMixin, listen_echo
from tests.test_ops import OpsTestMixin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLEET = os.path.join(ROOT, "bench", "fleet.py")


class _Dice:
    """A random source that always rolls ``value`` (0 drops whenever dropping is possible)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


class AdmissionRuleTests(unittest.TestCase):
    """Startups.admit, rule by rule: (state before, newcomer, expected answer)."""

    # start, full, per_source; pending connections by source; newcomer; dice; expected
    CASES: list[tuple[str, tuple[int, int, int], dict[str, int], str, float, str | None]] = [
        ("empty table admits", (10, 100, 5), {}, "10.0.0.1", 0.0, None),
        (
            "a fresh source past start is not early-dropped",
            (10, 100, 5),
            {f"10.0.1.{i}": 1 for i in range(50)},
            "10.0.0.1",
            0.0,
            None,
        ),
        (
            "a source already pending past start meets the dice",
            (10, 100, 5),
            {**{f"10.0.1.{i}": 1 for i in range(50)}, "10.0.0.1": 1},
            "10.0.0.1",
            0.0,
            "startups early drop",
        ),
        (
            "...and a lucky roll admits it",
            (10, 100, 5),
            {**{f"10.0.1.{i}": 1 for i in range(50)}, "10.0.0.1": 1},
            "10.0.0.1",
            0.999,
            None,
        ),
        (
            "below start nobody is dropped",
            (10, 100, 5),
            {"10.0.0.1": 4},
            "10.0.0.1",
            0.0,
            None,
        ),
        (
            "one address holds at most its share",
            (10, 100, 5),
            {"10.0.0.1": 5},
            "10.0.0.1",
            0.999,
            "per-source startups exceeded",
        ),
        (
            "an IPv6 /64 is one source",
            (10, 100, 2),
            {"2001:db8::/64": 2},
            "2001:db8::77",
            0.999,
            "per-source startups exceeded",
        ),
        (
            "a full table refuses even a fresh source (the caller evicts a staller)",
            (10, 100, 5),
            {f"10.0.{i // 250}.{i % 250}": 1 for i in range(100)},
            "10.9.9.9",
            0.999,
            "startups full",
        ),
    ]

    def test_rules(self) -> None:
        """Each row of CASES gives the expected answer, and counts only what it admits."""
        for name, (start, full, per_source), pending, host, dice, expected in self.CASES:
            startups = Startups(start, 30, full, per_source, rng=_Dice(dice))  # type: ignore[arg-type]
            startups.by_source = dict(pending)
            startups.total = sum(pending.values())
            before = startups.total
            got = startups.admit(host)
            self.assertEqual(got, expected, name)
            self.assertEqual(startups.total, before + (1 if expected is None else 0), name)

    def test_defaults_fit_a_fleet(self) -> None:
        """With the shipped defaults, 200 devices from 200 addresses all get in at once."""
        from nuttconch import config as configmod

        cfg = configmod.load(os.devnull)
        start, rate, full = cfg.max_startups
        startups = Startups(start, rate, full, cfg.per_source_max_startups, rng=_Dice(0.0))  # type: ignore[arg-type]
        answers = [startups.admit(f"127.1.0.{i}") for i in range(2, 202)]
        self.assertEqual(answers, [None] * 200)
        # Also the other way round: 2,000 stallers stand and one more device gets in.
        for i in range(2000):
            startups.admit(f"127.2.{i // 40}.1")
        self.assertIsNone(startups.admit("127.3.0.1"))
        self.assertLessEqual(startups.by_source["127.2.0.1"], cfg.per_source_max_startups)


class DescriptorGuardTests(unittest.TestCase):
    """(limit, baseline, open connections) -> admitted; and the log line once an interval."""

    def test_ceiling(self) -> None:
        """Each row: the guard admits a connection only below limit - baseline - headroom."""
        rows = [
            # limit, baseline, open, admitted
            (1024, 10, 0, True),
            (1024, 10, 981, True),  # 1024 - 32 headroom - 10 baseline = 982
            (1024, 10, 982, False),
            (20000, 20, 19579, True),  # 2% headroom = 400
            (20000, 20, 19580, False),
            (0, 0, 10**9, True),  # unknown limit: never refuse
        ]
        for limit, baseline, count, admitted in rows:
            guard = DescriptorGuard(limit, baseline, clock=lambda: 0.0)
            self.assertEqual(guard.admit(count), admitted, (limit, baseline, count))

    def test_one_line_an_interval(self) -> None:
        """Refusals at the limit are logged once an interval with their count, not each."""
        clock = task.Clock()
        guard = DescriptorGuard(100, 0, clock=clock.seconds, interval=60)
        lines = []
        for _second in range(180):
            clock.advance(1)
            for _ in range(50):
                self.assertFalse(guard.admit(100))
                count = guard.report()
                if count is not None:
                    lines.append(count)
        self.assertEqual(guard.refused, 9000)
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[0], 1)  # the first refusal is said at once


def run_fleet(*args: str, timeout: float = 120) -> defer.Deferred[dict[str, Any]]:
    """Run bench/fleet.py to completion; fires with its JSON answer."""
    d = utils.getProcessOutputAndValue(
        sys.executable, [FLEET, *args], env=dict(os.environ), path=ROOT
    )

    def parse(result: tuple[bytes, bytes, int]) -> dict[str, Any]:
        out, err, code = result
        if code != 0:
            raise AssertionError(f"fleet.py exited {code}: {err.decode(errors='replace')[-2000:]}")
        return dict(json.loads(out.decode().strip().splitlines()[-1]))

    d.addCallback(parse)
    d.addTimeout(timeout, reactor)
    return d


class Fleet(protocol.ProcessProtocol):
    """bench/fleet.py held open: ``lines`` fires with each JSON line it prints."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.events.append(json.loads(line))

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def stop(self) -> defer.Deferred[None]:
        if not self.ended.called:
            self.transport.closeStdin()
        return self.ended


def spawn_fleet(testcase: Any, *args: str) -> Fleet:
    child = Fleet()
    reactor.spawnProcess(
        child, sys.executable, [sys.executable, FLEET, *args], env=dict(os.environ), path=ROOT
    )
    testcase.addCleanup(child.stop)
    return child


class FleetServerMixin(SwitchboardTestMixin):
    def startServer(self, **overrides: str) -> Any:
        """As the harness, but listening with the server's own backlog (tap.LISTEN_BACKLOG):
        with the harness's 50, a fleet's SYNs beyond it wait a one-second retransmit."""
        result = super().startServer(**overrides)
        self.listening.stopListening()
        self.listening = reactor.listenTCP(
            0, self.factory, backlog=LISTEN_BACKLOG, interface="127.0.0.1"
        )
        self.port = self.listening.getHost().port
        return result


class FleetLoginTests(FleetServerMixin, unittest.TestCase):
    """Issue 13.1 end to end, with the shipped admission defaults."""

    timeout = 240

    @defer.inlineCallbacks
    def test_200_first_logins_at_once(self) -> Any:
        """200 new devices from 200 addresses, all at the same moment: all trusted, first try."""
        before = open(self.akfile).read().count("\n")
        result = yield run_fleet(
            "burst", "--port", str(self.port), "--count", "200", "--fresh-keys", "--spread"
        )
        self.assertEqual(result["failed"], 0, result["reasons"])
        self.assertEqual(result["ok"], 200)
        after = open(self.akfile).read().count("\n")
        self.assertEqual(after - before, 200, "each first login adds one trusted key")
        self.assertEqual(self.factory.dropped, 0)

    @defer.inlineCallbacks
    def test_200_known_initiators_at_once(self) -> Any:
        """200 known devices (one fleet key, as a fleet image has) log in at once: all first try."""
        key = self.key("fleet", options='access="initiate"')
        result = yield run_fleet(
            "burst", "--port", str(self.port), "--count", "200", "--key", key, "--spread"
        )
        self.assertEqual(result["failed"], 0, result["reasons"])
        self.assertEqual(self.factory.dropped, 0)

    @defer.inlineCallbacks
    def test_login_while_2000_stall(self) -> Any:
        """One address cannot hold more than its share of handshakes; then 2,000 stalled
        handshakes from other addresses stand and a device logs in on its first try."""
        # One address tries to hold 100: it gets its share, the rest are closed at once.
        greedy = []
        for _ in range(100):
            sock = socket.socket()
            sock.bind(("127.3.0.1", 0))
            sock.connect(("127.0.0.1", self.port))
            greedy.append(sock)
        self.addCleanup(lambda: [s.close() for s in greedy])
        share = self.config.per_source_max_startups
        yield self.waitFor(
            lambda: self.factory.startups.by_source.get("127.3.0.1") == share, 10, "share held"
        )
        stallers = spawn_fleet(
            self, "stall", "--port", str(self.port), "--count", "2000", "--per-address", "1"
        )
        yield self.waitFor(lambda: stallers.events, 60, "2000 stallers connected")
        self.assertEqual(stallers.events[0]["held"], 2000, stallers.events)
        yield self.waitFor(lambda: self.factory.startups.total >= 2000 + share, 30, "all pending")
        key = self.key("legit", options='access="initiate"')
        out, err, code = yield self.ssh(key, "legit", "-T", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertGreaterEqual(
            self.factory.startups.total, 1999 + share, "the stallers still stand"
        )
        self.assertEqual(self.factory.startups.by_source.get("127.3.0.1"), share)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FD_LIMIT = 128


class OpenFileLimitTests(SwitchboardTestMixin, unittest.TestCase):
    """Issue 13.3: a server whose open-file limit is 128 (soft and hard, so it cannot
    raise it), run as its own process, meets 300 connections at once."""

    timeout = 120

    def startServer(self, **overrides: str) -> Any:
        from tests.test_twistd import _Child, free_port

        self.port = free_port()
        self.config = None
        self.writeConfig(listen_port=str(self.port), **overrides)
        script = (
            "import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT}))\n"
            "from nuttconch.__main__ import main\n"
            "main(['--config', sys.argv[1]])\n"
        )
        self.server = _Child()
        reactor.spawnProcess(
            self.server,
            sys.executable,
            [sys.executable, "-c", script, os.path.join(self.dir, "nuttssh.ini")],
            env={**os.environ, "PYTHONPATH": ROOT},
            path=self.dir,
        )
        self.addCleanup(self.stopServer)
        return self.waitFor(lambda: "listening on" in self.server.output, 30, "server up")

    @defer.inlineCallbacks
    def stopServer(self) -> Any:
        for proc in list(self.processes):
            yield proc.kill()
        if self.server.running:
            self.server.transport.signalProcess("TERM")
            yield self.server.ended

    @defer.inlineCallbacks
    def test_at_the_limit(self) -> Any:
        """Past the limit new connections are closed at once, the established ones keep
        carrying circuits, the refusals are one log line, the server does not spin, and
        once the flood goes new logins work again."""
        self.assertIn(f"open-file limit: {FD_LIMIT}", self.server.output)
        target = listen_echo(self)
        initiator = self.spawn(self.key("k1"), "user1", "-n", "-R", f"6379:localhost:{target}")
        yield initiator.waitOutput(b"-N -L 6379:", timeout=30)
        name = initiator.out.split(b"-N -L 6379:")[1].split(b":")[0].decode()
        from tests.test_twistd import free_port

        lport = free_port()
        self.spawn(self.key("k2"), "user2", "-N", "-L", f"{lport}:{name}:6379", stdin=None)

        def echo(payload: bytes) -> bytes:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", lport), timeout=10) as sock:
                        sock.sendall(payload)
                        sock.shutdown(socket.SHUT_WR)
                        got = b""
                        while part := sock.recv(65536):
                            got += part
                        if got or time.monotonic() > deadline:
                            return got
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.2)

        got = yield threads.deferToThread(echo, b"before")
        self.assertEqual(got, b"before")

        def flood() -> tuple[list[socket.socket], int]:
            socks, banners = [], 0
            for i in range(300):
                sock = socket.socket()
                sock.bind((f"127.5.{i // 250}.{1 + i % 250}", 0))  # not one source's share
                sock.settimeout(5)
                sock.connect(("127.0.0.1", self.port))
                socks.append(sock)
            time.sleep(1.0)
            for sock in socks:
                sock.setblocking(False)
                try:
                    if sock.recv(256).startswith(b"SSH-2.0-"):
                        banners += 1
                except OSError:
                    pass
            return socks, banners

        socks, banners = yield threads.deferToThread(flood)
        self.addCleanup(lambda: [s.close() for s in socks])
        self.assertLess(banners, FD_LIMIT, "the ones past the limit got no banner")
        self.assertGreater(banners, 30, "the server served until near its limit")
        pid = self.server.transport.pid
        cpu0 = cpu_seconds(pid)
        got = yield threads.deferToThread(echo, b"during the flood")
        self.assertEqual(got, b"during the flood", "an established connection still serves")
        yield task.deferLater(reactor, 3, lambda: None)
        cpu = cpu_seconds(pid) - cpu0
        self.assertLess(cpu, 1.0, f"server CPU {cpu:.2f} s in ~3 s at the limit: a busy loop")
        log = self.server.output
        self.assertEqual(log.count("near the open-file limit"), 1, log[-3000:])
        self.assertNotIn("EMFILE", log)
        self.assertNotIn("Traceback", log)
        for sock in socks:
            sock.close()
        yield self.waitFor(lambda: True, 1)
        out, err, code = yield self.ssh(self.key("k3"), "user3", command=("whoami",))
        self.assertEqual(code, 0, err)
        print(f"\nfd limit {FD_LIMIT}: {banners} of 300 got a banner; CPU {cpu:.2f} s in 3 s")


class _Identity:
    access = frozenset({"list", "admin"})


class _Avatar:
    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.identity = _Identity()


def fill_registry(registry: Any, count: int) -> None:
    from nuttconch.registry import Listener

    for i in range(count):
        listener = Listener(
            f"dev{i}", (f"dev{i}-abcdefg", f"dev{i}"), peer=f"127.1.{i // 250}.{i % 250}"
        )
        registry.add_port(listener, "localhost", 22)


class BoundedViewTests(unittest.TestCase):
    """Issue 13.4: list views of a fleet are pages, the full size said on the side."""

    def test_page_rows(self) -> None:
        """Each row: --limit/--offset parse into a page, and bad values are refused."""
        from nuttconch.paging import Page, PageError, parse

        rows = [
            # args, (offset, limit), rest
            ([], (0, 1000), []),
            (["--json"], (0, 1000), ["--json"]),
            (["--limit", "10", "--offset", "20", "--json"], (20, 10), ["--json"]),
        ]
        for args, (offset, limit), rest in rows:
            page, left = parse(args)
            self.assertEqual((page.offset, page.limit, left), (offset, limit, rest), args)
        for bad in (["--limit"], ["--limit", "0"], ["--limit", "x"], ["--offset", "-1"]):
            with self.assertRaises(PageError, msg=bad):
                parse(bad)
        notes = [
            (Page(0, 1000), 10, 10, ""),
            (Page(0, 1000), 1000, 5000, "showing 1-1000 of 5000; next: listeners --offset 1000\n"),
            (Page(4000, 1000), 1000, 5000, "showing 4001-5000 of 5000\n"),
            (Page(0, 10), 10, 20, "showing 1-10 of 20; next: listeners --offset 10 --limit 10\n"),
        ]
        for page, shown, total, expected in notes:
            self.assertEqual(page.note(shown, total, "listeners"), expected)

    def test_listeners_of_a_fleet(self) -> None:
        """5,000 initiators: ``listeners`` shows 1,000 rows, says where the rest are,
        and the pages together are the whole list, each name once."""
        from nuttconch import commands
        from nuttconch.registry import InMemoryRegistry

        class Factory:
            registry = InMemoryRegistry()
            transports: set[Any] = set()

        fill_registry(Factory.registry, 5000)
        avatar = _Avatar(Factory)
        first = commands.run(avatar, "listeners")
        self.assertEqual(first.code, 0)
        self.assertEqual(len(first.out.splitlines()), 1001)  # header and 1,000 rows
        self.assertEqual(first.err, "showing 1-1000 of 5000; next: listeners --offset 1000\n")
        seen: list[str] = []
        offset = 0
        while True:
            result = commands.run(avatar, f"listeners --json --offset {offset}")
            rows = json.loads(result.out)
            seen += [row["name"] for row in rows]
            if "next:" not in result.err:
                break
            offset = int(result.err.split("--offset ")[1].split()[0])
        self.assertEqual(len(seen), 5000)
        self.assertEqual(len(set(seen)), 5000)
        bad = commands.run(avatar, "listeners --limit 0")
        self.assertEqual(bad.code, 2)
        self.assertIn("--limit expects a number from 1 to 100000", bad.err)


class StormTests(FleetServerMixin, unittest.TestCase):
    """Issue 13.2, scaled down: 300 initiators all come back after a restart."""

    timeout = 240

    @defer.inlineCallbacks
    def test_reconnect_storm(self) -> Any:
        """300 initiators (one fleet key, each its own address) hold a name and a port;
        the server restarts; every one has its name and port back within 30 s."""
        key = self.key("fleet", options='access="initiate"')
        count = 300
        storm = spawn_fleet(
            self, "storm", "--port", str(self.port), "--count", str(count), "--key", key,
            "--spread", "--retry", "1",
        )  # fmt: skip
        yield self.waitFor(lambda: storm.events, 120, "all initiators up")
        self.assertEqual(storm.events[0]["event"], "ready")
        self.assertEqual(len(self.registry.listeners()), count)
        port = self.port
        yield self.stopServer()
        restarted = reactor.seconds()
        cfg = self.config
        from nuttconch.tap import build

        self.factory, self.registry = build(cfg)
        self.listening = reactor.listenTCP(
            port, self.factory, backlog=LISTEN_BACKLOG, interface="127.0.0.1"
        )
        self.addCleanup(self.stopServer)
        yield self.waitFor(lambda: len(self.registry.listeners()) == count, 60, "every name back")
        back = reactor.seconds() - restarted
        yield self.waitFor(lambda: len(storm.events) >= 2, 30, "the fleet to say it is back")
        self.assertEqual(storm.events[1]["event"], "back")
        self.assertLess(back, 30)
        ports = [sorted(x.ports) for x in self.registry.listeners()]
        self.assertEqual(sum(1 for p in ports if p), count, "each has its port back")
        print(
            f"\n{count} initiators back {back:.1f} s after the restart; fleet: {storm.events[1]};"
            f" refused by the server: {self.factory.dropped}"
        )
        # Nobody was turned away to retry: each came back on its first try after the restart.
        self.assertEqual(self.factory.dropped, 0)
        self.assertEqual(storm.events[1]["reconnects"], count)


class BoundedAPITests(OpsTestMixin, unittest.TestCase):
    """/api/listeners of a fleet: one page, the total in X-Total-Count."""

    @defer.inlineCallbacks
    def test_api_pages(self) -> Any:
        """/api/listeners answers one page (1,000 by default) and the total in X-Total-Count."""
        fill_registry(self.registry, 2500)
        response, body = yield self.get("/api/listeners")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(json.loads(body)), 1000)
        self.assertEqual(response.headers.getRawHeaders(b"X-Total-Count"), [b"2500"])
        response, body = yield self.get("/api/listeners?offset=2400&limit=500")
        rows = json.loads(body)
        self.assertEqual(len(rows), 100)
        response, body = yield self.get("/api/listeners?limit=0")
        self.assertEqual(response.code, 400)
        self.assertIn(b"--limit expects a number", body)
        response, body = yield self.get("/api/circuits")
        self.assertEqual(response.headers.getRawHeaders(b"X-Total-Count"), [b"0"])
