"""Attacks on authentication and authorized_keys from the security review (issue 9).

Each test performs the attack with a crafted client (tests/rawssh.py) or the
real ``ssh`` against a running server, and asserts on what the attacker and
the operator see: whether the login succeeds, the refusal text, the file.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa
from twisted.conch.ssh import keys
from twisted.internet import defer
from twisted.trial import unittest

from nuttconch import authkeys

from .harness import SwitchboardTestMixin
from .rawssh import NS, connect_client
from .test_threats import LogCapture

MSG_USERAUTH_REQUEST = 50
MSG_USERAUTH_FAILURE = 51
MSG_USERAUTH_SUCCESS = 52
MSG_USERAUTH_PK_OK = 60


def signed_request(
    sessionID: bytes,
    user: bytes,
    key: keys.Key,
    *,
    blob: bytes | None = None,
    alg: bytes | None = None,
    sig_alg: bytes | None = None,
) -> bytes:
    """A signed publickey USERAUTH_REQUEST payload in which the attacker picks the blob
    sent (``blob``), the algorithm announced (``alg``) and the one used to sign (``sig_alg``)."""
    blob = key.public().blob() if blob is None else blob
    alg = key.sshType() if alg is None else alg
    body = NS(user) + NS(b"ssh-connection") + NS(b"publickey") + b"\x01" + NS(alg) + NS(blob)
    sigData = NS(sessionID) + bytes([MSG_USERAUTH_REQUEST]) + body
    signature = key.sign(sigData, signatureType=sig_alg) if sig_alg else key.sign(sigData)
    return body + NS(signature)


def _mpint_with_leading_zero(blob: bytes, index: int) -> bytes:
    """Re-encode wire string ``index`` of ``blob`` with one more leading zero byte."""
    parts = []
    rest = blob
    while rest:
        (n,) = struct.unpack(">L", rest[:4])
        parts.append(rest[4 : 4 + n])
        rest = rest[4 + n :]
    parts[index] = b"\0" + parts[index]
    return b"".join(NS(p) for p in parts)


def altered_blobs(key: keys.Key) -> dict[str, bytes]:
    """Blobs Conch parses as ``key`` although they are not its canonical blob."""
    blob = key.public().blob()
    variants = {"trailing bytes": blob + b"\0\0\0\0", "trailing string": blob + NS(b"x")}
    if key.type() == "RSA":
        variants["RSA e with a leading zero"] = _mpint_with_leading_zero(blob, 1)
        variants["RSA n with a leading zero"] = _mpint_with_leading_zero(blob, 2)
    if key.type() == "EC":
        point = key._keyObject.public_key().public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        variants["compressed ECDSA point"] = NS(key.sshType()) + NS(b"nistp256") + NS(point)
    for name, variant in variants.items():
        assert variant != blob
        assert keys.Key.fromString(variant, type="blob").blob() == blob, name
    return variants


class AuthAttackTests(SwitchboardTestMixin, unittest.TestCase):
    """Issue 9, points 1 and 9: altered key blobs and signature algorithm games."""

    def setUp(self) -> Any:
        result = super().setUp()
        self.logs = LogCapture().start(self)
        return result

    def readKeys(self) -> bytes:
        with open(self.akfile, "rb") as handle:
            return handle.read()

    @defer.inlineCallbacks
    def attempt(self, user: bytes, request_for: Any) -> Any:
        """Send one signed request built by ``request_for(sessionID)``; the reply and banner."""
        c = yield connect_client(self.port, stage="userauth", user=user)
        self.addCleanup(c.close)
        c.sendPacket(MSG_USERAUTH_REQUEST, request_for(c.sessionID))
        num, payload = yield c.inbox.expect(
            (MSG_USERAUTH_FAILURE, MSG_USERAUTH_SUCCESS), timeout=10
        )
        banners = b"".join(p for n, p in c.inbox.messages if n == 53)
        c.close()
        return num, banners

    @defer.inlineCallbacks
    def test_9_1_from_bypass_with_altered_blob(self) -> Any:
        """9.1: a key whose line says from="10.0.0.0/8" (admin included) sends its blob with
        trailing bytes, leading zeros or a compressed point from 127.0.0.1: refused, and the
        file is left alone; the canonical blob is refused by from= as before."""
        options = 'from="10.0.0.0/8",access="admin",access="listen",access="initiate"'
        for kind in ("ed25519", "ecdsa", "rsa"):
            path = self.key(f"remote-{kind}", kind, options=options)
            key = keys.Key.fromFile(path)
            before = self.readKeys()
            alg = b"rsa-sha2-256" if kind == "rsa" else None
            num, banner = yield self.attempt(
                b"mallory",
                lambda s, k=key, a=alg: signed_request(s, b"mallory", k, alg=a, sig_alg=a),
            )
            self.assertEqual(num, MSG_USERAUTH_FAILURE)
            self.assertIn(b"not allowed from 127.0.0.1", banner)
            for name, blob in altered_blobs(key).items():
                num, banner = yield self.attempt(
                    b"mallory",
                    lambda s, k=key, b=blob, a=alg: signed_request(
                        s, b"mallory", k, blob=b, alg=a, sig_alg=a
                    ),
                )
                self.assertEqual(num, MSG_USERAUTH_FAILURE, f"{kind}: {name} logged in")
                self.assertIn(b"not in its canonical form", banner, name)
                self.assertEqual(self.readKeys(), before, name)
        self.assertEqual(self.factory.portal.realm.avatars, 0)
        self.assertIn("login refused for mallory: bad key", self.logs.out.getvalue())

    @defer.inlineCallbacks
    def test_9_9_sha1_signature_under_sha2_name(self) -> Any:
        """9.9: the request announces rsa-sha2-256/512 but the signature inside is ssh-rsa
        (SHA-1): refused; an honest rsa-sha2-256 signature logs in."""
        path = self.key("rsa-user", "rsa", options='access="listen"')
        key = keys.Key.fromFile(path)
        for announced in (b"rsa-sha2-256", b"rsa-sha2-512"):
            num, banner = yield self.attempt(
                b"rsa-user",
                lambda s, a=announced: signed_request(
                    s, b"rsa-user", key, alg=a, sig_alg=b"ssh-rsa"
                ),
            )
            self.assertEqual(num, MSG_USERAUTH_FAILURE, announced)
            self.assertIn(b"signature algorithm", banner)
        num, banner = yield self.attempt(
            b"rsa-user",
            lambda s: signed_request(
                s, b"rsa-user", key, alg=b"rsa-sha2-512", sig_alg=b"rsa-sha2-256"
            ),
        )
        self.assertEqual(num, MSG_USERAUTH_FAILURE)
        num, banner = yield self.attempt(
            b"rsa-user",
            lambda s: signed_request(
                s, b"rsa-user", key, alg=b"rsa-sha2-256", sig_alg=b"rsa-sha2-256"
            ),
        )
        self.assertEqual(num, MSG_USERAUTH_SUCCESS, banner)

    @defer.inlineCallbacks
    def test_9_9_dsa_not_trusted_on_first_use(self) -> Any:
        """9.9: a DSA key (SHA-1, 1024 bits) is refused with a clear message and never written
        to authorized_keys."""
        key = keys.Key(dsa.generate_private_key(1024))
        before = self.readKeys()
        num, banner = yield self.attempt(b"olddsa", lambda s: signed_request(s, b"olddsa", key))
        self.assertEqual(num, MSG_USERAUTH_FAILURE)
        self.assertIn(b"DSA keys are not accepted", banner)
        self.assertEqual(self.readKeys(), before)
        self.assertEqual(self.factory.portal.realm.avatars, 0)


class BomTests(SwitchboardTestMixin, unittest.TestCase):
    """Issue 9 point 8: authorized_keys saved with a UTF-8 BOM in front of line 1."""

    def setUp(self) -> Any:
        result = super().setUp()
        self.dev = self.key("dev")
        with open(self.dev + ".pub") as handle:
            self.devPublic = " ".join(handle.read().split()[:2])
        self.fp = authkeys.fingerprint_of(keys.Key.fromFile(self.dev).public().blob())
        with open(self.akfile, "wb") as handle:
            handle.write(b"\xef\xbb\xbf" + f'access="initiate" {self.devPublic} dev\n'.encode())
        self.root = self.key("root", options='access="admin"')
        return result

    def devLines(self) -> tuple[bytes, list[authkeys.AuthorizedKey]]:
        with open(self.akfile, "rb") as handle:
            data = handle.read()
        entries, _ = authkeys.parse_text(data.decode("utf-8"))
        return data, [e for e in entries if e.fingerprint == self.fp]

    @defer.inlineCallbacks
    def test_9_8_ban_grant_revoke_find_line_one(self) -> Any:
        """ban, grant and revoke change the key on line 1 behind a BOM (it loses its access),
        and the BOM stays in front of the file."""
        out, err, code = yield self.ssh(self.dev, "dev", command=("whoami",))
        self.assertEqual(code, 0, err)
        out, err, code = yield self.ssh(self.root, "root", command=("ban", self.fp))
        self.assertEqual(code, 0, err)
        data, lines = self.devLines()
        self.assertTrue(data.startswith(b"\xef\xbb\xbf" + b'access="denied"'), data[:40])
        self.assertEqual([(e.lineno, e.access) for e in lines], [(1, frozenset({"denied"}))])
        out, err, code = yield self.ssh(self.dev, "dev", command=("whoami",))
        self.assertEqual(code, 255)
        self.assertIn(b"this key is denied", err)
        out, err, code = yield self.ssh(self.root, "root", command=("grant", self.fp, "list"))
        self.assertEqual(code, 0, err)
        data, lines = self.devLines()
        self.assertTrue(data.startswith(b"\xef\xbb\xbf"))
        self.assertEqual([(e.lineno, e.access) for e in lines], [(1, frozenset({"list"}))])
        out, err, code = yield self.ssh(self.root, "root", command=("revoke", self.fp))
        self.assertEqual(code, 0, err)
        data, lines = self.devLines()
        self.assertEqual(lines, [])
        self.assertTrue(data.startswith(b"\xef\xbb\xbf"))
        self.assertEqual(len(data.splitlines()), 1)


class _Credentials:
    """ISSHPrivateKey as Conch builds it for a signed request."""

    def __init__(self, key: keys.Key, user: bytes, peer: str) -> None:
        from nuttconch.auth import ConnectionInfo

        self.username = user
        self.algName = key.sshType()
        self.blob = key.public().blob()
        self.sigData = b"session data"
        self.signature = key.sign(self.sigData)
        self.connection = ConnectionInfo(peer)


class FirstUseRaceTests(unittest.TestCase):
    """Issue 9 points 1 and 4: the entry a first-use append finds gets the whole policy."""

    def setUp(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from nuttconch.auth import AuthorizedKeysChecker

        self.path = os.path.join(os.path.abspath(self.mktemp()))
        self.key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        self.public = self.key.public().toString("openssh").decode()
        self.keysFile = authkeys.AuthorizedKeysFile(self.path)
        self.keysFile.ensure_exists()
        self.checker = AuthorizedKeysChecker(self.keysFile, b"s" * 32)

    def lineAppearsAfterProbe(self, line: str) -> None:
        """The probe saw no line for the key; the line is written before the append runs."""
        realLookup = self.keysFile.lookup

        def lookup(blob: bytes, *args: Any, **kw: Any) -> Any:
            self.keysFile.lookup = realLookup  # type: ignore[method-assign]
            result = realLookup(blob, *args, **kw)
            with open(self.path, "a") as handle:
                handle.write(line + "\n")
            return result

        self.keysFile.lookup = lookup  # type: ignore[method-assign]

    @defer.inlineCallbacks
    def test_from_of_a_line_found_by_the_append(self) -> Any:
        """A from="10.0.0.0/8" line that the append finds refuses a login from 127.0.0.1."""
        from nuttconch.auth import Refused

        self.lineAppearsAfterProbe(f'from="10.0.0.0/8",access="admin" {self.public} ops')
        d = self.checker.requestAvatarId(_Credentials(self.key, b"m", "127.0.0.1"))
        failure = yield self.assertFailure(d, Refused)
        self.assertIn("not allowed from 127.0.0.1", failure.message)

    @defer.inlineCallbacks
    def test_denied_line_found_by_the_append(self) -> Any:
        """A ban written meanwhile (access="denied") refuses, whatever view the probe had."""
        from nuttconch.auth import Refused

        self.lineAppearsAfterProbe(f'access="denied" {self.public} banned')
        d = self.checker.requestAvatarId(_Credentials(self.key, b"m", "127.0.0.1"))
        failure = yield self.assertFailure(d, Refused)
        self.assertIn("denied", failure.message)

    @defer.inlineCallbacks
    def test_new_key_is_written_and_returned(self) -> Any:
        """Without a line, first use writes one and the identity comes from it."""
        identity = yield self.checker.requestAvatarId(_Credentials(self.key, b"m", "127.0.0.1"))
        self.assertTrue(identity.new_key)
        self.assertEqual(identity.access, frozenset(authkeys.TOFU_ACCESS))
        self.assertEqual(identity.lineno, 1)
        self.assertIsNotNone(self.keysFile.lookup(self.key.public().blob()))


class AliasWatchTests(SwitchboardTestMixin, unittest.TestCase):
    """Issue 9 point 7: the key watcher compares names as the login builds them."""

    def setUp(self) -> Any:
        result = super().setUp()
        self.logs = LogCapture().start(self)
        return result

    def publicOf(self, path: str) -> str:
        with open(path + ".pub") as handle:
            return " ".join(handle.read().split()[:2])

    @defer.inlineCallbacks
    def login(self, path: str, user: bytes) -> Any:
        c = yield connect_client(self.port, key=path, user=user)
        self.addCleanup(c.close)
        self.assertTrue(c.authenticated, c.banner)
        return c

    @defer.inlineCallbacks
    def test_9_7_stranger_does_not_kick_repeated_alias(self) -> Any:
        """A repeated alias and an alias equal to the generated one survive a stranger's
        first-use login; removing hostname= closes the connection whose names changed."""
        from nuttconch.names import generated_alias

        repeat = self.key("repeat", options='alias="prod",alias="prod",access="listen"')
        same = self.key("same")
        blob = keys.Key.fromFile(same).public().blob()
        mine = generated_alias(self.factory.checker.secret, blob, "same")
        self.addAuthorized(self.publicOf(same), f'alias="{mine}",access="listen"', "same")
        named = self.key("named", options='hostname="web",access="listen"')
        clients = [
            (yield self.login(repeat, b"repeat")),
            (yield self.login(same, b"same")),
            (yield self.login(named, b"named")),
        ]
        # A stranger's first use appends a line: a change the watcher reads.
        stranger = yield self.login(self.key("stranger"), b"stranger")
        stranger.close()
        self.factory.checkKeys()
        yield self.waitFor(lambda: "new key" in self.logs.out.getvalue(), what="first use")
        # Drop hostname= from the named key's line.
        with open(self.akfile) as handle:
            text = handle.read()
        with open(self.akfile + ".new", "w") as handle:
            handle.write(text.replace('hostname="web",', ""))
        os.replace(self.akfile + ".new", self.akfile)
        self.factory.checkKeys()
        yield clients[2].waitLost(10)
        self.assertIn(b"key's hostname changed", clients[2].disconnect[1])
        log = self.logs.out.getvalue()
        self.assertNotIn("aliases changed", log)
        self.assertFalse(clients[0].isLost)
        self.assertFalse(clients[1].isLost)


class LockRaceTests(SwitchboardTestMixin, unittest.TestCase):
    """Issue 9 point 4: a ban written while the file's lock is held is not ignored."""

    @defer.inlineCallbacks
    def login(self, path: str, user: bytes) -> Any:
        c = yield connect_client(self.port, key=path, user=user)
        c.close()
        return c

    def holdLock(self) -> int:
        """What a busy first-use appender does: hold the exclusive flock."""
        import fcntl

        fd = os.open(self.akfile, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.addCleanup(lambda: os.close(fd) if fd in self.held else None)
        self.held.add(fd)
        return fd

    def release(self, fd: int) -> None:
        self.held.discard(fd)
        os.close(fd)

    def banInPlace(self, path: str) -> None:
        """An editor rewrites the key's line in place (same size), without flock."""
        with open(self.akfile, "rb") as handle:
            data = handle.read()
        public = self.publicOf(path).encode()
        start = data.index(public)
        lineStart = data.rfind(b"\n", 0, start) + 1
        line = data[lineStart:start]
        self.assertEqual(line, b'access="listen" ')
        with open(self.akfile, "r+b") as handle:
            handle.seek(lineStart)
            handle.write(b'access="denied" ')

    def publicOf(self, path: str) -> str:
        with open(path + ".pub") as handle:
            return " ".join(handle.read().split()[:2])

    @defer.inlineCallbacks
    def test_9_4_ban_while_lock_held(self) -> Any:
        """The key is banned while an appender holds the lock: the login waits for the lock
        and is refused as denied, instead of using the old view with the old rights."""
        from twisted.internet import reactor

        self.held: set[int] = set()
        victim = self.key("victim", options='access="listen"')
        c = yield self.login(victim, b"victim")
        self.assertTrue(c.authenticated, c.banner)
        fd = self.holdLock()
        self.banInPlace(victim)
        reactor.callLater(0.5, self.release, fd)
        c = yield self.login(victim, b"victim")
        self.assertFalse(c.authenticated)
        self.assertIn(b"this key is denied", c.banner)

    @defer.inlineCallbacks
    def test_9_4_lock_held_too_long_fails_closed(self) -> Any:
        """A lock held past the wait refuses the login ("try again"), never the old view."""
        self.patch(authkeys, "LOGIN_LOCK_WAIT", 0.3)
        self.held = set()
        victim = self.key("victim", options='access="listen"')
        c = yield self.login(victim, b"victim")
        self.assertTrue(c.authenticated, c.banner)
        fd = self.holdLock()
        self.banInPlace(victim)
        c = yield self.login(victim, b"victim")
        self.release(fd)
        self.assertFalse(c.authenticated)
        self.assertIn(b"being changed; try again", c.banner)
        c = yield self.login(victim, b"victim")
        self.assertIn(b"this key is denied", c.banner)


class FirstUseLimitTests(SwitchboardTestMixin, unittest.TestCase):
    """Issue 9 point 3: first-use trust is rate-limited and capped."""

    def setUp(self) -> Any:
        result = super().setUp()
        self.logs = LogCapture().start(self)
        return result

    @defer.inlineCallbacks
    def restart(self, **overrides: str) -> Any:
        yield self.stopServer()
        self.startServer(**overrides)

    @defer.inlineCallbacks
    def newKeyLogin(self, name: str, bind: str | None = None) -> Any:
        c = yield connect_client(self.port, key=self.key(name), user=name.encode(), bind=bind)
        c.close()
        return c

    def lines(self) -> int:
        with open(self.akfile, "rb") as handle:
            return handle.read().count(b"\n")

    @defer.inlineCallbacks
    def test_9_3_per_source_and_overall_rates(self) -> Any:
        """A stranger making keys in a loop gets first_use_per_source of them per minute;
        other sources still get theirs, until the overall rate is spent."""
        yield self.restart(
            first_use_per_source="2",
            first_use_per_minute="3",
            per_source_penalty_exempt_list="127.0.0.0/8",
        )
        for i in range(2):
            c = yield self.newKeyLogin(f"a{i}")
            self.assertTrue(c.authenticated, c.banner)
        for i in range(2, 6):
            c = yield self.newKeyLogin(f"a{i}")
            self.assertFalse(c.authenticated)
            self.assertIn(b"too many new keys from your address", c.banner)
        self.assertEqual(self.lines(), 2)
        c = yield self.newKeyLogin("b0", bind="127.0.0.2")
        self.assertTrue(c.authenticated, c.banner)
        c = yield self.newKeyLogin("c0", bind="127.0.0.3")
        self.assertFalse(c.authenticated)
        self.assertIn(b"too many new keys are arriving", c.banner)
        self.assertEqual(self.lines(), 3)
        self.assertIn("first-use limit", self.logs.out.getvalue())

    @defer.inlineCallbacks
    def test_9_3_cap_on_first_use_lines(self) -> Any:
        """Past first_use_max_keys first-use lines, unknown keys are refused; known keys and
        keys an administrator adds still log in."""
        yield self.restart(first_use_max_keys="2")
        for i in range(2):
            c = yield self.newKeyLogin(f"n{i}")
            self.assertTrue(c.authenticated, c.banner)
        c = yield self.newKeyLogin("n2")
        self.assertFalse(c.authenticated)
        self.assertIn(b"trusts no more new keys", c.banner)
        self.assertEqual(self.lines(), 2)
        c = yield connect_client(self.port, key=os.path.join(self.dir, "n0"), user=b"n0")
        c.close()
        self.assertTrue(c.authenticated, c.banner)
        c = yield connect_client(
            self.port, key=self.key("ops", options='access="listen"'), user=b"ops"
        )
        c.close()
        self.assertTrue(c.authenticated, c.banner)


class ReactorParseTests(SwitchboardTestMixin, unittest.TestCase):
    """Issue 9 point 3: a big authorized_keys is never parsed on the reactor thread."""

    LINES = 3000

    @defer.inlineCallbacks
    def test_9_3_no_big_parse_on_reactor(self) -> Any:
        """First-use logins and the periodic check against a 3,000-line file: every parse of
        more than a few lines happens off the reactor thread, and appended lines are parsed
        alone."""
        import threading

        known = self.key("known")
        with open(known + ".pub") as handle:
            public = " ".join(handle.read().split()[:2])
        with open(self.akfile, "w") as handle:
            for i in range(self.LINES):
                handle.write(f'access="listen" {public} filler{i}\n')
        parsed: list[tuple[bool, int]] = []
        real = authkeys.parse_text

        def recording(text: str, *args: Any, **kw: Any) -> Any:
            onReactor = threading.current_thread() is threading.main_thread()
            parsed.append((onReactor, text.count("\n")))
            return real(text, *args, **kw)

        self.patch(authkeys, "parse_text", recording)
        self.factory.checkKeys()
        yield self.waitFor(lambda: parsed, what="the first load")
        for i in range(3):
            c = yield connect_client(self.port, key=self.key(f"new{i}"), user=b"new")
            c.close()
            self.assertTrue(c.authenticated, c.banner)
        c = yield connect_client(self.port, key=known, user=b"known")
        c.close()
        self.assertTrue(c.authenticated, c.banner)
        self.factory.checkKeys()
        big = [n for onReactor, n in parsed if n > 10]
        self.assertTrue(big, parsed)
        self.assertEqual([n for onReactor, n in parsed if onReactor and n > 10], [], parsed)
        # Each first-use line was parsed on its own after the first full load.
        self.assertEqual(len(big), 1, parsed)
        self.assertEqual(len(self.factory.keysFile.entries()), self.LINES + 3)


class TailParseTests(unittest.TestCase):
    """AuthorizedKeysFile parses only appended lines, with the right line numbers."""

    def test_append_parses_only_the_tail(self) -> None:
        """An append to a 500-line authorized_keys parses only the new lines; a bad new line
        holding a known key denies it; a rewrite is parsed whole."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        def public() -> str:
            return (
                keys.Key(ed25519.Ed25519PrivateKey.generate()).public().toString("openssh").decode()
            )

        path = os.path.abspath(self.mktemp())
        first = public()
        with open(path, "wb") as handle:
            handle.write(
                b"\xef\xbb\xbf# notes\n" + "".join(f"{first} k{i}\n" for i in range(500)).encode()
            )
        keysFile = authkeys.AuthorizedKeysFile(path)
        self.assertEqual(len(keysFile.entries()), 500)
        calls: list[int] = []
        real = authkeys.parse_line
        self.patch(authkeys, "parse_line", lambda line, n=0: (calls.append(n), real(line, n))[1])
        second = public()
        with open(path, "a") as handle:
            handle.write(f'access="denied" {second} late\nbroken {first}\n')
        entry = keysFile.lookup(keys.Key.fromString(second).blob())
        assert entry is not None
        self.assertEqual((entry.lineno, entry.denied), (502, True))
        self.assertEqual(calls, [502, 503, 504])
        # The bad line 503 holds the first key: it is now denied (fail closed).
        firstEntry = keysFile.lookup(keys.Key.fromString(first).blob())
        assert firstEntry is not None
        self.assertTrue(firstEntry.denied)
        self.assertEqual(firstEntry.lineno, 503)
        # A rewrite (not an append) is parsed whole.
        with open(path, "w") as handle:
            handle.write(f"{second} only\n")
        self.assertEqual([e.comment for e in keysFile.entries()], ["only"])


class FirstUseLimiterTests(unittest.TestCase):
    """The token buckets refill with time, per source (IPv6 by /64) and overall."""

    def test_refill_and_sources(self) -> None:
        """First-use keys are limited per source (IPv6 by /64) and overall, and the limits refill
        with time."""
        from nuttconch.auth import FirstUseLimiter

        now = [0.0]
        limiter = FirstUseLimiter(per_source=2, overall=3, max_keys=100, clock=lambda: now[0])
        for _ in range(2):
            self.assertIsNone(limiter.refusal("2001:db8::1", 0))
            limiter.take("2001:db8::1")
        self.assertIn("from your address", limiter.refusal("2001:db8::2", 0) or "")
        self.assertIsNone(limiter.refusal("2001:db8:1::1", 0))
        limiter.take("192.0.2.1")
        self.assertIn("are arriving", limiter.refusal("192.0.2.2", 0) or "")
        now[0] += 30  # half a minute: one token back in each bucket
        self.assertIsNone(limiter.refusal("2001:db8::1", 0))
        self.assertIn("no more new keys", limiter.refusal("192.0.2.3", 100) or "")
