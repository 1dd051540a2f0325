"""The real OpenSSH client negotiates each cipher/MAC, carries 32 MiB and rekeys mid-transfer."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer
from twisted.trial import unittest

from nuttconch.transport import SwitchboardTransport

from .harness import SwitchboardTestMixin, listen_echo

TOTAL = 32 * 1024 * 1024
_DATA: bytes | None = None


def data() -> bytes:
    global _DATA
    if _DATA is None:
        _DATA = os.urandom(TOTAL)
    return _DATA


class CipherCircuitTests(SwitchboardTestMixin, unittest.TestCase):
    """Each mode end to end: ssh -c/-m on both circuit ends, RekeyLimit=1M, bytes intact."""

    @defer.inlineCallbacks
    def circuit(
        self, cipher: str, mac: str | None, rekey: str | None = "1M", total: int = TOTAL
    ) -> defer.Generator:
        opts = ["-v", "-c", cipher]
        if mac:
            opts += ["-m", mac]
        if rekey:
            opts += ["-o", f"RekeyLimit={rekey}"]
        target = listen_echo(self)
        initiator = yield self.initiator(
            self.key("k1"), "dev", f"9000:localhost:{target}", extra=tuple(opts)
        )
        name = self.registry.listeners()[0].connect_name
        payload = data()[:total]
        out, err, code = yield self.ssh(
            self.key("k2"), "reader", *opts, "-W", f"{name}:9000", stdin=payload, timeout=120
        )
        self.assertEqual(code, 0, err[-2000:])
        self.assertEqual(len(out), len(payload))
        self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(payload).digest())
        expected_mac = mac or "<implicit>"
        for text in (err, bytes(initiator.err)):
            self.assertIn(
                f"kex: client->server cipher: {cipher} MAC: {expected_mac}".encode(), text
            )
            self.assertIn(
                f"kex: server->client cipher: {cipher} MAC: {expected_mac}".encode(), text
            )
        for t in self.factory.transports:
            self.assertTrue(t.strictKex, "strict KEX was not in force")
            self.assertEqual(t.currentEncryptions.inCipType, cipher.encode())
            self.assertEqual(t.currentEncryptions.outCipType, cipher.encode())
        return err, bytes(initiator.err)

    def assertRekeyed(self, err: bytes, at_least: int) -> None:
        kexes = err.count(b"SSH2_MSG_NEWKEYS received")
        self.assertGreaterEqual(kexes, at_least, f"only {kexes} key exchanges")

    @defer.inlineCallbacks
    def test_chacha20_poly1305(self) -> defer.Generator:
        """A circuit through chacha20-poly1305 carries its data intact across at least ten rekeys
        on both legs."""
        err, ierr = yield self.circuit("chacha20-poly1305@openssh.com", None)
        self.assertRekeyed(err, 10)
        self.assertRekeyed(ierr, 10)

    @defer.inlineCallbacks
    def test_aes128_gcm(self) -> defer.Generator:
        """A circuit through aes128-gcm carries its data intact across at least ten rekeys."""
        err, ierr = yield self.circuit("aes128-gcm@openssh.com", None)
        self.assertRekeyed(err, 10)

    @defer.inlineCallbacks
    def test_aes256_gcm(self) -> defer.Generator:
        """A circuit through aes256-gcm carries its data intact across at least ten rekeys."""
        err, ierr = yield self.circuit("aes256-gcm@openssh.com", None)
        self.assertRekeyed(err, 10)

    @defer.inlineCallbacks
    def test_aes128_ctr_hmac_sha2_256_etm(self) -> defer.Generator:
        """A circuit through aes128-ctr with hmac-sha2-256-etm carries its data intact across at
        least ten rekeys."""
        err, ierr = yield self.circuit("aes128-ctr", "hmac-sha2-256-etm@openssh.com")
        self.assertRekeyed(err, 10)

    @defer.inlineCallbacks
    def test_aes256_ctr_hmac_sha2_512_etm(self) -> defer.Generator:
        """A circuit through aes256-ctr with hmac-sha2-512-etm carries its data intact across at
        least ten rekeys."""
        err, ierr = yield self.circuit("aes256-ctr", "hmac-sha2-512-etm@openssh.com")
        self.assertRekeyed(err, 10)

    @defer.inlineCallbacks
    def test_aes192_ctr_hmac_sha2_256(self) -> defer.Generator:
        """A circuit through aes192-ctr with hmac-sha2-256 carries its data intact across at least
        ten rekeys."""
        err, ierr = yield self.circuit("aes192-ctr", "hmac-sha2-256")
        self.assertRekeyed(err, 10)

    @defer.inlineCallbacks
    def test_aes128_ctr_hmac_sha2_512(self) -> defer.Generator:
        """A circuit through aes128-ctr with hmac-sha2-512 carries its data intact across at least
        ten rekeys."""
        err, ierr = yield self.circuit("aes128-ctr", "hmac-sha2-512")
        self.assertRekeyed(err, 10)

    @defer.inlineCallbacks
    def test_server_initiated_rekey(self) -> defer.Generator:
        """With no client RekeyLimit the server's own limit rekeys every mode."""
        self.patch(SwitchboardTransport, "rekeyLimit", 1024 * 1024)
        for cipher, mac in (
            ("chacha20-poly1305@openssh.com", None),
            ("aes256-gcm@openssh.com", None),
            ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
        ):
            err, ierr = yield self.circuit(cipher, mac, rekey=None, total=8 * 1024 * 1024)
            self.assertRekeyed(err, 4)
            self.assertRekeyed(ierr, 4)
            yield self.stopServer()
            self.startServer()

    @defer.inlineCallbacks
    def test_default_is_chacha20_with_strict_kex(self) -> defer.Generator:
        """A stock OpenSSH client lands on OpenSSH 9's first choice, with strict KEX."""
        out, err, code = yield self.ssh(self.key("k1"), "u", "-v", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(
            b"kex: server->client cipher: chacha20-poly1305@openssh.com MAC: <implicit>", err
        )

    @defer.inlineCallbacks
    def test_configured_lists_are_offered(self) -> defer.Generator:
        """ciphers/macs in nuttssh.ini restrict what a client can get."""
        yield self.stopServer()
        self.startServer(ciphers="aes256-ctr", macs="hmac-sha2-512-etm@openssh.com")
        out, err, code = yield self.ssh(self.key("k1"), "u", "-v", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(
            b"kex: server->client cipher: aes256-ctr MAC: hmac-sha2-512-etm@openssh.com", err
        )
        out, err, code = yield self.ssh(
            self.key("k1"), "u", "-c", "aes128-gcm@openssh.com", command=("whoami",)
        )
        self.assertEqual(code, 255)
        self.assertIn(b"no matching cipher found", err)
