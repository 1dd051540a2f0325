"""Issue 14.10: the memory budget for circuit windows and the connection caps.

Unit tests drive ``MemoryBudget`` and ``ConnectionLimits`` directly; the attack tests
run the real server in-process: a hostile initiator that never reads (it confirms
every circuit with window 0) and a client that fills every circuit it opens, so that
everything the client sends stays in the server; and many logins with one key or from
one address. Figures are printed as ``FIGURE name value`` lines on stderr (and appended
to ``$NUTTCONCH_FIGURES`` when set).
"""

from __future__ import annotations

import itertools
import os
import struct
from typing import Any

from twisted.conch.ssh import channel, common
from twisted.internet import defer
from twisted.trial import unittest

from nuttconch import budget as budgetmod
from nuttconch import config as configmod
from nuttconch.budget import FLOOR, ConnectionLimits, MemoryBudget, TooManyConnections

from .rawssh import NS, direct_tcpip, open_failure_code
from .test_stress import figure, rss_kib
from .test_threats import OPEN_RESOURCE_SHORTAGE, ThreatMixin, server_buffered

MiB = 1024 * 1024
WINDOW = 2 * MiB


class End:
    """A stand-in for a circuit end: the budget only keeps its fields on it."""

    allotment = 0


# ---------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------


class MemoryBudgetTests(unittest.TestCase):
    """Allotments per connection and server-wide."""

    def test_full_window_while_room(self) -> None:
        """Ends get the whole window while both budgets have room for it."""
        b = MemoryBudget(8 * MiB, 64 * MiB, WINDOW)
        windows = [b.open(End(), "c") for _ in range(4)]
        self.assertEqual(windows, [WINDOW] * 4)
        self.assertEqual((b.total, b.accounts["c"].total), (8 * MiB, 8 * MiB))

    def test_beyond_budget_only_the_floor(self) -> None:
        """Once a connection's budget is spent, a new end gets one packet of window."""
        b = MemoryBudget(8 * MiB, 0, WINDOW)
        for _ in range(4):
            b.open(End(), "c")
        self.assertEqual(b.open(End(), "c"), FLOOR)
        self.assertEqual(b.open(End(), "other"), WINDOW)

    def test_regrant_all_under_budget(self) -> None:
        """Under budget, every byte that moved on is given back: the window stays whole."""
        b = MemoryBudget(8 * MiB, 64 * MiB, WINDOW)
        end = End()
        b.open(end, "c")
        self.assertEqual(b.regrant(end, 100000), 100000)
        self.assertEqual(end.allotment, WINDOW)

    def test_shrink_to_fair_share_and_grow_back(self) -> None:
        """Over budget, a flowing end keeps only its fair share; when the others close it
        grows back to the whole window."""
        b = MemoryBudget(8 * MiB, 0, WINDOW)
        first = End()
        b.open(first, "c")
        others = [End() for _ in range(15)]
        for end in others:
            b.open(end, "c")
        share = 8 * MiB // 16
        # first's sender used its whole window and all of it moved on: it gets its share.
        self.assertEqual(b.regrant(first, WINDOW), share)
        self.assertEqual(first.allotment, share)
        for end in others:
            b.close(end)
        self.assertEqual(b.regrant(first, share), WINDOW)
        self.assertEqual(first.allotment, WINDOW)

    def test_never_revokes_outstanding_window(self) -> None:
        """A shrinking end gives back nothing until its outstanding window is below its
        share: what the sender was promised is never taken away."""
        b = MemoryBudget(4 * MiB, 0, WINDOW)
        a, c = End(), End()
        b.open(a, "c")
        b.open(c, "c")
        for _ in range(6):
            b.open(End(), "c")
        self.assertEqual(b.regrant(a, 65536), 0)  # 2 MiB - 64 KiB still outstanding > 512 KiB
        self.assertEqual(a.allotment, WINDOW - 65536)

    def test_progress_when_exhausted(self) -> None:
        """However full the budgets (here by ends that never drain), an end whose bytes all
        moved on always gets at least one packet of window back: no deadlock."""
        b = MemoryBudget(1 * MiB, 2 * MiB, WINDOW)
        stuck = [End() for _ in range(200)]
        for end in stuck:
            b.open(end, "hostile")
        mover = End()
        b.open(mover, "victim")
        for _ in range(100):
            granted = b.regrant(mover, mover.allotment)  # everything it had moved on
            self.assertGreaterEqual(granted, FLOOR)

    def test_close_returns_allotment(self) -> None:
        """Closing (twice, as Conch may) returns each end's allotment exactly once."""
        b = MemoryBudget(8 * MiB, 64 * MiB, WINDOW)
        ends = [End() for _ in range(10)]
        for end in ends:
            b.open(end, "c")
        for end in ends:
            b.close(end)
            b.close(end)
        self.assertEqual((b.total, b.ends, b.accounts), (0, 0, {}))

    def test_bound_holds_under_random_traffic(self) -> None:
        """Whatever the order of opens, regrants and closes, allotments stay within each
        budget plus one floor per end."""
        import random

        rng = random.Random(14)
        b = MemoryBudget(4 * MiB, 12 * MiB, WINDOW)
        live: list[tuple[End, str]] = []
        for _ in range(5000):
            action = rng.random()
            if action < 0.3 or not live:
                conn = f"c{rng.randrange(6)}"
                end = End()
                if b.refusal() is None:
                    b.open(end, conn)
                    live.append((end, conn))
            elif action < 0.9:
                end, _ = rng.choice(live)
                moved = rng.randrange(0, end.allotment + 1)
                b.regrant(end, moved)
            else:
                end, _ = live.pop(rng.randrange(len(live)))
                b.close(end)
            self.assertLessEqual(b.total, 12 * MiB + 2 * FLOOR)
            for account in b.accounts.values():
                self.assertLessEqual(account.total, 4 * MiB + account.ends * FLOOR)
            self.assertEqual(b.total, sum(e.allotment for e, _ in live))

    def test_refusal_when_server_budget_spent(self) -> None:
        """A new circuit is refused, with a sentence for the client, once the server-wide
        budget cannot pay its two ends' floors; it is accepted again after a close."""
        b = MemoryBudget(0, 4 * MiB, WINDOW)
        self.assertIsNone(b.refusal())
        ends = [End(), End()]
        for end in ends:
            b.open(end, "c")
        refusal = b.refusal()
        self.assertEqual(refusal, "the server is short of memory for new circuits; try again later")
        b.close(ends[0])
        self.assertIsNone(b.refusal())

    def test_unlimited(self) -> None:
        """0 means no limit: every end gets the whole window."""
        b = MemoryBudget(0, 0, WINDOW)
        self.assertEqual([b.open(End(), "c") for _ in range(100)], [WINDOW] * 100)
        self.assertIsNone(b.refusal())


class ConnectionLimitsTests(unittest.TestCase):
    """Authenticated connections per key and per source."""

    def test_per_key(self) -> None:
        """The key's next login over the cap is refused with a sentence saying why."""
        limits = ConnectionLimits(per_key=2, per_source=0)
        limits.admit("SHA256:k", "192.0.2.1")
        limits.admit("SHA256:k", "192.0.2.2")
        with self.assertRaises(TooManyConnections) as cm:
            limits.admit("SHA256:k", "192.0.2.3")
        self.assertEqual(
            cm.exception.message,
            "too many connections with this key (at most 2); close one and try again",
        )
        limits.admit("SHA256:other", "192.0.2.3")
        limits.release("SHA256:k", "192.0.2.1")
        limits.admit("SHA256:k", "192.0.2.3")

    def test_per_source_ipv6_prefix(self) -> None:
        """One IPv6 /64 counts as one source, as for the penalties."""
        limits = ConnectionLimits(per_key=0, per_source=2)
        limits.admit("a", "2001:db8::1")
        limits.admit("b", "2001:db8::2")
        with self.assertRaises(TooManyConnections) as cm:
            limits.admit("c", "2001:db8::3")
        self.assertIn("from 2001:db8::/64 (at most 2)", cm.exception.message)
        limits.admit("c", "2001:db8:1::3")
        for name, peer in (("a", "2001:db8::1"), ("b", "2001:db8::2"), ("c", "2001:db8:1::3")):
            limits.release(name, peer)
        self.assertEqual((limits.by_key, limits.by_source), ({}, {}))

    def test_refusal_is_not_an_auth_failure(self) -> None:
        """Over the cap the client is disconnected (12) and the source gets only the small
        no-login penalty, not the one for failed authentication."""
        self.assertEqual(TooManyConnections.disconnectCode, 12)
        self.assertEqual(TooManyConnections.penaltyKind, "noauth")


class ConfigTests(unittest.TestCase):
    """The new keys: sizes with suffixes, 0 for no limit, clear errors."""

    def load(self, text: str) -> Any:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("[server]\n" + text + "\n")
        return configmod.load(path)

    def test_defaults(self) -> None:
        """Defaults: 64 MiB per connection, 1 GiB in all, 1024 per key and per source."""
        cfg = self.load("")
        self.assertEqual(
            (
                cfg.memory_per_connection,
                cfg.memory_total,
                cfg.max_connections_per_key,
                cfg.max_connections_per_source,
            ),
            (64 * MiB, 1024 * MiB, 1024, 1024),
        )

    def test_sizes(self) -> None:
        """K, M, G suffixes (KiB, MiB, GiB spellings too) and plain bytes."""
        cfg = self.load("memory_per_connection = 512K\nmemory_total = 2GiB")
        self.assertEqual((cfg.memory_per_connection, cfg.memory_total), (512 * 1024, 2 << 30))
        self.assertEqual(self.load("memory_total = 0").memory_total, 0)

    def test_bad_values(self) -> None:
        """A bad size stops start-up with one line naming the key and what is expected."""
        for text, expected in (
            ("memory_total = lots", "expected a size such as 64M, 1G or 65536 (0: no limit)"),
            ("memory_per_connection = 100", "expected 0 (no limit) or a size from 64K"),
            ("max_connections_per_key = -1", "expected a number from 0 to 1000000"),
        ):
            with self.assertRaises(configmod.ConfigError) as cm:
                self.load(text)
            self.assertIn(expected, str(cm.exception))
            self.assertIn(text.split(" =")[0], str(cm.exception))


# ---------------------------------------------------------------------------
# attacks against the running server
# ---------------------------------------------------------------------------


class Pipe(channel.SSHChannel):
    """A well-behaved direct-tcpip channel on the attacker's own connection (Conch keeps
    its windows): it reads everything, so it must keep moving however full the budget."""

    name = b"direct-tcpip"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.got = bytearray()
        self.opened: defer.Deferred[Pipe] = defer.Deferred()

    def channelOpen(self, specificData: bytes) -> None:
        self.opened.callback(self)

    def openFailed(self, reason: Any) -> None:
        self.opened.errback(reason)

    def dataReceived(self, data: bytes) -> None:
        self.got += data


class BudgetAttackTests(ThreatMixin, unittest.TestCase):
    """Many circuits whose far end never reads; many logins by one key or one address."""

    timeout = 240

    @defer.inlineCallbacks
    def sink(self, port: int = 80) -> Any:
        """A hostile initiator that accepts every circuit with window 0 and never reads."""
        init = yield self.authed('access="initiate"', name="sink")
        num, _ = yield init.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", port))
        self.assertEqual(num, 81)
        listener = next(x for x in self.registry.listeners() if x.hostname == "sink")
        return init, listener.connect_name.encode()

    @defer.inlineCallbacks
    def fill(self, client: Any, init: Any, name: bytes, port: int, ids: Any) -> Any:
        """Open one circuit to the sink and send all the window it is given; returns the
        window, or the open-failure payload when refused."""
        sender = next(ids)
        opened = client.conn.openRaw(b"direct-tcpip", direct_tcpip(name, port), sender=sender)
        yield self.waitFor(
            lambda: opened.called or any(n == 90 for n, _ in init.inbox.messages),
            10,
            "the open to reach the initiator or be refused",
        )
        if opened.called:  # refused before the initiator was asked
            num, payload = yield opened
            return payload
        num, openPayload = yield init.inbox.expect(90)
        ctype, rest = common.getNS(openPayload)
        theirId = struct.unpack(">L", rest[:4])[0]
        init.sendPacket(91, struct.pack(">4L", theirId, sender, 0, 32768))
        num, payload = yield opened
        if num != 91:
            return payload
        remote, window = struct.unpack(">4L", payload[:16])[1:3]
        server = self.serverTransport(client).service
        before = sum(ch.bytesIn for ch in server.channels.values())
        chunk = b"x" * 32768
        for offset in range(0, window, 32768):
            client.sendPacket(94, struct.pack(">L", remote) + NS(chunk[: window - offset]))
        yield self.waitFor(
            lambda: sum(ch.bytesIn for ch in server.channels.values()) >= before + window,
            30,
            "the server to take the window",
        )
        return window

    @defer.inlineCallbacks
    def test_nonreading_circuits_bounded_per_connection(self) -> Any:
        """64 circuits filled toward an initiator that never reads: the server holds about
        memory_per_connection (8 MiB) plus one packet per circuit, not 64 windows (128 MiB);
        a circuit on the same connection whose far end reads still moves 4 MiB."""
        yield self.stopServer()
        self.startServer(memory_per_connection="8M")
        self.legit = self.key("legit2", options='access="listen",access="initiate"')
        _, echo = yield self.echoInitiator("dev", 7100, b"DEV:")
        init, name = yield self.sink()
        client = yield self.authed('access="listen"', name="filler")
        ids = itertools.count(1)
        rss0 = rss_kib()
        windows = []
        for _ in range(64):
            window = yield self.fill(client, init, name, 80, ids)
            windows.append(window)
        held = server_buffered(self.factory)
        grown = rss_kib() - rss0
        figure("B10.circuits", len(windows))
        figure("B10.windows_total_bytes", sum(windows))
        figure("B10.server_buffered_bytes", held)
        figure("B10.rss_growth_kib", grown)
        self.assertGreaterEqual(held, sum(windows) - 64 * 32768)  # all of it is held: an attack
        self.assertLessEqual(held, 8 * MiB + 64 * FLOOR)
        self.assertLess(grown, 48 * 1024, "RSS grew by more than 48 MiB")
        # A circuit whose far end reads, on the attacker's own (over-budget) connection.
        pipe = Pipe(conn=client.conn)
        client.conn.openChannel(pipe, direct_tcpip(echo.connect_name.encode(), 7100))
        yield pipe.opened
        payload = os.urandom(4 * MiB)
        pipe.write(payload)
        yield self.waitFor(lambda: len(pipe.got) >= 4 + len(payload), 60, "the echo")
        self.assertEqual(bytes(pipe.got), b"DEV:" + payload)
        serverEnd = [
            ch
            for ch in self.serverTransport(client).service.channels.values()
            if ch.peer is not None and ch.peer.conn is echo.opener.conn
        ][0]
        self.assertLess(serverEnd.allotment, self.config.channel_window)
        # One line for each connection over its budget: the filler, and the sink (its
        # circuit ends are charged to it too).
        budgetLines = [x for x in self.logs.lines() if "memory budget" in x]
        self.assertEqual(len(budgetLines), 2, budgetLines)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_server_budget_refuses_new_circuits(self) -> Any:
        """Once the server-wide budget is spent by non-reading circuits, new circuits are
        refused with a sentence the client sees; circuits already flowing keep flowing,
        and service returns when the hog leaves."""
        yield self.stopServer()
        self.startServer(memory_total="24M", memory_per_connection="0")
        self.legit = self.key("legit3", options='access="listen",access="initiate"')
        _, echo = yield self.echoInitiator("dev", 7100, b"DEV:")
        friend = yield self.authed('access="listen"', name="friend")
        pipe = Pipe(conn=friend.conn)
        friend.conn.openChannel(pipe, direct_tcpip(echo.connect_name.encode(), 7100))
        yield pipe.opened
        init, name = yield self.sink()
        client = yield self.authed('access="listen"', name="hog")
        ids = itertools.count(1)
        refused = None
        opened = 0
        for _ in range(200):
            result = yield self.fill(client, init, name, 80, ids)
            if isinstance(result, bytes):
                refused = result
                break
            opened += 1
        figure("B10.global_circuits_before_refusal", opened)
        figure("B10.global_server_buffered_bytes", server_buffered(self.factory))
        self.assertIsNotNone(refused, "never refused")
        self.assertEqual(open_failure_code(refused), OPEN_RESOURCE_SHORTAGE)
        self.assertIn(b"short of memory for new circuits", refused)
        self.assertLessEqual(self.factory.budget.total, 24 * MiB + 2 * FLOOR)
        self.assertLessEqual(server_buffered(self.factory), 24 * MiB + 2 * FLOOR)
        out, err, code = yield self.ssh(self.legit, "legit3", "-W", f"{echo.connect_name}:7100")
        self.assertEqual(code, 255)
        self.assertIn(b"short of memory for new circuits", err)
        payload = os.urandom(2 * MiB)
        pipe.write(payload)
        yield self.waitFor(lambda: len(pipe.got) >= 4 + len(payload), 60, "the echo")
        self.assertEqual(bytes(pipe.got), b"DEV:" + payload)
        client.close()
        yield client.waitLost()
        yield self.waitFor(lambda: self.factory.budget.refusal() is None, 10, "budget freed")
        out, err, code = yield self.ssh(
            self.legit, "legit3", "-W", f"{echo.connect_name}:7100", stdin=b"hi"
        )
        self.assertEqual(out, b"DEV:hi", err)
        refusals = [x for x in self.logs.lines() if "refusing new circuits" in x]
        self.assertEqual(len(refusals), 1, refusals)
        again = [x for x in self.logs.lines() if "accepting new circuits again" in x]
        self.assertEqual(len(again), 1, again)

    @defer.inlineCallbacks
    def test_connections_per_key(self) -> Any:
        """With max_connections_per_key = 3, a fourth login with the key is refused with a
        sentence OpenSSH shows; one log line; a login works again once one leaves."""
        yield self.stopServer()
        self.startServer(max_connections_per_key="3")
        key = self.key("many", options='access="listen"')
        held = []
        for _ in range(3):
            c = yield self.client(key, b"many")
            self.assertTrue(c.authenticated, c.banner)
            held.append(c)
        before = len(self.logs.lines())
        out, err, code = yield self.ssh(key, "many", command=("whoami",))
        figure("B10.per_key_admitted", len(held))
        self.assertEqual(code, 255)
        self.assertIn(
            b"too many connections with this key (at most 3); close one and try again", err
        )
        extra = yield self.client(key, b"many")
        self.assertFalse(extra.authenticated)
        self.assertEqual(extra.disconnect[0], budgetmod.DISCONNECT_TOO_MANY_CONNECTIONS)
        lines = self.logs.lines()[before:]
        refusals = [x for x in lines if "max connections per key" in x]
        self.assertEqual(len(refusals), 2, lines)  # one per refused connection
        self.assertEqual(len([x for x in lines if "Traceback" in x]), 0)
        held[0].close()
        yield held[0].waitLost()
        yield self.waitFor(
            lambda: sum(self.factory.connectionLimits.by_key.values()) == 2, 10, "logout"
        )
        out, err, code = yield self.ssh(key, "many", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: many", out)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    @defer.inlineCallbacks
    def test_connections_per_source(self) -> Any:
        """With max_connections_per_source = 2, a third login from 127.0.0.1 (even with a
        new key) is refused; another address still gets in."""
        yield self.stopServer()
        self.startServer(max_connections_per_source="2")
        for i in range(2):
            c = yield self.authed('access="listen"', name=f"src{i}")
        third = self.key("src2")  # a brand-new key: trust on first use is no way around
        out, err, code = yield self.ssh(third, "src2", command=("whoami",))
        self.assertEqual(code, 255)
        self.assertIn(b"too many connections from 127.0.0.1 (at most 2)", err)
        other = yield self.client(third, b"src2", bind="127.0.0.2")
        self.assertTrue(other.authenticated, other.banner)
        self.assertEqual(self.factory.connectionLimits.by_source, {"127.0.0.1": 2, "127.0.0.2": 1})
        del c
