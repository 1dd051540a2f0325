"""Access control end to end: permissions, from=, names, TOFU and egress, via real OpenSSH.

Covers THREATS.md items 13, 14, 17, 18, 19, 20, 23, 37 and 38 against an
in-process server, asserting on ssh exit codes, stderr text, the bytes a
circuit carries, and the authorized_keys file on disk.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from twisted.conch.ssh import service, transport, userauth
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.keys import Key
from twisted.internet import defer, protocol, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from nuttconch.authkeys import parse_text
from nuttconch.names import escape

from .harness import SwitchboardTestMixin, listen_echo, listening_sockets

DEVICE_PORT = 7100
FORWARD_PORT = 7000

# The permission matrix (THREATS 23, SPEC "Permissions"), checked in as data.
# Columns: login, tcpip-forward (ssh -N -R), direct-tcpip (ssh -W), the
# ``listeners`` command, ``whoami``, the admin shell (ssh -tt).  "-" means the
# action is never reached because login itself is refused.
MATRIX_COLUMNS = ("login", "forward", "circuit", "listeners", "whoami", "shell")
PERMISSION_MATRIX: dict[str, tuple[str, str]] = {
    # name: (authorized_keys options, "login forward circuit listeners whoami shell")
    "listen": ('access="listen"', "Y N Y N Y N"),
    "initiate": ('access="initiate"', "Y Y N N Y N"),
    "list": ('access="list"', "Y N N Y Y N"),
    "admin": ('access="admin"', "Y N N N Y Y"),
    "none": ("", "Y N N N Y N"),
    "listen_initiate": ('access="listen",access="initiate"', "Y Y Y N Y N"),
    "listen_denied": ('access="listen",access="denied"', "N - - - - -"),
    "admin_denied": ('access="admin",access="denied"', "N - - - - -"),
}


def expected_row(name: str) -> dict[str, bool | None]:
    """The matrix row for ``name`` as {column: True/False/None (not reached)}."""
    cells = PERMISSION_MATRIX[name][1].split()
    assert len(cells) == len(MATRIX_COLUMNS)
    return {
        col: {"Y": True, "N": False, "-": None}[c]
        for col, c in zip(MATRIX_COLUMNS, cells, strict=True)
    }


def parse_whoami(out: bytes) -> dict[str, str]:
    """The ``key: value`` lines of whoami output as a dict."""
    fields = {}
    for line in out.decode().splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


def public_line(path: str) -> str:
    """``<keytype> <base64>`` of the key made at ``path``."""
    with open(path + ".pub") as handle:
        return " ".join(handle.read().split()[:2])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Canary(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]
        self.transport.loseConnection()


def listen_canary(testcase: Any) -> tuple[int, Any]:
    """A TCP server on 127.0.0.1 that counts connections; returns (port, factory)."""
    factory = protocol.Factory.forProtocol(_Canary)
    factory.connections = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port, factory


class _ProbeAuth(userauth.SSHUserAuthClient):
    """Offers one key once, signs with ``signer``, and records USERAUTH_BANNER text."""

    def __init__(self, user: bytes, key: Key, signer: Key | None, outcome: dict[str, Any]) -> None:
        super().__init__(user, _ProbeConnection())
        self.key = key
        self.signer = signer
        self.outcome = outcome
        self.offered = False

    def getPublicKey(self) -> Key | None:
        if self.offered:
            return None
        self.offered = True
        return self.key.public()

    def getPrivateKey(self) -> defer.Deferred[Key]:
        if self.signer is None:
            return defer.fail(NotImplementedError("no private key"))
        return defer.succeed(self.signer)

    def ssh_USERAUTH_BANNER(self, packet: bytes) -> None:
        self.outcome["banner"] += getNS(packet)[0]


class _ProbeConnection(service.SSHService):
    name = b"ssh-connection"

    def serviceStarted(self) -> None:
        self.transport.outcome["ok"] = True
        self.transport.loseConnection()


class _ProbeTransport(transport.SSHClientTransport):
    def __init__(
        self, user: bytes, key: Key, signer: Key | None, done: defer.Deferred[Any]
    ) -> None:
        self.user = user
        self.key = key
        self.signer = signer
        self.done = done
        self.outcome: dict[str, Any] = {"ok": False, "banner": b""}

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[bool]:
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.requestService(_ProbeAuth(self.user, self.key, self.signer, self.outcome))

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if not self.done.called:
            self.done.callback((self.outcome["ok"], self.outcome["banner"]))


def login_probe(
    port: int, key_path: str, user: bytes, sign_with: str | None = "own"
) -> defer.Deferred[tuple[bool, bytes]]:
    """Log in with Conch's client as any byte-string user; fires (succeeded, banner text).

    OpenSSH refuses quotes, newlines and other metacharacters in user names
    before it connects, so hostile names are sent with this client instead.
    ``sign_with`` is another key's path to sign with, or None to offer the
    public key without ever signing.
    """
    done: defer.Deferred[tuple[bool, bytes]] = defer.Deferred()
    key = Key.fromFile(key_path)
    signer = key if sign_with == "own" else Key.fromFile(sign_with) if sign_with else None
    creator = protocol.ClientCreator(reactor, _ProbeTransport, user, key, signer, done)
    creator.connectTCP("127.0.0.1", port).addErrback(done.errback)
    return done.addTimeout(15, reactor)


class AccessTestMixin(SwitchboardTestMixin):
    """Helpers shared by the access test classes."""

    def readKeys(self) -> bytes:
        with open(self.akfile, "rb") as handle:
            return handle.read()

    @defer.inlineCallbacks
    def whoami(self, key: str, user: str, *extra: str) -> Any:
        out, err, code = yield self.ssh(key, user, *extra, command=("whoami",))
        self.assertEqual(code, 0, err)
        return parse_whoami(out)

    @defer.inlineCallbacks
    def device(self, user: str = "device", tag: bytes = b"DEV:", port: int = DEVICE_PORT) -> Any:
        """A TOFU initiator holding ``port``; returns its registry listener."""
        target = listen_echo(self, tag)
        key = self.key(user)
        yield self.initiator(key, user, f"{port}:localhost:{target}")
        listener = yield self.waitFor(
            lambda: next((x for x in self.registry.listeners() if x.hostname == user), None),
            what=f"initiator {user}",
        )
        return listener

    def assertRefusedAtLogin(self, result: tuple[bytes, bytes, int], message: bytes) -> None:
        out, err, code = result
        self.assertEqual(code, 255, err)
        self.assertIn(b"nuttconch: " + message, err)
        self.assertEqual(out, b"")

    @defer.inlineCallbacks
    def tryForward(self, key: str, user: str, name: str | None) -> Any:
        """Run ``ssh -N -R``: True once registered under ``name``, False if ssh gave up."""
        target = listen_echo(self, b"FWD:")
        proc = self.spawn(key, user, "-N", "-R", f"{FORWARD_PORT}:localhost:{target}", stdin=None)

        def settled() -> Any:
            if proc.code is not None:
                return "ended"
            for listener in self.registry.listeners():
                if FORWARD_PORT in listener.ports and name in listener.aliases:
                    return "registered"
            return None

        state = yield self.waitFor(settled, 15, "ssh -R to register or exit")
        if state == "registered":
            yield proc.kill()
            return True
        out, err, code = yield proc.ended
        return code, bytes(err)


class PermissionMatrixTests(AccessTestMixin, unittest.TestCase):
    """Every access set in PERMISSION_MATRIX against every action (THREATS 23)."""

    @defer.inlineCallbacks
    def checkRow(self, row: str) -> Any:
        expected = expected_row(row)
        options = PERMISSION_MATRIX[row][0]
        device = yield self.device()
        before = self.readKeys()
        key = self.key(f"key-{row}", options=options)
        with_key = self.readKeys()
        self.assertNotEqual(before, with_key)
        user = f"m-{row.replace('_', '-')}"
        if not expected["login"]:
            results = yield defer.gatherResults(
                [
                    self.ssh(key, user, command=("whoami",)),
                    self.ssh(key, user, command=("listeners",)),
                    self.ssh(key, user, "-W", f"{device.connect_name}:{DEVICE_PORT}", stdin=b"x"),
                    self.ssh(key, user, "-N", "-R", f"{FORWARD_PORT}:localhost:1"),
                ]
            )
            for result in results:
                self.assertRefusedAtLogin(result, b"this key is denied")
            self.assertEqual(self.readKeys(), with_key)
            self.assertEqual(self.registry.listeners(), [device])
            return

        self.assertTrue(expected["whoami"], "whoami needs no permission")
        me = yield self.whoami(key, user)
        granted = sorted(re.findall(r'access="([a-z]+)"', options))
        self.assertEqual(me["access"], ", ".join(granted) or "none")

        listed, circuit, shell = yield defer.gatherResults(
            [
                self.ssh(key, user, command=("listeners",)),
                self.ssh(key, user, "-W", f"{device.connect_name}:{DEVICE_PORT}", stdin=b"ping"),
                self.ssh(key, user, "-tt", stdin=b"\x04", timeout=15),
            ]
        )
        forward = yield self.tryForward(key, user, me["names"].split(", ")[0])

        out, err, code = listed
        if expected["listeners"]:
            self.assertEqual(code, 0, err)
            self.assertIn(device.connect_name.encode(), out)
        else:
            self.assertEqual(code, 1, err)
            self.assertIn(b"Permission denied", err)
            self.assertNotIn(device.connect_name.encode(), out + err)

        out, err, code = circuit
        if expected["circuit"]:
            self.assertEqual((out, code), (b"DEV:ping", 0), err)
        else:
            self.assertEqual(code, 255)
            self.assertEqual(out, b"")
            self.assertIn(b"administratively prohibited", err)

        if expected["forward"]:
            self.assertIs(forward, True)
        else:
            self.assertIsNot(forward, True, "forward was registered")
            code, err = forward
            self.assertEqual(code, 255, err)
            self.assertIn(b"remote port forwarding failed", err)
            self.assertEqual(self.registry.listeners(), [device])

        out, err, code = shell
        if expected["shell"]:
            self.assertEqual(code, 0, err)
            self.assertIn(b"nuttconch> ", out)
        else:
            # No shell and no virtual port: the reason, and exit status 1 (issue 12.5).
            self.assertEqual(code, 1, err)
            self.assertIn(b"no interactive shell", out + err)
            self.assertNotIn(b"nuttconch> ", out + err)
        # Nothing the key did changed its line or added one.
        self.assertEqual(self.readKeys(), with_key)


def _matrix_test(row: str) -> Any:
    def test(self: PermissionMatrixTests) -> Any:
        return self.checkRow(row)

    test.__name__ = f"test_matrix_{row}"
    options = PERMISSION_MATRIX[row][0] or "no access option"
    test.__doc__ = f"A key with {options} can do exactly what the matrix row {row!r} says."
    return test


for _row in PERMISSION_MATRIX:
    setattr(PermissionMatrixTests, f"test_matrix_{_row}", _matrix_test(_row))
del _row


class DeniedAndFromTests(AccessTestMixin, unittest.TestCase):
    """access=denied and from= are enforced at authentication (THREATS 13, 14, 20)."""

    # Logins are refused on purpose from 127.0.0.2 too; keep that source unpenalised.
    settings = {"per_source_penalty_exempt_list": "127.0.0.0/8"}

    @defer.inlineCallbacks
    def test_denied_on_another_line_wins(self) -> Any:
        """A key listed twice, once allowed and once denied, is refused whichever line is first."""
        first = self.key("allowfirst", options='access="listen"')
        self.addAuthorized(public_line(first), 'access="denied"', "again")
        second = self.key("denyfirst", options='access="denied"')
        self.addAuthorized(public_line(second), 'access="listen",access="list"', "again")
        before = self.readKeys()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for key in (first, second):
            result = yield self.ssh(key, "someone", command=("whoami",))
            self.assertRefusedAtLogin(result, b"this key is denied")
        self.assertEqual(self.readKeys(), before)
        refusals = [e for e in events if "login refused" in e.get("log_format", "")]
        self.assertEqual([e["reason"] for e in refusals], ["denied", "denied"])
        self.assertEqual(self.factory.portal.realm.avatars, 0)

    @defer.inlineCallbacks
    def test_from_patterns(self) -> Any:
        """from= takes exact IPs, CIDRs, negation and repeated options, and fails closed."""
        cases = [
            ("exact", 'from="127.0.0.1"', True),
            ("cidr", 'from="127.0.0.0/8"', True),
            ("glob", 'from="127.0.0.*"', True),
            ("other-net", 'from="10.0.0.0/8"', False),
            ("negated", 'from="127.0.0.0/8,!127.0.0.1"', False),
            ("two-from", 'from="127.0.0.0/8",from="10.*"', False),
            ("two-from-ok", 'from="127.0.0.0/8",from="127.*"', True),
            ("invalid", 'from="1.2.3.0/33"', False),
            ("invalid-mixed", 'from="127.0.0.1,1.2.3.0/33"', False),
        ]
        paths = {
            name: self.key(f"from-{name}", options=f'access="listen",{opts}')
            for name, opts, _ in cases
        }
        before = self.readKeys()
        results = yield defer.gatherResults(
            [self.ssh(paths[name], "fromtest", command=("whoami",)) for name, _, _ in cases]
        )
        for (name, _, allowed), (out, err, code) in zip(cases, results, strict=True):
            if allowed:
                self.assertEqual(code, 0, f"{name}: {err!r}")
                self.assertIn(b"access: listen\n", out)
            else:
                self.assertEqual(code, 255, f"{name}: {err!r}")
                self.assertIn(b"nuttconch: this key is not allowed from 127.0.0.1", err, name)
        # A key the from= rules deny is never trusted on first use or rewritten.
        self.assertEqual(self.readKeys(), before)

    @defer.inlineCallbacks
    def test_from_depends_on_the_source_address(self) -> Any:
        """from="127.0.0.2" admits a client bound to 127.0.0.2 and refuses 127.0.0.1."""
        only2 = self.key("only2", options='access="listen",from="127.0.0.2"')
        not2 = self.key("not2", options='access="listen",from="127.0.0.0/8,!127.0.0.2"')
        me = yield self.whoami(only2, "src", "-b", "127.0.0.2")
        self.assertEqual(me["address"], "127.0.0.2")
        result = yield self.ssh(only2, "src", command=("whoami",))
        self.assertRefusedAtLogin(result, b"this key is not allowed from 127.0.0.1")
        me = yield self.whoami(not2, "src")
        self.assertEqual(me["address"], "127.0.0.1")
        result = yield self.ssh(not2, "src", "-b", "127.0.0.2", command=("whoami",))
        self.assertRefusedAtLogin(result, b"this key is not allowed from 127.0.0.2")


class NameTests(AccessTestMixin, unittest.TestCase):
    """hostname=, alias=, generated aliases, and who may hold a name (THREATS 17)."""

    @defer.inlineCallbacks
    def test_hostname_and_alias_options(self) -> Any:
        """hostname= and alias= set the names; the SSH username and hostname never route."""
        opts = 'access="initiate",access="listen",hostname="gw1",alias="prod"'
        gw = self.key("gw", options=opts)
        me = yield self.whoami(gw, "whatever")
        self.assertEqual(me["hostname"], "gw1")
        generated, *rest = me["names"].split(", ")
        self.assertRegex(generated, r"^gw1-[0-9a-z]{7}$")
        self.assertEqual(rest, ["prod"])

        target = listen_echo(self, b"GW:")
        yield self.initiator(gw, "whatever", f"{DEVICE_PORT}:localhost:{target}")
        client = self.key("client")
        results = yield defer.gatherResults(
            [
                self.ssh(client, "client", "-W", f"{name}:{DEVICE_PORT}", stdin=b"hi")
                for name in ("prod", generated, "PROD", "whatever", "gw1")
            ]
        )
        for name, (out, err, code) in zip(("prod", generated, "PROD"), results[:3], strict=True):
            self.assertEqual((out, code), (b"GW:hi", 0), f"{name}: {err!r}")
        for name, (out, err, code) in zip(("whatever", "gw1"), results[3:], strict=True):
            self.assertEqual(code, 255, name)
            self.assertEqual(out, b"")
            self.assertIn(f"connect failed: no such listener: {name}".encode(), err)

    @defer.inlineCallbacks
    def test_name_hijack(self) -> Any:
        """A TOFU key cannot take 'prod' or K1's generated alias by username or bind address."""
        k1 = self.key("k1", options='access="initiate",access="listen",alias="prod"')
        k1_target = listen_echo(self, b"K1:")
        yield self.initiator(k1, "k1", f"22:localhost:{k1_target}")
        k1_listener = self.registry.listeners()[0]
        k1_alias = k1_listener.connect_name
        self.assertEqual(k1_listener.aliases, (k1_alias, "prod"))
        suffix = k1_alias.rsplit("-", 1)[1]

        client = self.key("client")
        early = self.spawn(client, "client", "-W", "prod:22", stdin=None)
        yield early.waitOutput(b"K1:")

        k2 = self.key("k2")
        k2_target = listen_echo(self, b"K2:")
        me = yield self.whoami(k2, "prod")  # trusted on first use
        self.assertEqual(me["access"], "initiate, listen")
        self.assertNotIn("prod", me["names"].split(", "))
        attempts = [
            ("prod", f"22:localhost:{k2_target}"),
            (f"prod-{suffix}", f"22:localhost:{k2_target}"),
            ("k1", f"22:localhost:{k2_target}"),
            ("k2", f"prod:22:localhost:{k2_target}"),
            ("k2b", f"{k1_alias}:22:localhost:{k2_target}"),
        ]
        for user, fwd in attempts:
            self.spawn(k2, user, "-N", "-R", fwd, stdin=None)
        yield self.waitFor(
            lambda: len([x for x in self.registry.listeners() if 22 in x.ports]) == 6,
            what="all six initiators on port 22",
        )
        for listener in self.registry.listeners():
            if listener is k1_listener:
                continue
            self.assertNotIn("prod", listener.aliases)
            self.assertNotIn(k1_alias, listener.aliases)
            self.assertEqual(len(listener.aliases), 1, listener.aliases)
            self.assertNotEqual(listener.connect_name, k1_alias)
        k2_as_k1 = next(x for x in self.registry.listeners() if x.hostname == "k1")
        self.assertRegex(k2_as_k1.connect_name, r"^k1-[0-9a-z]{7}$")
        self.assertNotEqual(k2_as_k1.connect_name, k1_alias)

        results = yield defer.gatherResults(
            [
                self.ssh(client, "client", "-W", f"{name}:22", stdin=b"who")
                for name in ("prod", "prod~0", k1_alias, "prod~1", f"{k1_alias}~1")
            ]
        )
        for name, (out, err, code) in zip(("prod", "prod~0", k1_alias), results[:3], strict=True):
            self.assertEqual((out, code), (b"K1:who", 0), f"{name}: {err!r}")
        for (_out, err, code), name in zip(results[3:], ("prod~1", f"{k1_alias}~1"), strict=True):
            self.assertEqual(code, 255, name)
            self.assertIn(b"connect failed: no such listener", err, name)
        # The circuit K1 had before K2 arrived still carries bytes, to K1.
        early.transport.write(b"still here")
        early.transport.closeStdin()
        out, err, code = yield early.ended
        self.assertEqual((out, code), (b"K1:still here", 0), err)

    @defer.inlineCallbacks
    def test_generated_alias_is_stable(self) -> Any:
        """The generated alias survives reconnects and restarts; another key gets another."""
        a = self.key("a")
        b = self.key("b")
        first = yield self.whoami(a, "stable")
        again = yield self.whoami(a, "Stable")
        other_key = yield self.whoami(b, "stable")
        other_name = yield self.whoami(a, "other")
        self.assertRegex(first["names"], r"^stable-[0-9a-z]{7}$")
        self.assertEqual(again["names"], first["names"])
        self.assertRegex(other_key["names"], r"^stable-[0-9a-z]{7}$")
        self.assertNotEqual(other_key["names"], first["names"])
        self.assertRegex(other_name["names"], r"^other-[0-9a-z]{7}$")
        self.assertNotEqual(other_name["names"][-7:], first["names"][-7:])

        target = listen_echo(self)
        yield self.initiator(a, "stable", f"{DEVICE_PORT}:localhost:{target}")
        self.assertEqual(self.registry.listeners()[0].connect_name, first["names"])
        yield self.stopServer()
        self.startServer()
        after = yield self.whoami(a, "stable")
        self.assertEqual(after["names"], first["names"])


class TrustOnFirstUseTests(AccessTestMixin, unittest.TestCase):
    """New keys are appended once, with the default access, and nothing else (18, 19, 20)."""

    settings = {"max_startups": "200", "per_source_max_startups": "200"}

    @defer.inlineCallbacks
    def test_first_login_appends_one_line(self) -> Any:
        """A new key gets one access="initiate",access="listen" line; a second login none."""
        self.key("existing", options='access="list"')
        before = self.readKeys()
        newbie = self.key("newbie")
        me = yield self.whoami(newbie, "newbie")
        self.assertEqual(me["access"], "initiate, listen")
        after = self.readKeys()
        self.assertTrue(after.startswith(before))
        expected = f'access="initiate",access="listen" {public_line(newbie)} newbie@127.0.0.1\n'
        self.assertEqual(after[len(before) :].decode(), expected)
        entries, errors = parse_text(after.decode())
        self.assertEqual(errors, [])
        self.assertEqual(len(entries), 2)
        self.assertEqual(entries[1].access, frozenset({"initiate", "listen"}))
        self.assertEqual(entries[1].comment, "newbie@127.0.0.1")
        self.assertEqual(entries[1].from_patterns, ())
        self.assertEqual(entries[1].aliases, ())
        self.assertIsNone(entries[1].hostname)

        yield self.whoami(newbie, "newbie")
        yield self.whoami(newbie, "renamed")
        self.assertEqual(self.readKeys(), after)

    @defer.inlineCallbacks
    def test_uppercase_username_is_normalised(self) -> Any:
        """A username 'Prod' is stored and named as 'prod'."""
        before = self.readKeys()
        key = self.key("upper")
        me = yield self.whoami(key, "Prod")
        self.assertEqual(me["hostname"], "prod")
        self.assertRegex(me["names"], r"^prod-[0-9a-z]{7}$")
        added = self.readKeys()[len(before) :].decode()
        self.assertEqual(
            added, f'access="initiate",access="listen" {public_line(key)} prod@127.0.0.1\n'
        )

    @defer.inlineCallbacks
    def test_hostile_usernames_are_refused(self) -> Any:
        """Usernames that could inject options, lines or keys are refused and change nothing."""
        self.key("existing", options='access="list"')
        control = yield login_probe(self.port, self.key("control"), b"control")
        self.assertEqual(control, (True, b""))  # the probe client can log in at all
        before = self.readKeys()
        names = [
            b'a",access="admin',
            b"a\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA attacker",
            b"a\\",
            b"a b",
            b'a,alias="prod"',
            b"x" * 300,
            b"a\x00b",
            b"a\xffb",
            b"caf\xc3\xa9",
            b"#comment",
            b"-x",
            b"a\tb",
            b"prod~1",
        ]
        for i, name in enumerate(names):
            ok, banner = yield login_probe(self.port, self.key(f"hostile{i}"), name)
            self.assertFalse(ok, name)
            if len(name) > 63:
                self.assertEqual(banner, b"nuttconch: user name is longer than 63 characters\r\n")
            elif not name.isascii():
                self.assertIn(b"nuttconch: user name is not ASCII; names are 1 to 63", banner)
            else:
                shown = f'nuttconch: user name "{escape(name)}" is not allowed; names are 1 to 63'
                self.assertIn(shown.encode(), banner, name)
        # The real client shows the reason for those names it is willing to send.
        for name in ("a b", "#comment", "x" * 300, "a,alias=prod", "Prod~1"):
            out, err, code = yield self.ssh(self.key(f"ssh-{len(name)}"), name, command=("whoami",))
            self.assertEqual(code, 255, f"{name!r}: {err!r}")
            self.assertEqual(out, b"")
            self.assertIn(b"nuttconch: user name ", err, f"{name!r}: {err!r}")
        self.assertEqual(self.readKeys(), before)

    @defer.inlineCallbacks
    def test_tofu_needs_proof_of_possession(self) -> Any:
        """A key offered without a signature, or with a wrong one, is never written."""
        before = self.readKeys()
        victim = self.key("victim")
        thief = self.key("thief")
        ok, banner = yield login_probe(self.port, victim, b"victim", sign_with=None)
        self.assertFalse(ok)
        self.assertEqual(self.readKeys(), before)
        ok, banner = yield login_probe(self.port, victim, b"victim", sign_with=thief)
        self.assertFalse(ok)
        self.assertIn(b"nuttconch: bad signature", banner)
        self.assertEqual(self.readKeys(), before)
        self.assertEqual(self.registry.listeners(), [])
        self.assertEqual(self.factory.portal.realm.avatars, 0)

    @defer.inlineCallbacks
    def test_concurrent_first_logins(self) -> Any:
        """Twenty new keys logging in at once all succeed and add exactly twenty good lines."""
        self.key("existing", options='access="list"')
        before = self.readKeys()
        keys = [self.key(f"c{i}") for i in range(20)]
        results = yield defer.gatherResults(
            [self.ssh(key, f"c{i}", command=("whoami",)) for i, key in enumerate(keys)]
        )
        for _out, err, code in results:
            self.assertEqual(code, 0, err)
        after = self.readKeys()
        self.assertTrue(after.startswith(before))
        added = after[len(before) :].decode()
        self.assertTrue(added.endswith("\n"))
        lines = added[:-1].split("\n")
        self.assertEqual(len(lines), 20)
        entries, errors = parse_text(after.decode())
        self.assertEqual(errors, [])
        self.assertEqual(len(entries), 21)
        wanted = {
            public_line(key): f'access="initiate",access="listen" {public_line(key)} c{i}@127.0.0.1'
            for i, key in enumerate(keys)
        }
        self.assertEqual(sorted(lines), sorted(wanted.values()))


class NoNewClientsTests(AccessTestMixin, unittest.TestCase):
    """allow_new_clients = false refuses unknown keys and never writes the file."""

    settings = {"allow_new_clients": "false"}

    @defer.inlineCallbacks
    def test_unknown_key_refused(self) -> Any:
        """An unknown key is told it is not authorized; a listed key still logs in."""
        known = self.key("known", options='access="listen"')
        before = self.readKeys()
        result = yield self.ssh(self.key("stranger"), "stranger", command=("whoami",))
        self.assertRefusedAtLogin(result, b"this key is not authorized")
        me = yield self.whoami(known, "known")
        self.assertEqual(me["access"], "listen")
        self.assertEqual(self.readKeys(), before)


class AuthDisabledTests(AccessTestMixin, unittest.TestCase):
    """enable_auth = false lets any key in with every permission."""

    settings = {"enable_auth": "false"}

    @defer.inlineCallbacks
    def test_any_key_gets_every_permission(self) -> Any:
        """An unknown key gets admin, initiate, list and listen, and the file is not written."""
        before = self.readKeys()
        key = self.key("anyone")
        me = yield self.whoami(key, "anyone")
        self.assertEqual(me["access"], "admin, initiate, list, listen")
        device = yield self.device()
        out, err, code = yield self.ssh(key, "anyone", command=("listeners",))
        self.assertEqual(code, 0, err)
        self.assertIn(device.connect_name.encode(), out)
        out, err, code = yield self.ssh(
            key, "anyone", "-W", f"{device.connect_name}:{DEVICE_PORT}", stdin=b"x"
        )
        self.assertEqual((out, code), (b"DEV:x", 0), err)
        self.assertEqual(self.readKeys(), before)


class UserKeyTypeTests(AccessTestMixin, unittest.TestCase):
    """RSA user keys work whatever host keys the server has; short RSA keys do not."""

    @defer.inlineCallbacks
    def test_rsa_user_key(self) -> Any:
        """An RSA-3072 user key authenticates with each host key algorithm the client picks."""
        key = self.key("rsa", kind="rsa-3072")
        for alg in ("ssh-ed25519", "rsa-sha2-512", "ecdsa-sha2-nistp256"):
            known_hosts = os.path.join(self.dir, "known_hosts")
            if os.path.exists(known_hosts):
                os.remove(known_hosts)  # each algorithm pins a different host key
            me = yield self.whoami(key, "rsauser", "-o", f"HostKeyAlgorithms={alg}")
            self.assertEqual(me["access"], "initiate, listen")

    @defer.inlineCallbacks
    def test_short_rsa_key_refused(self) -> Any:
        """An RSA-1024 user key is refused with a message about 2048 bits, and not stored."""
        before = self.readKeys()
        result = yield self.ssh(self.key("rsa1024", kind="rsa-1024"), "weak", command=("whoami",))
        self.assertRefusedAtLogin(result, b"RSA keys need at least 2048 bits")
        self.assertEqual(self.readKeys(), before)


class Ed25519HostKeyOnlyTests(AccessTestMixin, unittest.TestCase):
    """A server with only an Ed25519 host key still verifies RSA user keys (rsa-sha2-*)."""

    def writeConfig(self, **overrides: str) -> str:
        path = super().writeConfig(**overrides)
        with open(path, "a") as handle:  # [keys] is the last section
            handle.write("host_key_ecdsa =\nhost_key_rsa =\n")
        return path

    @defer.inlineCallbacks
    def test_rsa_user_key_with_ed25519_host_key(self) -> Any:
        """The only host key is Ed25519 and an RSA-3072 user key still logs in."""
        self.assertEqual(set(self.factory.privateKeys), {b"ssh-ed25519"})
        for kind in ("rsa-3072", "ecdsa", "ed25519"):
            key = self.key(f"user-{kind}", kind=kind)
            me = yield self.whoami(key, "edonly")
            self.assertEqual(me["access"], "initiate, listen", kind)


class EgressAndEnumerationTests(AccessTestMixin, unittest.TestCase):
    """direct-tcpip never leaves the switchboard (37) and refusals leak nothing (38)."""

    @defer.inlineCallbacks
    def test_no_real_egress(self) -> Any:
        """Circuits to real addresses, unknown ports and indexes fail and reach no real socket."""
        canary, counter = listen_canary(self)
        device = yield self.device()
        name = device.connect_name
        client = self.key("client")
        targets = [
            ("127.0.0.1", canary),
            ("localhost", canary),
            ("localhost", self.port),
            ("169.254.169.254", 80),
            ("[::1]", 22),
            ("[::1]", canary),
            (name, DEVICE_PORT + 1),
            (f"{name}~99", DEVICE_PORT),
            (f"{name}~1", DEVICE_PORT),
            ("device", DEVICE_PORT),
        ]
        results = yield defer.gatherResults(
            [self.ssh(client, "client", "-W", f"{h}:{p}", stdin=b"GET /") for h, p in targets]
        )
        for (host, port), (out, err, code) in zip(targets, results, strict=True):
            self.assertEqual(code, 255, f"{host}:{port}: {err!r}")
            self.assertEqual(out, b"")
            self.assertIn(b"open failed: connect failed: no such", err, host)
        # Local forwarding (-L) toward the canary is refused the same way.
        lport = free_port()
        proc = self.spawn(client, "client", "-N", "-L", f"{lport}:127.0.0.1:{canary}", stdin=None)

        def connected() -> socket.socket | None:
            try:
                return socket.create_connection(("127.0.0.1", lport), timeout=1)
            except OSError:
                return None

        sock = yield self.waitFor(connected, what="ssh -L to listen")
        self.addCleanup(sock.close)
        sock.sendall(b"GET /")
        yield proc.waitOutput(b"open failed")
        sock.settimeout(5)
        try:
            self.assertEqual(sock.recv(100), b"")
        except ConnectionResetError:
            pass  # ssh closed with unread data: a reset, equally a refusal
        self.assertIn(b"no such listener: 127.0.0.1", bytes(proc.err))
        self.assertEqual(counter.connections, 0)
        # The switchboard still serves a legitimate circuit afterwards.
        out, err, code = yield self.ssh(
            client, "client", "-W", f"{name}:{DEVICE_PORT}", stdin=b"ok"
        )
        self.assertEqual((out, code), (b"DEV:ok", 0), err)
        self.assertEqual(counter.connections, 0)

    @defer.inlineCallbacks
    def test_forward_opens_no_real_socket(self) -> Any:
        """tcpip-forward for port 22 and port 0 registers virtual ports, never a real listener."""
        target = listen_echo(self)
        before = listening_sockets()
        proc = self.spawn(
            self.key("fwd"),
            "fwd",
            "-N",
            "-R",
            f"22:localhost:{target}",
            "-R",
            f"0:localhost:{target}",
            stdin=None,
        )
        listener = yield self.waitFor(
            lambda: next((x for x in self.registry.listeners() if len(x.ports) == 2), None),
            what="both forwards",
        )
        self.assertIn(22, listener.ports)
        allocated = (set(listener.ports) - {22}).pop()
        yield proc.waitOutput(f"Allocated port {allocated} for remote forward".encode())
        self.assertEqual(listening_sockets(), before)
        for port in (22, allocated):
            with socket.socket() as sock:
                self.assertNotEqual(sock.connect_ex(("127.0.0.1", port)), 0, port)

    @defer.inlineCallbacks
    def test_no_enumeration_without_listen(self) -> Any:
        """A key without access=listen gets one identical refusal for real and unknown names."""
        device = yield self.device()
        probe = self.key("probe", options='access="initiate"')
        targets = [
            f"{device.connect_name}:{DEVICE_PORT}",
            f"{device.connect_name}:{DEVICE_PORT + 1}",
            f"{device.connect_name}~5:{DEVICE_PORT}",
            f"nosuch-name:{DEVICE_PORT}",
            f"127.0.0.1:{self.port}",
        ]
        results = yield defer.gatherResults(
            [self.ssh(probe, "probe", "-W", target, stdin=b"x") for target in targets]
        )
        errors = set()
        for target, (out, err, code) in zip(targets, results, strict=True):
            self.assertEqual(code, 255, target)
            self.assertEqual(out, b"")
            self.assertIn(b"administratively prohibited", err, target)
            errors.add(err)
        self.assertEqual(len(errors), 1, errors)
        self.assertNotIn(device.connect_name.encode(), errors.pop())
        # The listeners refusal does not depend on whether anyone is connected either.
        out, err, code = yield self.ssh(probe, "probe", command=("listeners",))
        self.assertEqual((out, code), (b"", 1))
        self.assertIn(b"Permission denied", err)
