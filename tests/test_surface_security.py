"""Issue 9, points 2, 5, 6, 10 and 11: each test performs the review's attack.

- 9.2: zero-window greeting sessions plus a tcpip-forward/cancel loop (Conch client
  from ``tests.rawssh``): greeting sessions are capped per connection, forward
  requests are rate-limited, pending output is bounded, the event log stays small.
- 9.5: a direct-tcpip name with CR, LF and ESC cannot forge a log line.
- 9.6: the status page and its JSON API refuse a foreign Host header (DNS rebinding).
- 9.10: loose host key / secret modes are refused; a crash mid-write leaves no key.
- 9.11: circuit opens to unknown names are penalised like failed logins.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.internet import defer
from twisted.trial import unittest

from nuttconch import avatar as avatarmod
from nuttconch import events, hostkeys, session, web

from .rawssh import NS, connect_client, connect_raw, direct_tcpip, open_failure_code
from .test_ops import OpsTestMixin
from .test_threats import ThreatMixin

MSG_CHANNEL_REQUEST = 98
MSG_CHANNEL_CLOSE = 97
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _forward(port: int) -> bytes:
    return NS(b"") + struct.pack(">L", port)


class AmplificationTests(ThreatMixin, unittest.TestCase):
    """9.2: what one first-use key can make the server hold and do."""

    @defer.inlineCallbacks
    def greetingSessions(self, c: Any, count: int) -> Any:
        """Open ``count`` zero-window sessions and ask each for a shell; return their ids."""
        senders = []
        for _ in range(count):
            num, payload = yield c.conn.openRaw(b"session", window=0)
            self.assertEqual(num, 91)
            sender, remote = struct.unpack(">2L", payload[:8])
            c.sendPacket(MSG_CHANNEL_REQUEST, struct.pack(">L", remote) + NS(b"shell") + b"\x01")
            num, _ = yield c.inbox.expect((99, 100), channel=sender)
            self.assertEqual(num, 99)
            senders.append(sender)
        return senders

    @defer.inlineCallbacks
    def firstUse(self, name: str) -> Any:
        """Log in with a key the server has never seen: trusted on first use."""
        c = yield self.client(self.key(name), name.encode())
        self.assertTrue(c.authenticated, c.banner)
        self.assertTrue(self.serverAvatar(name).identity.new_key)
        return c

    def serverAvatar(self, name: str) -> Any:
        return next(a for a in self.factory.avatars if a.identity.hostname == name)

    @defer.inlineCallbacks
    def test_9_2_greeting_cap_and_forward_rate(self) -> Any:
        """40 zero-window shells: past the cap they exit 1; a 200-cycle forward loop is
        mostly refused, with few log lines and events; the connection and server survive."""
        seen: list[str] = []
        self.factory.observers.append(lambda event, fields: seen.append(event))
        c = yield self.firstUse("amp")
        senders = yield self.greetingSessions(c, 40)
        cap = session.MAX_GREETING_SESSIONS
        for sender in senders[cap:]:
            num, payload = yield c.inbox.expect(MSG_CHANNEL_REQUEST, channel=sender)
            rest = payload[4:]
            self.assertTrue(rest.startswith(NS(b"exit-status")), rest[:40])
            self.assertEqual(struct.unpack(">L", rest[-4:])[0], 1)
        av = self.serverAvatar("amp")
        self.assertEqual(len(av.sessions), cap)
        granted = refused = 0
        started = time.monotonic()
        for _ in range(200):
            num, _ = yield c.conn.globalRequest(b"tcpip-forward", _forward(7000))
            if num != 81:
                refused += 1
                continue
            granted += 1
            num, _ = yield c.conn.globalRequest(b"cancel-tcpip-forward", _forward(7000))
        elapsed = time.monotonic() - started
        budget = max(avatarmod.FORWARD_BURST, self.config.max_forwards)
        allowed = budget / 2 + elapsed * avatarmod.FORWARD_RATE + 1
        self.assertGreaterEqual(granted, budget // 2)  # ssh -R ... -R ...: the burst is there
        self.assertLessEqual(granted, allowed)
        self.assertGreaterEqual(refused, 200 - allowed)
        self.assertFalse(c.isLost)
        # Each greeting session was told of at most the granted ports.
        for handler in av.sessions:
            self.assertLess(len(handler.proto.session.buf), 2000 + granted * 200)
        refusals = [x for x in self.logs.lines() if "forward refused for amp" in x]
        self.assertLessEqual(len(refusals), avatarmod.MAX_REFUSALS_LOGGED)
        self.assertIn("further refusals on this connection are not logged", refusals[-1])
        self.assertLessEqual(seen.count("initiator.up"), granted)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_9_2_pending_output_bounded(self) -> Any:
        """With the rate limit lifted, a forward loop against zero-window greetings closes
        each session once MAX_PENDING_OUTPUT bytes are queued, instead of growing it."""
        self.patch(avatarmod, "FORWARD_BURST", 10**6)
        c = yield self.firstUse("amp")
        senders = yield self.greetingSessions(c, 4)
        av = self.serverAvatar("amp")
        channels = [h.proto.session for h in av.sessions]
        closed = [c.inbox.expect(MSG_CHANNEL_CLOSE, channel=s, timeout=60) for s in senders]
        for _ in range(1200):
            num, _ = yield c.conn.globalRequest(b"tcpip-forward", _forward(7000))
            self.assertEqual(num, 81)
            yield c.conn.globalRequest(b"cancel-tcpip-forward", _forward(7000))
            for ch in channels:
                self.assertLessEqual(len(ch.buf), session.MAX_PENDING_OUTPUT)
            if all(d.called for d in closed):
                break
        yield defer.gatherResults(closed)
        self.assertTrue(all(ch.buf == b"" for ch in channels))
        lines = [x for x in self.logs.lines() if "session channel closed" in x]
        self.assertEqual(len(lines), 4, lines)
        self.assertFalse(c.isLost)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_9_2_event_log_bounded(self) -> Any:
        """Holding one port and cycling 200 others keeps the event log's per-initiator
        state at MAX_PORTS_LISTED ports and its "down" line short."""
        self.patch(avatarmod, "FORWARD_BURST", 10**6)
        observer = events.attach(self.factory)
        c = yield self.firstUse("amp")
        num, _ = yield c.conn.globalRequest(b"tcpip-forward", _forward(6999))
        self.assertEqual(num, 81)
        for port in range(7000, 7200):
            yield c.conn.globalRequest(b"tcpip-forward", _forward(port))
            yield c.conn.globalRequest(b"cancel-tcpip-forward", _forward(port))
        name = self.registry.listeners()[0].connect_name
        self.assertEqual(len(observer.released[name]), events.MAX_PORTS_LISTED)
        c.close()
        yield c.waitLost()
        yield self.waitFor(lambda: not self.registry.listeners())
        down = [x for x in self.logs.lines() if f"initiator {name} down" in x]
        self.assertEqual(len(down), 1)
        self.assertIn(f"and {201 - events.MAX_PORTS_LISTED} more released", down[0])
        self.assertLess(len(down[0]), 1000)


class LogInjectionTests(ThreatMixin, unittest.TestCase):
    """9.5: the name in a direct-tcpip request cannot forge a log line."""

    @defer.inlineCallbacks
    def test_9_5_direct_tcpip_name_is_escaped(self) -> Any:
        """CR, LF and ESC in an unknown name show as escapes in the log and the refusal."""
        forged = "2026-01-01T00:00:00+0000 [nuttconch.auth#info] FORGED admin login"
        host = f"nope\r\n{forged}\x1b[2J".encode()
        c = yield self.authed()
        num, payload = yield c.conn.openRaw(b"direct-tcpip", direct_tcpip(host, 22))
        self.assertEqual(num, 92)
        lines = self.logs.lines()
        # No line (Twisted indents continuation lines with a tab) starts with the forgery.
        self.assertFalse([x for x in lines if x.strip().startswith("2026-01-01")], lines)
        hits = [x for x in lines if "forged" in x.lower()]
        self.assertTrue(hits)
        for line in hits:
            self.assertNotIn("\x1b", line)
            self.assertEqual(line.lower().count("nope\\r\\n2026"), 2, line)
        message = payload[8:]
        self.assertNotIn(b"\n", message)
        self.assertNotIn(b"\x1b", message)
        yield self.assertServing()


class EnumerationTests(ThreatMixin, unittest.TestCase):
    """9.11: guessing names costs the guesser, per connection and per source."""

    @defer.inlineCallbacks
    def test_9_11_misses_disconnect_and_penalise(self) -> Any:
        """A few misses are fine; a guessing loop from 127.0.0.2 is disconnected with a
        reason, the source is refused, and 127.0.0.1 still gets in."""
        c = yield self.authed()
        for i in range(3):
            num, payload = yield c.conn.openRaw(b"direct-tcpip", direct_tcpip(b"typo%d" % i, 22))
            self.assertEqual((num, open_failure_code(payload)), (92, 2))
        self.assertFalse(c.isLost)
        guesser = self.key("guesser", options='access="listen"')
        g = yield self.client(guesser, b"guesser", bind="127.0.0.2")
        self.assertTrue(g.authenticated, g.banner)
        answered = 0
        for i in range(40):
            if g.isLost:
                break
            d = g.conn.openRaw(b"direct-tcpip", direct_tcpip(b"dev-%07d" % i, 22))
            try:
                yield d
            except Exception:
                break
            answered += 1
        yield g.waitLost()
        self.assertLessEqual(answered, avatarmod.MISS_BURST + 1)
        self.assertEqual(g.disconnect[1], b"too many circuit opens to unknown names")
        self.assertTrue(self.factory.penalties.refused("127.0.0.2"))
        r = yield connect_raw(self.port, "127.0.0.2")
        self.addCleanup(r.abort)
        lifetime = yield r.waitClosed(5)
        self.assertLess(lifetime, 2)
        self.assertNotIn(b"SSH-2.0", bytes(r.received))
        closing = [x for x in self.logs.lines() if "closing guesser" in x]
        self.assertEqual(len(closing), 1)
        self.assertFalse(c.isLost)
        yield self.assertServing()


class StatusPageHostTests(OpsTestMixin, unittest.TestCase):
    """9.6: DNS rebinding: a foreign Host header gets nothing."""

    @defer.inlineCallbacks
    def registerInitiator(self) -> Any:
        key = self.key("dev", options='access="initiate"')
        c = yield connect_client(self.port, key=key, user=b"dev")
        self.addCleanup(c.close)
        num, _ = yield c.conn.globalRequest(b"tcpip-forward", _forward(22))
        self.assertEqual(num, 81)
        return self.registry.listeners()[0]

    @defer.inlineCallbacks
    def test_9_6_foreign_host_refused(self) -> Any:
        """Host: evil.example gets 421 and no data on every path; loopback names get 200."""
        listener = yield self.registerInitiator()
        for path in ("/api/listeners", "/api/circuits", "/", "/metrics", "/status.js"):
            response, body = yield self.get(path, headers={"Host": "evil.example:80"})
            self.assertEqual(response.code, 421, path)
            self.assertNotIn(listener.fingerprint.encode(), body)
            self.assertIn(b"allowed_hosts", body)
        port = self.http.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            response, body = yield self.get("/api/listeners", headers={"Host": host})
            self.assertEqual(response.code, 200, host)
            self.assertIn(listener.fingerprint.encode(), body)

    def test_9_6_tcp6_listener_warned(self) -> None:
        """tcp6: and tcp: endpoints on every address are flagged; loopback ones are not."""
        self.assertTrue(web.listens_everywhere("tcp6:9100"))
        self.assertTrue(web.listens_everywhere("tcp6:9100:interface=\\:\\:"))
        self.assertTrue(web.listens_everywhere("tcp:9100:interface=0.0.0.0"))
        self.assertFalse(web.listens_everywhere("tcp6:9100:interface=\\:\\:1"))
        self.assertFalse(web.listens_everywhere("tcp:9100:interface=127.0.0.1"))


class StatusPageAllowedHostsTests(OpsTestMixin, unittest.TestCase):
    """9.6: ``[metrics] allowed_hosts`` names the operator's own host name."""

    extraOps = {"metrics": {"allowed_hosts": "Status.Example.org, 192.0.2.7"}}

    @defer.inlineCallbacks
    def test_9_6_configured_names_served(self) -> Any:
        """Configured names (any case, with a port) are served; others still get 421."""
        for host, code in (
            ("status.example.org:9100", 200),
            ("STATUS.EXAMPLE.ORG", 200),
            ("192.0.2.7:9100", 200),
            ("status.example.org.evil.example", 421),
            ("192.0.2.8", 421),
        ):
            response, _ = yield self.get("/api/listeners", headers={"Host": host})
            self.assertEqual(response.code, code, host)


class KeyFileTests(unittest.TestCase):
    """9.10: host keys and the alias secret: modes checked, written atomically."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_9_10_loose_modes_refused(self) -> None:
        """A host key or secret readable by group or others is refused, naming the file."""
        path = os.path.join(self.dir, "ssh_host_ed25519_key")
        hostkeys.load_or_create(path, "ed25519")
        os.chmod(path, 0o644)
        exc = self.assertRaises(hostkeys.HostKeyError, hostkeys.load_or_create, path, "ed25519")
        self.assertIn(path, str(exc))
        self.assertIn("0644", str(exc))
        os.chmod(path, 0o600)
        hostkeys.load_or_create(path, "ed25519")
        hostkeys.load_or_create_secret(self.dir)
        secret = os.path.join(self.dir, hostkeys.SECRET_NAME)
        os.chmod(secret, 0o640)
        exc = self.assertRaises(hostkeys.HostKeyError, hostkeys.load_or_create_secret, self.dir)
        self.assertIn(secret, str(exc))

    def test_9_10_loose_mode_stops_start_with_one_line(self) -> None:
        """python -m nuttconch with a 0644 host key exits with one line naming the file."""
        keydir = os.path.join(self.dir, "keys")
        os.makedirs(keydir)
        path = os.path.join(keydir, "ssh_host_ed25519_key")
        with open(path, "wb") as handle:
            handle.write(keys.Key(ed25519.Ed25519PrivateKey.generate()).toString("openssh"))
        os.chmod(path, 0o644)
        ini = os.path.join(self.dir, "nuttssh.ini")
        with open(ini, "w") as handle:
            handle.write(
                "[server]\nlisten_host = 127.0.0.1\nlisten_port = 0\n"
                f"[keys]\nhost_key_dir = {keydir}\nhost_key_ecdsa =\nhost_key_rsa =\n"
            )
        proc = subprocess.run(
            [sys.executable, "-m", "nuttconch", "--config", ini],
            cwd=self.dir,
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            timeout=120,
        )
        self.assertNotEqual(proc.returncode, 0)
        err = proc.stderr.decode()
        self.assertNotIn("Traceback", err + proc.stdout.decode())
        self.assertIn(f"{path}: host key is readable by group or others (mode 0644)", err)

    def test_9_10_crash_mid_write_leaves_no_partial_key(self) -> None:
        """A write that fails half way (disk full, crash) leaves no key file behind, so
        the next start generates a whole key instead of failing on a partial one."""
        path = os.path.join(self.dir, "ssh_host_ed25519_key")
        realWrite = os.write
        calls = []

        def halfThenFail(fd: int, data: Any) -> int:
            if len(data) > 100 and not calls:
                calls.append(fd)
                realWrite(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return realWrite(fd, data)

        self.patch(os, "write", halfThenFail)
        self.assertRaises(OSError, hostkeys.load_or_create, path, "ed25519")
        self.assertFalse(os.path.exists(path))
        self.assertEqual([n for n in os.listdir(self.dir) if "ssh_host" in n], [])
        key = hostkeys.load_or_create(path, "ed25519")
        self.assertFalse(key.isPublic())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(keys.Key.fromFile(path).public(), key.public())
        # A key truncated by an older version's crash: one error naming it, no traceback.
        with open(path, "rb") as handle:
            whole = handle.read()
        with open(path, "wb") as handle:
            handle.write(whole[: len(whole) // 2])
        exc = self.assertRaises(hostkeys.HostKeyError, hostkeys.load_or_create, path, "ed25519")
        self.assertIn(path, str(exc))
        with open(path, "wb") as handle:
            handle.write(whole)
        # A .pub lost in a crash is written again at the next start.
        os.unlink(path + ".pub")
        hostkeys.load_or_create(path, "ed25519")
        self.assertEqual(keys.Key.fromFile(path + ".pub"), key.public())
