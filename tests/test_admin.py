"""Admin commands with the real ssh: each one's output and its effect on the server."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from nuttconch import admin
from nuttconch.auth import fingerprint
from nuttconch.authkeys import parse_line

from .harness import SwitchboardTestMixin, listen_echo
from .test_ops import OpsTestMixin

COMMENTS = (
    "# managed by hand: keep this comment\n"
    "\n"
    "not-a-key-type AAAAB3NzaC1yc2EAAAADAQABAAABAQ garbage line kept as is\n"
)


def key_fingerprint(path: str) -> str:
    with open(path + ".pub") as handle:
        entry = parse_line(handle.read())
    assert entry is not None
    return fingerprint(entry.blob)


class AdminMixin(SwitchboardTestMixin):
    def setUp(self) -> Any:
        d = super().setUp()
        with open(self.akfile, "w") as handle:
            handle.write(COMMENTS)
        self.root = self.key("root", options='access="admin",access="list"')
        return d

    def admin(self, *argv: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        return self.ssh(self.root, "root", command=argv)

    def assertCommentsKept(self) -> None:
        with open(self.akfile) as handle:
            self.assertTrue(handle.read().startswith(COMMENTS))


class AdminCommandTests(AdminMixin, OpsTestMixin, unittest.TestCase):
    ops: dict[str, dict[str, str]] = {}

    @defer.inlineCallbacks
    def test_listeners_circuits_stats_keys_json(self) -> Any:
        """The views show a live initiator and circuit, as tables and as JSON."""
        target = listen_echo(self)
        devkey = self.key("dev")
        yield self.initiator(devkey, "dev", f"6379:localhost:{target}")
        name = self.registry.listeners()[0].connect_name
        client = self.spawn(self.key("cli"), "cli", "-W", f"{name}:6379", stdin=None)
        client.transport.write(b"hello")
        yield client.waitOutput(b"hello")

        out, err, code = yield self.admin("listeners", "--json")
        self.assertEqual(code, 0, err)
        rows = json.loads(out)
        self.assertEqual([r["name"] for r in rows], [name])
        self.assertEqual(rows[0]["ports"], [6379])
        self.assertEqual(rows[0]["address"], "127.0.0.1")
        self.assertEqual(rows[0]["fingerprint"], key_fingerprint(devkey))
        self.assertEqual(rows[0]["circuits"], 1)
        self.assertEqual((rows[0]["bytes_up"], rows[0]["bytes_down"]), (5, 5))

        out, err, code = yield self.admin("circuits")
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(lines[0].split(), ["ID", "TARGET", "CLIENT", "FROM", "AGE", "UP", "DOWN"])
        self.assertEqual(lines[1].split()[1:4], [f"{name}:6379", "cli", "127.0.0.1"])
        out, err, code = yield self.admin("circuits", "--json")
        circuits = json.loads(out)
        self.assertEqual(circuits[0]["target"], f"{name}:6379")
        self.assertEqual(circuits[0]["bytes_up"], 5)

        out, err, code = yield self.admin("stats")
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("initiators: 1\n", text)
        self.assertIn("open circuits: 1\n", text)
        self.assertIn("virtual ports: 1\n", text)
        out, err, code = yield self.admin("stats", "--json")
        data = json.loads(out)
        self.assertEqual(data["circuits_opened"]["ok"], 1)
        self.assertEqual(data["keys_added"], 2)

        out, err, code = yield self.admin("keys")
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn(key_fingerprint(self.root), text)
        self.assertIn('access="admin",access="list"', text)
        self.assertIn(key_fingerprint(devkey), text)
        self.assertIn("dev@127.0.0.1", text)
        out, err, code = yield self.admin("keys", "--json")
        keys = {k["fingerprint"]: k for k in json.loads(out)}
        self.assertEqual(keys[key_fingerprint(devkey)]["access"], ["initiate", "listen"])
        self.assertEqual(keys[key_fingerprint(devkey)]["connections"], 1)

        out, err, code = yield self.admin("help")
        for word in ("kick", "grant", "revoke", "ban", "keys", "stats", "circuits"):
            self.assertIn(word, out.decode())
        client.transport.closeStdin()
        yield client.ended

    @defer.inlineCallbacks
    def test_kick(self) -> Any:
        """kick NAME disconnects that initiator: its ssh exits, its names are gone."""
        proc = yield self.initiator(self.key("dev"), "dev", "80:localhost:80")
        other = yield self.initiator(self.key("dev2"), "dev2", "80:localhost:80")
        # Both hold port 80, so wait until dev2 itself is registered.
        yield self.waitFor(lambda: len(self.registry.listeners()) == 2, 10, "both initiators")
        name = next(x.connect_name for x in self.registry.listeners() if x.hostname == "dev")
        out, err, code = yield self.admin("kick", name)
        self.assertEqual(code, 0, err)
        self.assertIn(f"kicked {name}", out.decode())
        _, err, _ = yield proc.ended
        self.assertIn(b"kicked by an administrator", err)
        self.assertEqual([x.hostname for x in self.registry.listeners()], ["dev2"])
        self.assertIsNone(other.code)
        out, err, code = yield self.admin("kick", name)
        self.assertEqual(code, 1)
        self.assertIn(b"no such listener", err)

    @defer.inlineCallbacks
    def test_ban(self) -> Any:
        """ban writes access="denied", drops the key's connections, and it cannot log in."""
        devkey = self.key("dev")
        proc = yield self.initiator(devkey, "dev", "80:localhost:80")
        fp = key_fingerprint(devkey)
        out, err, code = yield self.admin("ban", fp)
        self.assertEqual(code, 0, err)
        self.assertIn(f"banned {fp}", out.decode())
        self.assertIn("1 connection(s) dropped", out.decode())
        yield proc.ended
        yield self.waitFor(lambda: not self.registry.listeners())
        with open(self.akfile) as handle:
            lines = handle.read().splitlines()
        entries = [parse_line(line) for line in lines if not line.startswith(("#", "not"))]
        dev = [e for e in entries if e is not None and fingerprint(e.blob) == fp]
        self.assertEqual(len(dev), 1)
        self.assertEqual(dev[0].access, frozenset({"denied"}))
        self.assertEqual(dev[0].comment, "dev@127.0.0.1")
        self.assertCommentsKept()
        out, err, code = yield self.ssh(devkey, "dev", command=("whoami",))
        self.assertEqual(code, 255)
        self.assertIn(b"this key is denied", err)

    @defer.inlineCallbacks
    def test_revoke(self) -> Any:
        """revoke removes the key's line and drops it; comments stay."""
        devkey = self.key("dev", options='access="initiate"')
        proc = yield self.initiator(devkey, "dev", "80:localhost:80")
        fp = key_fingerprint(devkey)
        out, err, code = yield self.admin("revoke", fp)
        self.assertEqual(code, 0, err)
        self.assertIn("allow_new_clients is on", out.decode())
        yield proc.ended
        with open(self.akfile) as handle:
            text = handle.read()
        self.assertNotIn(open(devkey + ".pub").read().split()[1], text)
        self.assertCommentsKept()
        out, err, code = yield self.admin("revoke", fp)
        self.assertEqual(code, 1)
        self.assertIn(b"no key", err)

    @defer.inlineCallbacks
    def test_refusals(self) -> Any:
        """Non-admin keys are refused; bad arguments are usage errors; no self-ban."""
        user = self.key("user", options='access="list"')
        out, err, code = yield self.ssh(user, "user", command=("kick", "x"))
        self.assertEqual(code, 1)
        self.assertIn(b"Permission denied: this key may not run kick (needs access=admin)", err)
        out, err, code = yield self.ssh(user, "user", command=("circuits",))
        self.assertEqual(code, 0, err)
        out, err, code = yield self.admin("grant", "SHA256:nope", "listen")
        self.assertEqual(code, 1)
        self.assertIn(b"not a SHA256 fingerprint", err)
        out, err, code = yield self.admin("grant", key_fingerprint(user), "root")
        self.assertIn(b"unknown access value root", err)
        out, err, code = yield self.admin("ban", key_fingerprint(self.root))
        self.assertIn(b"refusing to ban the key you are logged in with", err)
        out, err, code = yield self.admin("kick")
        self.assertEqual(code, 2)
        out, err, code = yield self.admin("circuits", "--xml")
        self.assertEqual(code, 2)

    @defer.inlineCallbacks
    def test_admin_shell(self) -> Any:
        """The interactive shell runs the same commands."""
        yield self.initiator(self.key("dev"), "dev", "80:localhost:80")
        name = self.registry.listeners()[0].connect_name
        proc = self.spawn(self.root, "root", "-tt", stdin=None)
        yield proc.waitOutput(b"nuttconch> ")
        proc.transport.write(b"stats\r")
        yield proc.waitOutput(b"initiators: 1")
        proc.transport.write(f"kick {name}\r".encode())
        yield proc.waitOutput(f"kicked {name}".encode())
        yield self.waitFor(lambda: not self.registry.listeners())
        proc.transport.write(b"exit\r")
        yield proc.ended


class GrantTests(AdminMixin, unittest.TestCase):
    settings = {"allow_new_clients": "false"}

    @defer.inlineCallbacks
    def test_grant(self) -> Any:
        """A key without access cannot forward; granted initiate, it can."""
        devkey = self.key("dev", options='hostname="gw"')
        out, err, code = yield self.ssh(devkey, "dev", "-N", "-R", "80:localhost:80")
        self.assertEqual(code, 255)
        fp = key_fingerprint(devkey)
        out, err, code = yield self.admin("grant", fp, "initiate", "listen")
        self.assertEqual(code, 0, err)
        self.assertIn(f"granted initiate, listen to {fp}", out.decode())
        yield self.initiator(devkey, "dev", "80:localhost:80")
        self.assertEqual(self.registry.listeners()[0].hostname, "gw")  # options kept
        self.assertCommentsKept()

    @defer.inlineCallbacks
    def test_grant_lifts_a_ban(self) -> Any:
        """grant removes access="denied" from a banned key."""
        devkey = self.key("dev", options='access="denied"')
        out, err, code = yield self.ssh(devkey, "dev", command=("whoami",))
        self.assertIn(b"this key is denied", err)
        out, err, code = yield self.admin("grant", key_fingerprint(devkey), "initiate")
        self.assertEqual(code, 0, err)
        out, err, code = yield self.ssh(devkey, "dev", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"access: initiate\n", out)

    @defer.inlineCallbacks
    def test_unknown_fingerprint(self) -> Any:
        """A fingerprint that is neither in the file nor connected is an error."""
        out, err, code = yield self.admin("grant", "SHA256:" + "A" * 43, "listen")
        self.assertEqual(code, 1)
        self.assertIn(b"none is connected", err)


class _Identity:
    def __init__(self, blob: bytes, username: str = "dev", peer: str = "192.0.2.1") -> None:
        self.key_blob = blob
        self.fingerprint = fingerprint(blob)
        self.username = username
        self.peer = peer


class _Avatar:
    def __init__(self, identity: Any, factory: Any) -> None:
        self.identity = identity
        self.factory = factory
        self.conn = None


class EditUnitTests(unittest.TestCase):
    """The authorized_keys edits without a server: a key known only from its connection."""

    def setUp(self) -> None:
        from nuttconch.authkeys import AuthorizedKeysFile

        from .harness import make_key

        directory = self.mktemp()
        os.makedirs(directory)
        _, public = make_key(directory, "dev")
        self.blob = base64.b64decode(public.split()[1])
        _, admin_public = make_key(directory, "root")
        self.path = os.path.join(directory, "authorized_keys")
        with open(self.path, "w") as handle:
            handle.write(COMMENTS + 'access="admin" ' + admin_public + "\n")
        factory = type("F", (), {})()
        factory.keysFile = AuthorizedKeysFile(self.path)
        factory.avatars = {_Avatar(_Identity(self.blob), factory)}
        factory.config = type("C", (), {"allow_new_clients": True})()
        self.admin = _Avatar(_Identity(base64.b64decode(admin_public.split()[1])), factory)

    def test_ban_connected_key_not_in_file(self) -> None:
        """A connected key missing from the file is banned by a new line."""
        result = admin.ban(self.admin, [fingerprint(self.blob)])
        self.assertEqual(result.code, 0, result.err)
        self.assertIn("new line added", result.out)
        with open(self.path) as handle:
            text = handle.read()
        self.assertTrue(text.startswith(COMMENTS))
        last = parse_line(text.splitlines()[-1])
        assert last is not None
        self.assertEqual((last.blob, last.access), (self.blob, frozenset({"denied"})))
        self.assertEqual(last.comment, "dev@192.0.2.1 (banned by admin)")

    def test_grant_connected_key_not_in_file(self) -> None:
        """grant of a connected key missing from the file adds a line with the access."""
        result = admin.grant(self.admin, [fingerprint(self.blob), "listen,initiate"])
        self.assertEqual(result.code, 0, result.err)
        with open(self.path) as handle:
            last = parse_line(handle.read().splitlines()[-1])
        assert last is not None
        self.assertEqual(last.access, frozenset({"listen", "initiate"}))
