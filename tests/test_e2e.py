"""End-to-end flows of the seed README, driven by the real OpenSSH client."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer
from twisted.trial import unittest

from .harness import SwitchboardTestMixin, listen_echo


class InitiatorAndClientTests(SwitchboardTestMixin, unittest.TestCase):
    """An initiator with ssh -R, reached by clients with -W and -L."""

    @defer.inlineCallbacks
    def test_greeting_shows_client_command(self) -> defer.Generator:
        """ssh -n -R prints a greeting with the exact client command for its port."""
        target = listen_echo(self)
        key = self.key("k1")
        proc = self.spawn(key, "user1", "-n", "-R", f"6379:localhost:{target}", stdin=None)
        yield proc.waitOutput(b"-N -L 6379:")
        listener = yield self.waitPort(6379)
        out = bytes(proc.out).decode()
        self.assertIn("Welcome to nuttconch, user1.", out)
        expected = f"ssh switchboard -p {self.port} -N -L 6379:{listener.connect_name}:6379"
        self.assertIn(expected, out)
        self.assertRegex(listener.connect_name, r"^user1-[0-9a-z]{7}$")

    @defer.inlineCallbacks
    def test_stdio_circuit_carries_bytes_both_ways(self) -> defer.Generator:
        """ssh -W alias:port reaches the initiator's local service, bytes intact."""
        target = listen_echo(self)
        yield self.initiator(self.key("k1"), "user1", f"6379:localhost:{target}")
        name = self.registry.listeners()[0].connect_name
        payload = os.urandom(1024 * 1024)
        out, err, code = yield self.ssh(
            self.key("k2"), "user2", "-W", f"{name}:6379", stdin=payload
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out), len(payload))
        self.assertEqual(hashlib.sha256(out).hexdigest(), hashlib.sha256(payload).hexdigest())

    @defer.inlineCallbacks
    def test_unknown_name_is_a_clear_open_failure(self) -> defer.Generator:
        """A circuit to a name nobody holds fails with 'no such listener'."""
        out, err, code = yield self.ssh(self.key("k2"), "user2", "-W", "nosuch:22", stdin=b"x")
        self.assertEqual(code, 255)
        self.assertIn(b"open failed: connect failed: no such listener: nosuch", err)

    @defer.inlineCallbacks
    def test_whoami(self) -> defer.Generator:
        """ssh host whoami prints the caller's names and permissions."""
        out, err, code = yield self.ssh(self.key("k1"), "User1", command=("whoami",))
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("hostname: user1\n", text)
        self.assertRegex(text, r"names: user1-[0-9a-z]{7}\n")
        self.assertIn("access: initiate, listen\n", text)


class RekeyTests(SwitchboardTestMixin, unittest.TestCase):
    """Client-initiated rekeys mid-circuit (OpenSSH RekeyLimit) keep the data intact."""

    @defer.inlineCallbacks
    def test_rekey_limit_256k_both_ends(self) -> defer.Generator:
        """16 MiB through a circuit whose both ends rekey every 256 KiB arrive intact."""
        target = listen_echo(self)
        rekey = ("-o", "RekeyLimit=256K")
        yield self.initiator(self.key("k1"), "user1", f"6379:localhost:{target}", extra=rekey)
        name = self.registry.listeners()[0].connect_name
        payload = os.urandom(16 * 1024 * 1024)
        out, err, code = yield self.ssh(
            self.key("k2"), "user2", *rekey, "-W", f"{name}:6379", stdin=payload, timeout=60
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(payload).digest())
