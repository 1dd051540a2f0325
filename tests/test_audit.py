"""Defaults a third-party audit passes (issue 12 point 6).

``ssh-audit`` (PyPI, pinned in the test extra) scans a server started on a
new installation's defaults: no ``[fail]``, and no ``[warn]`` except that
curve25519 offers no post-quantum protection (old clients, OpenSSH 9.2
among them, have nothing better: mlkem768x25519 came in 9.9).  Every
algorithm the audit flags stays available through the config lists, and
an ECDSA host key left by the original Nuttssh is still offered, though a
new installation never generates one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from twisted.internet import defer, utils
from twisted.trial import unittest

from nuttconch import config as configmod
from nuttconch import crypto

from .harness import SwitchboardTestMixin, host_key_dir, missing

# The only warning accepted: what curve25519 is, for clients without mlkem768x25519.
ACCEPTED_WARNING = "does not provide protection against post-quantum attacks"
AUDITED_KINDS = ("kex", "key", "enc", "mac")

try:
    import ssh_audit  # noqa: F401
except ImportError:  # pragma: no cover - ssh-audit is in the test extra
    SSH_AUDIT = False
else:
    SSH_AUDIT = True


def findings(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(failures, warnings) of an ``ssh-audit -j`` report, as 'kind algorithm: note'."""
    fails: list[str] = []
    warns: list[str] = []
    for kind in AUDITED_KINDS:
        for entry in report.get(kind, []):
            notes = entry.get("notes", {})
            for note in notes.get("fail", []):
                fails.append(f"{kind} {entry['algorithm']}: {note}")
            for note in notes.get("warn", []):
                warns.append(f"{kind} {entry['algorithm']}: {note}")
    for cve in report.get("cves", []):
        fails.append(f"cve {cve.get('name')}: {cve.get('description')}")
    return fails, warns


def unaccepted(warns: list[str]) -> list[str]:
    return [w for w in warns if not (w.startswith("kex ") and ACCEPTED_WARNING in w)]


class FindingsTableTests(unittest.TestCase):
    """The report reading that the audit test relies on, on hand-made reports."""

    def test_table(self) -> None:
        """Each report gives the failures and unaccepted warnings listed beside it."""
        table: list[tuple[dict[str, Any], list[str], list[str]]] = [
            ({}, [], []),
            (
                {
                    "kex": [
                        {"algorithm": "curve25519-sha256", "notes": {"warn": [ACCEPTED_WARNING]}}
                    ]
                },
                [],
                [],
            ),
            (
                {
                    "mac": [
                        {
                            "algorithm": "hmac-sha2-256",
                            "notes": {"warn": ["using encrypt-and-MAC mode"]},
                        }
                    ]
                },  # noqa: E501
                [],
                ["mac hmac-sha2-256: using encrypt-and-MAC mode"],
            ),
            (
                {
                    "key": [
                        {
                            "algorithm": "ecdsa-sha2-nistp256",
                            "notes": {"fail": ["nist"], "warn": [ACCEPTED_WARNING]},
                        }
                    ]
                },  # noqa: E501
                ["key ecdsa-sha2-nistp256: nist"],
                # Only key exchanges may carry the post-quantum note.
                [f"key ecdsa-sha2-nistp256: {ACCEPTED_WARNING}"],
            ),
            ({"cves": [{"name": "CVE-1", "description": "x"}]}, ["cve CVE-1: x"], []),
        ]
        for report, fails, warns in table:
            got_fails, got_warns = findings(report)
            self.assertEqual((got_fails, unaccepted(got_warns)), (fails, warns), report)

    def test_default_lists(self) -> None:
        """The default lists hold no NIST key exchange and no encrypt-and-MAC MAC, and the
        config lists still reach every algorithm."""
        table = [
            ("kex_algorithms", "+ecdh-sha2-nistp256", b"ecdh-sha2-nistp256", True),
            ("macs", "+hmac-sha2-256", b"hmac-sha2-256", True),
            ("macs", "hmac-sha2-512", b"hmac-sha2-512", True),
        ]
        self.assertFalse([k for k in crypto.DEFAULT_KEX if k.startswith(b"ecdh-")])
        self.assertFalse([m for m in crypto.DEFAULT_MACS if not m.endswith(b"-etm@openssh.com")])
        for kind, text, name, present in table:
            self.assertEqual(name in crypto.parse_algorithms(kind, text), present, (kind, text))
        everything = crypto.parse_algorithms(
            "kex_algorithms", ",".join(k.decode() for k in crypto.KNOWN_KEX)
        )  # noqa: E501
        self.assertEqual(everything, crypto.available_kex())
        self.assertEqual(
            crypto.parse_algorithms("macs", ",".join(m.decode() for m in crypto.MACS)),
            tuple(crypto.MACS),
        )  # noqa: E501


class NewInstallationMixin(SwitchboardTestMixin):
    """A server on defaults, whose key directory starts empty (or, for a migration, with
    the host keys an old installation left)."""

    migrated = False

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        # The harness copied in host keys, ECDSA included; start again as a new
        # installation would (or keep them, for a migration).
        yield self.listening.stopListening()
        self.listening = None
        if not self.migrated:
            shutil.rmtree(self.keydir)
            os.makedirs(self.keydir)

    def writeConfig(self, **overrides: str) -> str:
        """Only what a test needs to run: listen on loopback, exempt it from penalties
        (the audit opens many unauthenticated connections); every algorithm default."""
        path = os.path.join(self.dir, "nuttssh.ini")  # type: ignore[attr-defined]
        extra = "".join(f"{k} = {v}\n" for k, v in overrides.items())
        with open(path, "w") as handle:
            handle.write(
                "[server]\nlisten_host = 127.0.0.1\nlisten_port = 0\n"
                "per_source_penalty_exempt_list = 127.0.0.1\n"
                f"{extra}[keys]\nhost_key_dir = {self.keydir}\n"
            )
        return path

    def restart(self, **overrides: str) -> Any:
        from twisted.internet import reactor

        from nuttconch.tap import build

        cfg = configmod.load(self.writeConfig(**overrides))
        self.config = cfg
        self.factory, self.registry = build(cfg)
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    @defer.inlineCallbacks
    def audit(self) -> Any:
        """Run ssh-audit -j against the server; return its report."""
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "ssh_audit",
                "-j",
                "--skip-rate-test",
                "-t",
                "30",
                "-p",
                str(self.port),
                "127.0.0.1",
            ],  # noqa: E501
            env={"PATH": os.environ.get("PATH", "")},
        )
        line = out.decode("utf-8", "replace").splitlines()[0] if out else ""
        try:
            report = json.loads(line)
        except ValueError:
            self.fail(f"ssh-audit gave no report (exit {code}): {out!r} {err!r}")  # type: ignore[attr-defined]
        if "kex" not in report:
            self.fail(f"ssh-audit could not scan (exit {code}): {out!r} {err!r}")  # type: ignore[attr-defined]
        return report


class AuditTests(NewInstallationMixin, unittest.TestCase):
    """A new installation on defaults."""

    def setUp(self) -> Any:
        if not SSH_AUDIT:
            missing("ssh-audit", "pip install '.[test]'")
        return super().setUp()

    @defer.inlineCallbacks
    def test_ssh_audit_passes_defaults(self) -> Any:
        """ssh-audit finds no failure and no warning but the post-quantum note."""
        self.restart()
        report = yield self.audit()
        fails, warns = findings(report)
        self.assertEqual(fails, [])
        self.assertEqual(unaccepted(warns), [])
        offered = {kind: [e["algorithm"] for e in report[kind]] for kind in AUDITED_KINDS}
        self.assertNotIn("ecdsa-sha2-nistp256", offered["key"])
        self.assertIn("ssh-ed25519", offered["key"])
        self.assertIn("curve25519-sha256", offered["kex"])

    def test_no_ecdsa_host_key_generated(self) -> None:
        """A new installation writes Ed25519 and RSA host keys, and no ECDSA one."""
        self.restart()
        self.assertEqual(
            sorted(n for n in os.listdir(self.keydir) if n.startswith("ssh_host_")),
            [
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
                "ssh_host_rsa_key",
                "ssh_host_rsa_key.pub",
            ],  # noqa: E501
        )
        self.assertNotIn(b"ecdsa-sha2-nistp256", self.factory.publicKeys)

    @defer.inlineCallbacks
    def test_flagged_algorithms_refused_by_default_and_configurable(self) -> Any:
        """The real ssh asking only for NIST ECDH or encrypt-and-MAC is refused on
        defaults and served once the config lists add them."""
        self.restart()
        key = self.key("k")
        asks = (
            ("-o", "KexAlgorithms=ecdh-sha2-nistp256", b"no matching key exchange method"),
            ("-c", "aes128-ctr", "-m", "hmac-sha2-256", b"no matching MAC found"),
        )
        for *args, message in asks:
            out, err, code = yield self.ssh(key, "u", *args, command=("whoami",))
            self.assertEqual(code, 255, err)
            self.assertIn(message, err)
        yield self.listening.stopListening()
        self.restart(
            kex_algorithms="+ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521",
            macs="+hmac-sha2-256,hmac-sha2-512",
        )
        for *args, _ in asks:
            out, err, code = yield self.ssh(key, "u", *args, command=("whoami",))
            self.assertEqual(code, 0, err)
            self.assertIn(b"hostname: u", out)


class MigrationTests(NewInstallationMixin, unittest.TestCase):
    """A key directory moved over from Nuttssh, with its ECDSA host key."""

    migrated = True

    @defer.inlineCallbacks
    def test_existing_ecdsa_host_key_still_offered(self) -> Any:
        """A client whose known_hosts pins the old ECDSA key (and nothing else) connects
        with StrictHostKeyChecking=yes."""
        self.restart()
        pub = open(os.path.join(host_key_dir(), "ssh_host_ecdsa_key.pub")).read().split()
        with open(os.path.join(self.dir, "known_hosts"), "w") as handle:
            handle.write(f"nuttconch-test {pub[0]} {pub[1]}\n")
        self.assertIn(b"ecdsa-sha2-nistp256", self.factory.publicKeys)
        out, err, code = yield self.ssh(
            self.key("old"),
            "old",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "HostKeyAlgorithms=ecdsa-sha2-nistp256",
            command=("whoami",),
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: old", out)
