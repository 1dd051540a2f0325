"""OpenSSH user certificates and revoked keys (issue 12.3).

Certificates are made by the real ``ssh-keygen -s`` and, end to end, used by
the real ``ssh`` (``-i key`` with ``key-cert.pub`` beside it). Unit tests are
tables: each row a certificate, a login and what must come of it.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
import tempfile
import time
from typing import Any

from twisted.conch.ssh import keys
from twisted.internet import defer
from twisted.python.procutils import which
from twisted.trial import unittest

from nuttconch import authkeys, certs, policy
from nuttconch import config as configmod

from .harness import SwitchboardTestMixin, listen_echo, missing
from .rawssh import NS, connect_client
from .test_auth_security import MSG_USERAUTH_FAILURE, MSG_USERAUTH_REQUEST, MSG_USERAUTH_SUCCESS
from .test_threats import LogCapture

SSH_KEYGEN = (which("ssh-keygen") or [None])[0]


def _keygen(*args: str, cwd: str) -> None:
    subprocess.run(
        [SSH_KEYGEN or "ssh-keygen", "-q", *args],
        cwd=cwd,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


class CertMaker:
    """CA keys and user keys in one directory; `sign` writes NAME and NAME-cert.pub."""

    def __init__(self, directory: str) -> None:
        if SSH_KEYGEN is None:
            missing("ssh-keygen", "apt-get install openssh-client")
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        for name in ("ca", "ca2", "user"):
            _keygen("-t", "ed25519", "-N", "", "-C", name, "-f", name, cwd=directory)
        _keygen("-t", "ecdsa", "-N", "", "-C", "ca-ecdsa", "-f", "ca-ecdsa", cwd=directory)
        _keygen("-t", "rsa", "-b", "2048", "-N", "", "-C", "rsa", "-f", "rsa", cwd=directory)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def public(self, name: str) -> str:
        with open(self.path(name + ".pub")) as handle:
            return " ".join(handle.read().split()[:2])

    def sign(
        self,
        name: str,
        *,
        ca: str = "ca",
        ident: str = "dev42-id",
        principals: str | None = "dev42",
        validity: str = "-5m:+1h",
        options: tuple[str, ...] = (),
        serial: int | None = None,
        key: str = "user",
        host: bool = False,
    ) -> str:
        """Sign a copy of ``key`` as NAME; returns NAME's path (the private key for ssh -i)."""
        shutil.copy(self.path(key), self.path(name))
        os.chmod(self.path(name), 0o600)
        shutil.copy(self.path(key + ".pub"), self.path(name + ".pub"))
        args = ["-s", ca, "-I", ident, "-V", validity]
        if principals is not None:
            args += ["-n", principals]
        if serial is not None:
            args += ["-z", str(serial)]
        if host:
            args.append("-h")
        for option in options:
            args += ["-O", option]
        _keygen(*args, name + ".pub", cwd=self.dir)
        return self.path(name)

    def cert_blob(self, name: str) -> bytes:
        with open(self.path(name + "-cert.pub")) as handle:
            return base64.b64decode(handle.read().split()[1])

    def cert_line(self, name: str) -> str:
        with open(self.path(name + "-cert.pub")) as handle:
            return " ".join(handle.read().split()[:2])

    def blob(self, name: str) -> bytes:
        return base64.b64decode(self.public(name).split()[1])


_MAKER: CertMaker | None = None


def maker() -> CertMaker:
    """One set of CA and user keys per test run (key generation is the slow part)."""
    global _MAKER
    if _MAKER is None:
        _MAKER = CertMaker(tempfile.mkdtemp(prefix="nuttconch-certs-"))
    return _MAKER


def _wire(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        (n,) = struct.unpack(">I", blob[pos : pos + 4])
        out.append(blob[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


class CheckTableTests(unittest.SynchronousTestCase):
    """Each row: how the certificate is signed, who logs in from where, what results."""

    CASES: list[tuple[str, dict[str, Any], str, str, tuple[str, ...], dict[str, Any] | str]] = [
        (
            "valid",
            {},
            "dev42",
            "127.0.0.1",
            (),
            {
                "principal": "dev42",
                "key_id": "dev42-id",
                "permit_pty": True,
                "permit_port_forwarding": True,
                "force_command": None,
            },
        ),
        ("second principal", {"principals": "dev41,dev42"}, "dev42", "127.0.0.1", (), {}),
        ("expired", {"validity": "-2h:-1h"}, "dev42", "127.0.0.1", (), "expired at"),
        ("not yet valid", {"validity": "+1h:+2h"}, "dev42", "127.0.0.1", (), "not valid before"),
        ("forever", {"validity": "always:forever"}, "dev42", "127.0.0.1", (), {}),
        (
            "wrong principal",
            {},
            "dev43",
            "127.0.0.1",
            (),
            "not valid for user dev43 (it names dev42)",
        ),
        ("no principals", {"principals": None}, "dev42", "127.0.0.1", (), "names no principals"),
        (
            "source-address mismatch",
            {"options": ("source-address=10.0.0.0/8,192.168.0.0/16",)},
            "dev42",
            "127.0.0.1",
            (),
            "not valid from 127.0.0.1",
        ),
        (
            "source-address match",
            {"options": ("source-address=10.0.0.0/8,127.0.0.0/8",)},
            "dev42",
            "127.0.0.1",
            (),
            {},
        ),
        (
            "source-address match, v4-mapped peer",
            {"options": ("source-address=127.0.0.1/32",)},
            "dev42",
            "::ffff:127.0.0.1",
            (),
            {},
        ),
        (
            "source-address IPv6",
            {"options": ("source-address=2001:db8::/32,10.0.0.0/8",)},
            "dev42",
            "2001:db8::7",
            (),
            {},
        ),
        (
            "source-address IPv6 mismatch",
            {"options": ("source-address=2001:db8::/32",)},
            "dev42",
            "2001:db9::7",
            (),
            "not valid from 2001:db9::7",
        ),
        (
            "force-command",
            {"options": ("force-command=whoami",)},
            "dev42",
            "127.0.0.1",
            (),
            {"force_command": "whoami"},
        ),
        (
            "no-port-forwarding",
            {"options": ("no-port-forwarding",)},
            "dev42",
            "127.0.0.1",
            (),
            {"permit_port_forwarding": False, "permit_pty": True},
        ),
        ("no-pty", {"options": ("no-pty",)}, "dev42", "127.0.0.1", (), {"permit_pty": False}),
        (
            "clear",
            {"options": ("clear",)},
            "dev42",
            "127.0.0.1",
            (),
            {"permit_pty": False, "permit_port_forwarding": False},
        ),
        (
            "unknown critical option",
            {"options": ("critical:verify-hostname=x",)},
            "dev42",
            "127.0.0.1",
            (),
            "unsupported critical option verify-hostname",
        ),
        (
            "unknown extension is ignored",
            {"options": ("extension:foo@example.com",)},
            "dev42",
            "127.0.0.1",
            (),
            {},
        ),  # fmt: skip
        ("principals= allows", {}, "dev42", "127.0.0.1", ("dev4*,other",), {}),
        (
            "principals= restricts",
            {},
            "dev42",
            "127.0.0.1",
            ("web*", "db1"),
            "may not vouch for the name dev42",
        ),
    ]

    def test_table(self) -> None:
        """Each row: a certificate signed as described is admitted or refused as expected."""
        m = maker()
        now = time.time()
        for label, sign, user, peer, principals, expected in self.CASES:
            m.sign("t", **sign)
            cert = certs.parse(m.cert_blob("t"), b"ssh-ed25519-cert-v01@openssh.com")
            self.assertEqual(cert.ca_blob, m.blob("ca"), label)
            self.assertEqual(cert.key_blob, m.blob("user"), label)
            if isinstance(expected, str):
                with self.assertRaises(certs.CertificateError, msg=label) as caught:
                    certs.check(cert, user, peer, now, principals)
                self.assertIn(expected, str(caught.exception), label)
            else:
                login = certs.check(cert, user, peer, now, principals)
                for attr, value in expected.items():
                    self.assertEqual(getattr(login, attr), value, f"{label}: {attr}")

    def test_ecdsa_ca_and_serial(self) -> None:
        """An ECDSA CA's signature verifies and its serial and key id reach the log description."""
        m = maker()
        m.sign("t", ca="ca-ecdsa", serial=77)
        cert = certs.parse(m.cert_blob("t"), b"ssh-ed25519-cert-v01@openssh.com")
        self.assertEqual(cert.serial, 77)
        self.assertEqual(cert.ca_blob, m.blob("ca-ecdsa"))
        self.assertIn('ID "dev42-id" serial 77 CA SHA256:', cert.describe())

    def test_policy_table(self) -> None:
        """The certificate as a KeyPolicy, and narrowed with its CA line's options."""
        m = maker()
        line = policy.KeyPolicy.from_options
        rows: list[tuple[str, tuple[str, ...], str, Any, dict[str, Any] | str]] = [
            (
                "all permitted",
                (),
                "-5m:+1h",
                line([]),
                {"port_forwarding": True, "pty": True, "command": None},
            ),  # fmt: skip
            (
                "no-port-forwarding",
                ("no-port-forwarding",),
                "-5m:+1h",
                line([]),
                {"port_forwarding": False, "pty": True},
            ),  # fmt: skip
            ("no-pty", ("no-pty",), "-5m:+1h", line([]), {"pty": False}),
            (
                "force-command",
                ("force-command=whoami",),
                "-5m:+1h",
                line([]),
                {"command": "whoami"},
            ),  # fmt: skip
            (
                "force-command not a nuttconch command",
                ("force-command=/bin/sh",),
                "-5m:+1h",
                line([]),
                "not a nuttconch command",
            ),  # fmt: skip
            (
                "CA line restrict wins",
                (),
                "-5m:+1h",
                line([("restrict", None)]),
                {"port_forwarding": False, "pty": False},
            ),  # fmt: skip
            (
                "CA line command and force-command differ",
                ("force-command=whoami",),
                "-5m:+1h",
                line([("command", "listeners")]),
                "differ",
            ),  # fmt: skip
            ("expires with the certificate", (), "-5m:+1h", line([]), {"expires": "cert"}),
            ("forever: no expiry", (), "always:forever", line([]), {"expires": None}),
            (
                "CA line expiry-time earlier",
                (),
                "always:forever",
                line([("expiry-time", "20200101")]),
                {"expires": 1577836800.0},
            ),  # fmt: skip
        ]
        for label, options, validity, ca_policy, expected in rows:
            m.sign("t", options=options, validity=validity)
            cert = certs.parse(m.cert_blob("t"))
            login = certs.check(cert, "dev42", "127.0.0.1", time.time())
            if isinstance(expected, str):
                with self.assertRaises(policy.PolicyError, msg=label) as caught:
                    certs.login_policy(ca_policy, login)
                self.assertIn(expected, str(caught.exception), label)
                continue
            result = certs.login_policy(ca_policy, login)
            for attr, value in expected.items():
                if value == "cert":
                    value = float(cert.valid_before)
                self.assertEqual(getattr(result, attr), value, f"{label}: {attr}")


class HostileCertificateTests(unittest.SynchronousTestCase):
    """Malformed, huge and forged certificates: one CertificateError with a clear text."""

    def test_table(self) -> None:
        """Each malformed, huge or forged certificate: one clear CertificateError."""
        m = maker()
        m.sign("t")
        good = m.cert_blob("t")
        parts = _wire(good)
        ed_alg = b"ssh-ed25519-cert-v01@openssh.com"
        # Principals changed after signing (the signature no longer covers them).
        forged = good.replace(NS(b"dev42"), NS(b"root1"))
        m.sign("h", host=True, principals="host.example")
        rows: list[tuple[str, bytes, bytes | None, str]] = [
            ("huge", good + b"\0" * (certs.MAX_CERT_BYTES), ed_alg, "certificate too large"),
            ("truncated", good[: len(good) // 2], ed_alg, "malformed certificate"),
            ("trailing bytes", good + b"xx", ed_alg, "malformed certificate"),
            ("empty", b"", ed_alg, "malformed certificate"),
            ("type only", NS(ed_alg), ed_alg, "malformed certificate"),
            ("random body", NS(ed_alg) + os.urandom(300), ed_alg, "malformed certificate"),
            ("huge length field", NS(ed_alg) + b"\xff\xff\xff\xf0", ed_alg, "malformed"),
            (
                "unknown cert type",
                NS(b"ssh-foo-cert-v01@openssh.com") + good[40:],
                None,
                "unsupported certificate type",
            ),  # fmt: skip
            ("plain key blob", m.blob("user"), None, "unsupported certificate type"),
            ("algorithm mismatch", good, b"rsa-sha2-512-cert-v01@openssh.com", "does not fit"),
            ("forged principals", forged, ed_alg, "CA signature does not verify"),
            ("host certificate", m.cert_blob("h"), ed_alg, "host certificate"),
            (
                "escape in type",
                NS(b"\x1b[31m-cert-v01@openssh.com") + b"x",
                None,
                "unsupported certificate type \\x1b[31m",
            ),  # fmt: skip
        ]
        self.assertEqual(parts[0], ed_alg)
        for label, blob, alg, expected in rows:
            with self.assertRaises(certs.CertificateError, msg=label) as caught:
                certs.parse(blob, alg)
            self.assertIn(expected, str(caught.exception), label)
            self.assertLess(len(str(caught.exception)), 300, label)

    def test_many_principals(self) -> None:
        """More principals than OpenSSH's limit (no tool signs that): refused before the
        signature is even checked."""
        m = maker()
        m.sign("t")
        many = b"".join(NS(f"p{i}".encode()) for i in range(certs.MAX_PRINCIPALS + 1))
        blob = m.cert_blob("t").replace(NS(NS(b"dev42")), NS(many))
        with self.assertRaises(certs.CertificateError) as caught:
            certs.parse(blob)
        self.assertIn("more than 256 principals", str(caught.exception))


class RevokedKeysTests(unittest.SynchronousTestCase):
    """A plain key list and OpenSSH KRLs; the KRL verdicts are checked against ssh-keygen -Q."""

    def setUp(self) -> None:
        self.m = maker()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.m.sign("serial5", serial=5, ident="dev-five")
        self.m.sign("serial9", serial=9, ident="dev-nine")
        self.m.sign("other-ca", ca="ca2", serial=5, ident="dev-five")

    def verdict(self, path: str, name: str) -> str | None:
        cert = certs.parse(self.m.cert_blob(name))
        return certs.RevokedKeys(path).revoked(cert.key_blob, cert)

    def krl(self, spec: str, *, ca: str | None = "ca") -> str:
        path = os.path.join(self.dir, "krl")
        spec_path = os.path.join(self.dir, "spec")
        with open(spec_path, "w") as handle:
            handle.write(spec + "\n")
        args = ["-k", "-f", path]
        if ca:
            args += ["-s", self.m.path(ca + ".pub")]
        if os.path.exists(path):
            os.unlink(path)
        _keygen(*args, spec_path, cwd=self.dir)
        return path

    def ssh_keygen_says_revoked(self, krl: str, name: str) -> bool:
        done = subprocess.run(
            [SSH_KEYGEN or "ssh-keygen", "-Q", "-f", krl, self.m.path(name + "-cert.pub")],
            capture_output=True,
        )
        return done.returncode != 0

    def test_krl_table(self) -> None:
        """Each KRL row revokes exactly what ssh-keygen -Q says it revokes."""
        user_pub = self.m.public("user")
        ca_pub = self.m.public("ca")
        rows: list[tuple[str, str, str | None, str, str | None]] = [
            ("serial", "serial: 5", "ca", "serial5", "this certificate is revoked"),
            ("serial, other cert", "serial: 5", "ca", "serial9", None),
            ("serial, other CA", "serial: 5", "ca", "other-ca", None),
            ("serial range", "serial: 3-7", "ca", "serial5", "this certificate is revoked"),
            ("serial range, outside", "serial: 6-8", "ca", "serial5", None),
            (
                "many serials (bitmap)",
                "\n".join(f"serial: {n}" for n in range(1, 200, 2)),
                "ca",
                "serial9",
                "this certificate is revoked",
            ),  # fmt: skip
            ("key id", "id: dev-nine", "ca", "serial9", "this certificate is revoked"),
            ("key id, other", "id: dev-nine", "ca", "serial5", None),
            ("key", f"key: {user_pub}", None, "serial5", "this key is revoked"),
            ("sha1", f"sha1: {user_pub}", None, "serial5", "this key is revoked"),
            ("sha256", f"sha256: {user_pub}", None, "serial5", "this key is revoked"),
            ("CA key", f"key: {ca_pub}", None, "serial5", "the certificate's authority is revoked"),
            ("CA key, other CA", f"key: {ca_pub}", None, "other-ca", None),
        ]
        for label, spec, ca, name, expected in rows:
            path = self.krl(spec, ca=ca)
            self.assertEqual(self.verdict(path, name), expected, label)
            self.assertEqual(
                self.ssh_keygen_says_revoked(path, name), expected is not None, f"{label}: -Q"
            )

    def test_key_list_table(self) -> None:
        """Each plain revoked-keys list revokes the listed keys and certificates only."""
        path = os.path.join(self.dir, "revoked_keys")
        rows: list[tuple[str, str, str, str | None]] = [
            ("empty", "", "serial5", None),
            ("comment only", "# nothing\n", "serial5", None),
            ("the key", self.m.public("user") + " lost laptop\n", "serial5", "this key is revoked"),
            (
                "the certificate",
                self.m.cert_line("serial9") + "\n",
                "serial5",
                "this key is revoked",
            ),  # fmt: skip
            (
                "the CA",
                self.m.public("ca") + "\n",
                "serial5",
                "the certificate's authority is revoked",
            ),  # fmt: skip
            ("another CA", self.m.public("ca2") + "\n", "serial5", None),
            (
                "junk and the key",
                "garbage\n" + self.m.public("user") + "\n",
                "serial5",
                "this key is revoked",
            ),  # fmt: skip
        ]
        for label, text, name, expected in rows:
            with open(path, "w") as handle:
                handle.write(text)
            os.utime(path, ns=(time.time_ns(), time.time_ns() + len(label)))
            self.assertEqual(self.verdict(path, name), expected, label)

    def test_reload_and_fail_closed(self) -> None:
        """An unreadable revoked-keys file refuses logins until readable; changes are seen."""
        path = os.path.join(self.dir, "revoked_keys")
        revoked = certs.RevokedKeys(path)
        blob = self.m.blob("user")
        with self.assertRaises(certs.RevokedKeysUnavailable):
            revoked.revoked(blob)
        with open(path, "w") as handle:
            handle.write("")
        self.assertIsNone(revoked.revoked(blob))
        with open(path, "w") as handle:
            handle.write(self.m.public("user") + "\n")
        self.assertEqual(revoked.revoked(blob), "this key is revoked")
        with open(path, "wb") as handle:
            handle.write(certs.KRL_MAGIC + b"\0\0\0\1garbage")
        with self.assertRaises(certs.RevokedKeysUnavailable):
            revoked.revoked(blob)
        os.unlink(path)
        with self.assertRaises(certs.RevokedKeysUnavailable):
            revoked.revoked(blob)

    def test_config_key(self) -> None:
        """[keys] revoked_keys_file is read from the config and empty by default."""
        path = os.path.join(self.dir, "nuttssh.ini")
        with open(path, "w") as handle:
            handle.write("[keys]\nrevoked_keys_file = /etc/ssh/revoked_keys\n")
        self.assertEqual(configmod.load(path).revoked_keys_file, "/etc/ssh/revoked_keys")
        with open(path, "w") as handle:
            handle.write("[keys]\n")
        self.assertEqual(configmod.load(path).revoked_keys_file, "")


class CertificateLoginTests(SwitchboardTestMixin, unittest.TestCase):
    """The real ssh with certificates made by ssh-keygen -s."""

    settings = {"allow_new_clients": "false"}
    CA_OPTIONS = 'cert-authority,access="initiate",access="listen",access="list"'

    def setUp(self) -> Any:
        result = super().setUp()
        self.m = maker()
        self.logs = LogCapture().start(self)
        self.addAuthorized(self.m.public("ca"), self.CA_OPTIONS, "fleet CA")
        return result

    keysSection = ""

    def writeConfig(self, **overrides: str) -> str:
        """The harness writes [keys] last; lines appended here belong to it."""
        path = super().writeConfig(**overrides)
        with open(path, "a") as handle:
            handle.write(self.keysSection)
        return path

    def readKeys(self) -> str:
        with open(self.akfile) as handle:
            return handle.read()

    @defer.inlineCallbacks
    def test_logins_table(self) -> Any:
        """Valid, expired, not yet valid, wrong principal, wrong CA, source-address."""
        rows: list[tuple[str, dict[str, Any], str, bytes | None]] = [
            ("valid", {}, "dev42", None),
            ("expired", {"validity": "-2h:-1h"}, "dev42", b"the certificate expired at"),
            (
                "not yet valid",
                {"validity": "+1h:+2h"},
                "dev42",
                b"the certificate is not valid before",
            ),
            ("wrong principal", {}, "dev43", b"the certificate is not valid for user dev43"),
            ("wrong CA", {"ca": "ca2"}, "dev42", b"this certificate's authority is not trusted"),
            (
                "source-address",
                {"options": ("source-address=10.1.0.0/16",)},
                "dev42",
                b"the certificate is not valid from 127.0.0.1",
            ),  # fmt: skip
        ]
        for i, (label, sign, user, refusal) in enumerate(rows):
            key = self.m.sign(f"e2e{i}", **sign)
            out, err, code = yield self.ssh(key, user, command=("whoami",))
            if refusal is None:
                self.assertEqual(code, 0, f"{label}: {err!r}")
                self.assertIn(b"hostname: dev42", out, label)
                self.assertIn(b"access: initiate, list, listen", out, label)
            else:
                self.assertEqual(code, 255, f"{label}: {out!r}")
                self.assertIn(b"nuttconch: " + refusal, err, label)
                self.assertIn(b"Permission denied", err, label)
        log = self.logs.out.getvalue()
        self.assertIn("authenticated dev42 key SHA256:", log)
        self.assertIn('with certificate ID "dev42-id" serial 0 CA SHA256:', log)
        self.assertIn('certificate ID "dev42-id" serial 0 CA', log)
        self.assertIn("refused: the certificate expired at", log)

    @defer.inlineCallbacks
    def test_rsa_key_ecdsa_ca(self) -> Any:
        """An RSA key certified by an ECDSA CA: OpenSSH offers rsa-sha2-512-cert-v01 and
        it logs in; the same CA's line with access="list" gives exactly that."""
        self.addAuthorized(self.m.public("ca-ecdsa"), 'cert-authority,access="list"', "ecdsa CA")
        key = self.m.sign("rsa-cert", ca="ca-ecdsa", key="rsa", ident="rsa-dev")
        out, err, code = yield self.ssh(key, "dev42", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"access: list\n", out)
        self.assertIn('with certificate ID "rsa-dev"', self.logs.out.getvalue())

    @defer.inlineCallbacks
    def test_denied_key_and_denied_ca(self) -> Any:
        """A certified key whose own line says access="denied" is refused, and so is every
        certificate of a CA whose line is denied."""
        key = self.m.sign("den")
        self.addAuthorized(self.m.public("user"), 'access="denied"', "stolen")
        out, err, code = yield self.ssh(key, "dev42", command=("whoami",))
        self.assertEqual(code, 255, out)
        self.assertIn(b"nuttconch: this key is denied", err)
        with open(self.akfile, "w") as handle:
            handle.write(f'access="denied",{self.CA_OPTIONS} {self.m.public("ca")}\n')
        out, err, code = yield self.ssh(key, "dev42", command=("whoami",))
        self.assertEqual(code, 255, out)
        self.assertIn(b"nuttconch: this certificate's authority is denied", err)

    @defer.inlineCallbacks
    def test_force_command(self) -> Any:
        """force-command replaces what the client asks for (here `listeners`) and the shell."""
        key = self.m.sign("forced", options=("force-command=whoami",))
        out, err, code = yield self.ssh(key, "dev42", command=("listeners",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: dev42", out)
        self.assertNotIn(b"listener", out.lower().replace(b"hostname", b""))
        out, err, code = yield self.ssh(key, "dev42", "-T")
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: dev42", out)
        self.assertIn("dev42 runs whoami", self.logs.out.getvalue())

    @defer.inlineCallbacks
    def test_no_port_forwarding(self) -> Any:
        """Without permit-port-forwarding neither -R nor -W works; a certificate with it can."""
        key = self.m.sign("nofwd", options=("no-port-forwarding",))
        out, err, code = yield self.ssh(key, "dev42", "-N", "-R", "8080:localhost:9")
        self.assertEqual(code, 255)
        self.assertIn(b"remote port forwarding failed for listen port 8080", err)
        self.assertEqual(list(self.registry.listeners()), [])
        echo = listen_echo(self, b"dev:")
        ok = self.m.sign("fwd")
        yield self.initiator(ok, "dev42", f"8080:localhost:{echo}")
        name = self.registry.listeners()[0].connect_name
        out, err, code = yield self.ssh(key, "dev42", "-W", f"{name}:8080", stdin=b"hi")
        self.assertNotEqual(code, 0)
        self.assertIn(b"administratively prohibited", err)
        out, err, code = yield self.ssh(ok, "dev42", "-W", f"{name}:8080", stdin=b"hi")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"dev:hi")

    @defer.inlineCallbacks
    def test_no_pty(self) -> Any:
        """Without permit-pty the pty request is refused (and logged); with it, granted.

        (With -tt and a refused pty, OpenSSH 9.2's client ends with status 255 and no
        output, whatever the reason for the refusal: allow_pty = false does the same.)
        """
        key = self.m.sign("nopty", options=("no-pty",))
        out, err, code = yield self.ssh(key, "dev42", "-tt", command=("whoami",))
        self.assertIn(b"PTY allocation request failed", err)
        self.assertIn(
            "has no-pty or restrict (its certificate lacks permit-pty)", self.logs.out.getvalue()
        )
        key = self.m.sign("pty")
        out, err, code = yield self.ssh(key, "dev42", "-tt", command=("whoami",))
        self.assertNotIn(b"PTY allocation request failed", err)
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: dev42\r\n", out)

    @defer.inlineCallbacks
    def test_revoked(self) -> Any:
        """revoked_keys_file as a key list, then as a KRL revoking the serial; a revoked CA;
        a missing file refuses every key login."""
        yield self.stopServer()
        revoked = os.path.join(self.dir, "revoked_keys")
        with open(revoked, "w") as handle:
            handle.write(self.m.public("user") + "\n")
        self.keysSection = f"revoked_keys_file = {revoked}\n"
        self.startServer()
        key = self.m.sign("rev", serial=12, ident="lost-device")
        out, err, code = yield self.ssh(key, "dev42", command=("whoami",))
        self.assertEqual(code, 255, out)
        self.assertIn(b"nuttconch: this key is revoked", err)
        with open(revoked, "w") as handle:
            handle.write(self.m.public("ca2") + "\n")
        out, err, code = yield self.ssh(key, "dev42", command=("whoami",))
        self.assertEqual(code, 0, err)
        spec = os.path.join(self.dir, "spec")
        with open(spec, "w") as handle:
            handle.write("serial: 12\n")
        os.unlink(revoked)
        _keygen("-k", "-f", revoked, "-s", self.m.path("ca.pub"), spec, cwd=self.dir)
        out, err, code = yield self.ssh(key, "dev42", command=("whoami",))
        self.assertEqual(code, 255, out)
        self.assertIn(b"nuttconch: this certificate is revoked", err)
        other = self.m.sign("rev2", serial=13)
        out, err, code = yield self.ssh(other, "dev42", command=("whoami",))
        self.assertEqual(code, 0, err)
        with open(revoked, "w") as handle:
            handle.write(self.m.public("ca") + "\n")
        out, err, code = yield self.ssh(other, "dev42", command=("whoami",))
        self.assertIn(b"nuttconch: the certificate's authority is revoked", err)
        os.unlink(revoked)
        out, err, code = yield self.ssh(other, "dev42", command=("whoami",))
        self.assertIn(b"cannot read its revoked keys list", err)
        self.assertIn("is unavailable", self.logs.out.getvalue())
        self.assertIn("login refused for dev42: revoked", self.logs.out.getvalue())

    @defer.inlineCallbacks
    def test_first_use_never_appends_a_certificate(self) -> Any:
        """With trust on first use on, a certificate of an unknown CA (offered alone) is
        refused and nothing is written; a plain key still gets first use."""
        yield self.stopServer()
        self.startServer(allow_new_clients="true")
        before = self.readKeys()
        key = self.m.sign("stranger", ca="ca2")
        only_certs = ("-o", "PubkeyAcceptedAlgorithms=ssh-ed25519-cert-v01@openssh.com")
        out, err, code = yield self.ssh(key, "dev42", *only_certs, command=("whoami",))
        self.assertEqual(code, 255, out)
        self.assertIn(b"authority is not trusted here", err)
        self.assertEqual(self.readKeys(), before)
        self.assertNotIn("cert", self.readKeys().replace("cert-authority", ""))
        # Also a certificate of the trusted CA: logs in, and still nothing is written.
        key = self.m.sign("member")
        out, err, code = yield self.ssh(key, "dev42", *only_certs, command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertEqual(self.readKeys(), before)

    @defer.inlineCallbacks
    def test_ca_line_removed_drops_connection(self) -> Any:
        """An initiator logged in by certificate is disconnected when its CA's line goes;
        an unrelated edit of the file leaves it connected."""
        echo = listen_echo(self, b"dev:")
        key = self.m.sign("live")
        proc = yield self.initiator(key, "dev42", f"8081:localhost:{echo}")
        self.addAuthorized(self.m.public("ca2"), 'access="list"', "unrelated")
        self.factory.checkKeys()  # a small file: re-read and judged at once, here
        self.assertIn(b"unrelated", self.factory.keysFile.entries()[-1].comment.encode())
        self.assertNotIn("closing dev42", self.logs.out.getvalue())
        self.assertIsNone(proc.code)
        self.assertEqual(len(list(self.registry.listeners())), 1)
        with open(self.akfile, "w") as handle:
            handle.write(self.m.public("ca2") + " unrelated\n")
        self.factory.checkKeys()
        yield self.waitFor(lambda: proc.code is not None, what="ssh to be disconnected")
        self.assertIn("closing dev42 (SHA256:", self.logs.out.getvalue())
        self.assertIn("its certificate authority removed", self.logs.out.getvalue())
        self.assertEqual(list(self.registry.listeners()), [])


class CertificateAuthorityOptionsTests(SwitchboardTestMixin, unittest.TestCase):
    """The CA line's own options (12.1) apply to its certificates, at login and live."""

    settings = {"allow_new_clients": "false"}

    def setLine(self, options: str) -> None:
        with open(self.akfile, "w") as handle:
            handle.write(f"{options} {maker().public('ca')} fleet CA\n")

    @defer.inlineCallbacks
    def test_ca_line_options(self) -> Any:
        """expiry-time on the CA line refuses its certificates; a CA line that gains
        no-port-forwarding closes an initiator holding a port; command= differing from the
        certificate's force-command refuses the login."""
        m = maker()
        logs = LogCapture().start(self)
        self.setLine('cert-authority,expiry-time="20200101",access="initiate"')
        key = m.sign("caopt")
        out, err, code = yield self.ssh(key, "dev42", command=("whoami",))
        self.assertEqual(code, 255, out)
        self.assertIn(b"nuttconch: this key expired on 2020-01-01", err)
        self.setLine('cert-authority,access="initiate"')
        echo = listen_echo(self, b"dev:")
        proc = yield self.initiator(key, "dev42", f"8083:localhost:{echo}")
        self.setLine('cert-authority,no-port-forwarding,access="initiate"')
        self.factory.checkKeys()
        yield self.waitFor(lambda: proc.code is not None, what="ssh to be disconnected")
        self.assertIn("no longer allow virtual port 8083", logs.out.getvalue())
        self.setLine('cert-authority,command="listeners",access="list"')
        forced = m.sign("caforced", options=("force-command=whoami",))
        out, err, code = yield self.ssh(forced, "dev42", command=("whoami",))
        self.assertEqual(code, 255, out)
        self.assertIn(b"force-command differ", err)


class KeyStatusTableTests(unittest.SynchronousTestCase):
    """What the admin `keys` command says of cert-authority lines."""

    def test_table(self) -> None:
        """Each cert-authority line gets the status the admin keys command should show."""
        from nuttconch.admin import key_status

        ca = maker().public("ca")
        rows = [
            ("plain", "cert-authority", "in force (certificate authority)"),
            ("denied", 'cert-authority,access="denied"', "denied"),
            ("expired", 'cert-authority,expiry-time="20200101"', "expired 2020-01-01"),
            ("hostname", 'cert-authority,hostname="x"', "invalid: a cert-authority line"),
            ("alias", 'cert-authority,alias="x"', "invalid: a cert-authority line"),
            ("environment", 'cert-authority,environment="A=b"', "invalid: environment="),
        ]
        for label, options, expected in rows:
            entry = authkeys.parse_line(f"{options} {ca}")
            assert entry is not None
            self.assertIn(expected, key_status(entry, time.time()), label)


class CertificateExpiryTests(SwitchboardTestMixin, unittest.TestCase):
    """A connection made with a certificate ends when the certificate expires."""

    settings = {"allow_new_clients": "false"}

    @defer.inlineCallbacks
    def test_expiry_drops_connection(self) -> Any:
        """A certificate valid for 10 more seconds: the initiator is in, then dropped at
        expiry with a log line naming the certificate; its port is gone."""
        m = maker()
        logs = LogCapture().start(self)
        self.addAuthorized(m.public("ca"), 'cert-authority,access="initiate"', "fleet CA")
        echo = listen_echo(self, b"dev:")
        key = m.sign("short", validity="-1m:+10s", ident="short-lived")
        proc = yield self.initiator(key, "dev42", f"8082:localhost:{echo}")
        self.assertIsNone(proc.code)
        yield self.waitFor(lambda: proc.code is not None, timeout=40, what="expiry")
        self.assertIn('certificate ID "short-lived" serial 0 CA', logs.out.getvalue())
        self.assertIn("closing dev42 (SHA256:", logs.out.getvalue())
        self.assertIn("): key expired", logs.out.getvalue())
        self.assertEqual(list(self.registry.listeners()), [])


class RawCertificateAttackTests(SwitchboardTestMixin, unittest.TestCase):
    """Crafted USERAUTH_REQUESTs carrying certificates: refused with a banner, never a crash."""

    settings = {"allow_new_clients": "true"}

    def setUp(self) -> Any:
        result = super().setUp()
        self.m = maker()
        self.logs = LogCapture().start(self)
        self.addAuthorized(self.m.public("ca"), 'cert-authority,access="listen"', "fleet CA")
        return result

    @defer.inlineCallbacks
    def attempt(self, alg: bytes, blob: bytes, user: bytes = b"dev42") -> Any:
        key = keys.Key.fromFile(self.m.path("user"))
        c = yield connect_client(self.port, stage="userauth", user=user)
        self.addCleanup(c.close)
        body = NS(user) + NS(b"ssh-connection") + NS(b"publickey") + b"\x01" + NS(alg) + NS(blob)
        signature = key.sign(NS(c.sessionID) + bytes([MSG_USERAUTH_REQUEST]) + body)
        c.sendPacket(MSG_USERAUTH_REQUEST, body + NS(signature))
        num, _ = yield c.inbox.expect((MSG_USERAUTH_FAILURE, MSG_USERAUTH_SUCCESS), timeout=10)
        banners = b"".join(p for n, p in c.inbox.messages if n == 53)
        c.close()
        return num, banners

    @defer.inlineCallbacks
    def test_hostile_certificates(self) -> Any:
        """Huge, truncated, forged and mismatched certificates: each refused with its reason,
        nothing written to authorized_keys, and a valid one still logs in."""
        self.m.sign("raw")
        good = self.m.cert_blob("raw")
        alg = b"ssh-ed25519-cert-v01@openssh.com"
        before = open(self.akfile).read()
        rows = [
            ("huge", alg, good + b"\0" * 30000, b"certificate too large"),
            ("truncated", alg, good[:100], b"malformed certificate"),
            ("forged", alg, good.replace(NS(b"dev42"), NS(b"admin")), b"does not verify"),
            ("wrong alg", b"ecdsa-sha2-nistp256-cert-v01@openssh.com", good, b"does not fit"),
            ("sha1", b"ssh-rsa-cert-v01@openssh.com", good, b"does not fit"),
        ]
        for label, name, blob, refusal in rows:
            num, banner = yield self.attempt(name, blob)
            self.assertEqual(num, MSG_USERAUTH_FAILURE, label)
            self.assertIn(refusal, banner, label)
        self.assertEqual(open(self.akfile).read(), before)
        num, banner = yield self.attempt(alg, good)
        self.assertEqual(num, MSG_USERAUTH_SUCCESS, banner)
        log = self.logs.out.getvalue()
        self.assertIn("login refused for dev42: bad certificate", log)
        self.assertNotIn("Traceback", log)
        self.assertEqual(open(self.akfile).read(), before)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_plain_key_under_cert_algorithm(self) -> Any:
        """A plain key blob announced as a certificate, and the CA key itself offered as a
        user key: neither logs in (a cert-authority line never admits its own key)."""
        alg = b"ssh-ed25519-cert-v01@openssh.com"
        num, banner = yield self.attempt(alg, self.m.blob("user"))
        self.assertEqual(num, MSG_USERAUTH_FAILURE)
        self.assertIn(b"unsupported certificate type", banner)
        self.assertIsNone(authkeys.AuthorizedKeysFile(self.akfile).lookup(self.m.blob("ca")))
