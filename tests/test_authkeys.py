"""
Tests for L{nuttconch.authkeys}: the authorized_keys parser, the writer,
C{from=} matching and the live file with its TOFU appends.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time

from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.conch.ssh.keys import FingerprintFormats, Key
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.trial import unittest
from zope.interface import implementer

from nuttconch import authkeys
from nuttconch.authkeys import (
    ACCESS_VALUES,
    TOFU_ACCESS,
    AuthorizedKey,
    AuthorizedKeyError,
    AuthorizedKeysFile,
    AuthorizedKeysUnavailable,
    from_allows,
    match_from,
    parse_line,
    parse_text,
    serialise,
)

from .harness import missing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ns(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _openssh(private: object) -> str:
    return Key(private).public().toString("openssh").decode("ascii")


def ed25519_line() -> str:
    """A fresh ssh-ed25519 public key line, no comment."""
    return _openssh(ed25519.Ed25519PrivateKey.generate())


ED = ed25519_line()
ED2 = ed25519_line()
ED_TYPE, ED_B64 = ED.split()
ED_BLOB = base64.b64decode(ED_B64)
RSA = _openssh(rsa.generate_private_key(public_exponent=65537, key_size=2048))
ECDSA = _openssh(ec.generate_private_key(ec.SECP256R1()))
ECDSA384 = _openssh(ec.generate_private_key(ec.SECP384R1()))
ECDSA521 = _openssh(ec.generate_private_key(ec.SECP521R1()))
DSA = _openssh(dsa.generate_private_key(key_size=1024))
_RAW_ED = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
SK_ED = "sk-ssh-ed25519@openssh.com " + base64.b64encode(
    _ns(b"sk-ssh-ed25519@openssh.com") + _ns(_RAW_ED) + _ns(b"ssh:")
).decode("ascii")
_POINT = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
)
SK_ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com " + base64.b64encode(
    _ns(b"sk-ecdsa-sha2-nistp256@openssh.com") + _ns(b"nistp256") + _ns(_POINT) + _ns(b"ssh:")
).decode("ascii")


def _mpint(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")
    return _ns(raw)


SMALL_RSA = "ssh-rsa " + base64.b64encode(
    _ns(b"ssh-rsa") + _mpint(65537) + _mpint((1 << 767) | 12345)
).decode("ascii")
TRAILING = "ssh-ed25519 " + base64.b64encode(ED_BLOB + _ns(b"extra")).decode("ascii")
TRUNCATED = "ssh-ed25519 " + base64.b64encode(ED_BLOB[:-4]).decode("ascii")
WRONG_CURVE = "ecdsa-sha2-nistp384 " + ECDSA.split()[1]

# (line, expected options or None for a skipped line, expected comment) for
# lines that parse; "{key}" stands for an ssh-ed25519 type and key.
GOOD_LINES: list[tuple[str, tuple[tuple[str, str | None], ...] | None, str]] = [
    ("{key}", (), ""),
    ('access="listen" {key} user@host', (("access", "listen"),), "user@host"),
    (
        'access="listen",access="initiate",from="192.168.1.0/24" {key} user@host',
        (("access", "listen"), ("access", "initiate"), ("from", "192.168.1.0/24")),
        "user@host",
    ),
    ("no-pty {key}", (("no-pty", None),), ""),
    (
        "access=listen,hostname=box,alias=a1 {key}",
        (("access", "listen"), ("hostname", "box"), ("alias", "a1")),
        "",
    ),
    ('alias="a\\"b" {key}', (("alias", 'a"b'),), ""),
    ('alias="a\\\\b" {key}', (("alias", "a\\\\b"),), ""),
    ('alias="a\\b" {key}', (("alias", "a\\b"),), ""),
    ('alias="x\\\\\\"y" {key}', (("alias", 'x\\\\"y'),), ""),
    ('command="echo hi, there" {key}', (("command", "echo hi, there"),), ""),
    ('from="10.0.0.0/8,!10.0.0.1,*.lan" {key}', (("from", "10.0.0.0/8,!10.0.0.1,*.lan"),), ""),
    (
        'No-Pty,ACCESS="listen",no-X11-forwarding {key}',
        (("no-pty", None), ("access", "listen"), ("no-x11-forwarding", None)),
        "",
    ),
    ("{key} my  laptop key ", (), "my  laptop key"),
    ('access="listen"\t{type}\t{b64}\tc', (("access", "listen"),), "c"),
    ("   {key}", (), ""),
    ("{key} c\r\n", (), "c"),
    ('{key} a",access="admin', (), 'a",access="admin'),
    ('expiry-time="20300101",restrict,pty {key}', None, ""),
    ('permitopen="host:22",permitlisten="localhost:8080",principals="a,b" {key}', None, ""),
    ('environment="A=b",tunnel="1",command="x",cert-authority {key}', None, ""),
    ("no-port-forwarding,no-agent-forwarding,no-user-rc,no-touch-required {key}", None, ""),
    ("verify-required,port-forwarding,agent-forwarding,x11-forwarding,user-rc {key}", None, ""),
    ('access="denied",access="admin" {key}', (("access", "denied"), ("access", "admin")), ""),
]

SKIPPED_LINES = ["", "   ", "\t", "# a comment", '  # access="bogus" not a key', "\r\n"]

# (line, substring of the expected error)
BAD_LINES: list[tuple[str, str]] = [
    ('access="bogus" {key}', "unknown access value 'bogus'"),
    ("frobnicate {key}", "unknown option 'frobnicate'"),
    ('frob="x",access="listen" {key}', "unknown option 'frob'"),
    ('access="listen {key}', "unterminated quote"),
    ('alias="ends with backslash\\" {key}', "unterminated quote"),
    ('access="listen", {key}', "trailing comma"),
    ('access="listen",hostname="a",hostname="b" {key}', "duplicate hostname"),
    ('access="listen" ,from="x" {key}', "unknown key type"),
    ('access="listen", from="x" {key}', "trailing comma"),
    (',access="listen" {key}', "empty option name"),
    ('access="listen",,no-pty {key}', "empty option name"),
    ('=x,access="listen" {key}', "empty option name"),
    ('no-pty="yes" {key}', "takes no value"),
    ("access {key}", "needs a value"),
    ('access=li"sten {key}', "stray double quote"),
    ('access="listen"x {key}', "unexpected character 'x'"),
    ('hostname="" {key}', "empty value"),
    ('ac!cess="listen" {key}', "unexpected character '!'"),
    ('expiry-time="tomorrow" {key}', "expiry-time"),
    ('alias="' + "a" * 20480 + '" {key}', "line too long"),
    ("{key} " + "é" * 9000, "line too long"),
    ("ssh-ed25519 AAAA!!!", "not valid base64"),
    ("ssh-ed25519 " + ED_B64[:-1], "not valid base64"),
    ("ssh-ed25519 " + RSA.split()[1] + "=", "not valid base64"),
    ("ssh-rsa " + ED_B64, "does not match the key data"),
    (WRONG_CURVE, "does not match the key data"),
    ("ecdsa-sha2-nistp256 " + ED_B64, "does not match the key data"),
    (TRUNCATED, "truncated"),
    (
        "ssh-ed25519 " + base64.b64encode(_ns(b"ssh-ed25519") + _ns(b"short")).decode(),
        "not a valid key",
    ),
    (TRAILING, "wrong number of fields"),
    (SMALL_RSA, "too small"),
    ("ssh-ed25519 " + base64.b64encode(b"\x00\x00\x01\x00ab").decode(), "truncated"),
    ("ssh-foo AAAAB3NzaC1yc2E= c", "unknown key type 'ssh-foo'"),
    ("ssh-ed25519-cert-v01@openssh.com AAAAB3NzaC1yc2E=", "certificate"),
    ('access="listen" ssh-foo AAAAB3NzaC1yc2E=', "unknown key type 'ssh-foo'"),
    ("ssh-ed25519", "missing the base64 key"),
    ('access="listen"', "missing the key type"),
    ("no-pty", "unknown key type 'no-pty'"),
    ("{key} nul\0here", "NUL"),
]


def _fill(template: str) -> str:
    return template.format(key=ED, type=ED_TYPE, b64=ED_B64)


class ParseLineTests(unittest.TestCase):
    """parse_line over a table of good and bad lines."""

    def test_goodLines(self) -> None:
        """Every good line parses to the expected options, key and comment."""
        problems = []
        for template, options, comment in GOOD_LINES:
            line = _fill(template)
            try:
                entry = parse_line(line, 7)
            except AuthorizedKeyError as exc:
                problems.append(f"{template!r}: unexpected error {exc}")
                continue
            if entry is None:
                problems.append(f"{template!r}: skipped")
                continue
            if options is not None and entry.options != options:
                problems.append(f"{template!r}: options {entry.options!r} != {options!r}")
            if entry.comment != comment:
                problems.append(f"{template!r}: comment {entry.comment!r} != {comment!r}")
            if (entry.keytype, entry.blob, entry.lineno) != (ED_TYPE, ED_BLOB, 7):
                problems.append(f"{template!r}: wrong key or line number")
        self.assertEqual(problems, [])

    def test_skippedLines(self) -> None:
        """Blank lines and comment lines parse to None."""
        for line in SKIPPED_LINES:
            self.assertIsNone(parse_line(line), repr(line))

    def test_badLines(self) -> None:
        """Every bad line raises AuthorizedKeyError whose message names the problem."""
        problems = []
        for template, expected in BAD_LINES:
            line = _fill(template)
            try:
                entry = parse_line(line)
            except AuthorizedKeyError as exc:
                if expected not in str(exc):
                    problems.append(f"{template[:60]!r}: {exc} lacks {expected!r}")
            else:
                problems.append(f"{template[:60]!r}: parsed as {entry!r}")
        self.assertEqual(problems, [])

    def test_everyKeyType(self) -> None:
        """Every OpenSSH key type parses, and its type matches the blob."""
        for line in (ED, RSA, ECDSA, ECDSA384, ECDSA521, DSA, SK_ED, SK_ECDSA):
            entry = parse_line(line + " c")
            assert entry is not None
            self.assertEqual(entry.keytype, line.split()[0])
            self.assertEqual(base64.b64encode(entry.blob).decode(), line.split()[1])

    def test_errorIsValueError(self) -> None:
        """AuthorizedKeyError is a ValueError, so generic handlers catch it."""
        self.assertTrue(issubclass(AuthorizedKeyError, ValueError))

    def test_accessConstants(self) -> None:
        """TOFU keys get initiate and listen, both valid access values."""
        self.assertEqual(TOFU_ACCESS, ("initiate", "listen"))
        self.assertTrue(set(TOFU_ACCESS) <= ACCESS_VALUES)


class AuthorizedKeyTests(unittest.TestCase):
    """The derived views of an entry."""

    def test_properties(self) -> None:
        """access, hostname, aliases and from_patterns reflect the options."""
        entry = parse_line(
            'access="listen",access="list",from="10.0.0.0/8",hostname="box",'
            f'alias="a",alias="b",from="*.lan" {ED} c'
        )
        assert entry is not None
        self.assertEqual(entry.access, frozenset({"listen", "list"}))
        self.assertFalse(entry.denied)
        self.assertEqual(entry.hostname, "box")
        self.assertEqual(entry.aliases, ("a", "b"))
        self.assertEqual(entry.from_patterns, ("10.0.0.0/8", "*.lan"))

    def test_noOptions(self) -> None:
        """A bare key has no access, no hostname, no aliases and no from."""
        entry = parse_line(ED)
        assert entry is not None
        self.assertEqual(entry.access, frozenset())
        self.assertIsNone(entry.hostname)
        self.assertEqual((entry.aliases, entry.from_patterns), ((), ()))

    def test_deniedWithAdmin(self) -> None:
        """denied is set even when the same line also grants admin."""
        entry = parse_line(f'access="admin",access="denied" {ED}')
        assert entry is not None
        self.assertTrue(entry.denied)

    def test_unknownAccessIgnored(self) -> None:
        """An access value outside ACCESS_VALUES, in a hand-built entry, grants nothing."""
        entry = AuthorizedKey((("access", "root"), ("access", "listen")), ED_TYPE, ED_BLOB)
        self.assertEqual(entry.access, frozenset({"listen"}))

    def test_equalityIgnoresLineNumber(self) -> None:
        """Two entries from different lines with the same content are equal."""
        self.assertEqual(parse_line(ED, 1), parse_line(ED, 2))

    def test_fingerprint(self) -> None:
        """fingerprint matches the SHA256 form that ssh-keygen -l prints."""
        entry = parse_line(ED)
        assert entry is not None
        expected = Key.fromString(ED_BLOB, type="blob").fingerprint(
            FingerprintFormats.SHA256_BASE64
        )
        self.assertEqual(entry.fingerprint, "SHA256:" + expected.rstrip("="))
        self.assertTrue(entry.fingerprint.startswith("SHA256:"))
        self.assertNotIn("=", entry.fingerprint)

    def test_fingerprintMatchesSshKeygen(self) -> None:
        """fingerprint is byte-identical to ssh-keygen -lf output."""
        keygen = shutil.which("ssh-keygen")
        if keygen is None:
            missing("ssh-keygen", "apt-get install openssh-client")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(RSA + "\n")
        out = subprocess.run([keygen, "-lf", path], capture_output=True, text=True, check=True)
        entry = parse_line(RSA)
        assert entry is not None
        self.assertEqual(out.stdout.split()[1], entry.fingerprint)


class SerialiseTests(unittest.TestCase):
    """serialise writes lines that parse back to the same entry."""

    def test_roundTrip(self) -> None:
        """Tricky values survive serialise then parse_line unchanged."""
        for value in ['a"b', "a\\b", 'x\\"y', "a,b c", "\\\\x", "é ünï", '""']:
            entry = AuthorizedKey((("alias", value), ("no-pty", None)), ED_TYPE, ED_BLOB, "c d")
            self.assertEqual(parse_line(serialise(entry)), entry, value)

    def test_alwaysQuotes(self) -> None:
        """Values are always double-quoted, with quotes escaped and no newline at the end."""
        entry = parse_line(f'access=listen,alias="a\\"b" {ED} c')
        assert entry is not None
        self.assertEqual(serialise(entry), f'access="listen",alias="a\\"b" {ED} c')

    def test_refusesTrailingBackslash(self) -> None:
        """A value ending in a backslash cannot be written, so serialise refuses it."""
        entry = AuthorizedKey((("alias", "a\\"),), ED_TYPE, ED_BLOB)
        self.assertRaises(AuthorizedKeyError, serialise, entry)

    def test_refusesLineBreaks(self) -> None:
        """A newline, CR or NUL in a comment or value is refused, not written."""
        for bad in ["a\nssh-ed25519 AAAA attacker", "a\rb", "a\0b"]:
            self.assertRaises(
                AuthorizedKeyError, serialise, AuthorizedKey((), ED_TYPE, ED_BLOB, bad)
            )
            self.assertRaises(
                AuthorizedKeyError, serialise, AuthorizedKey((("alias", bad),), ED_TYPE, ED_BLOB)
            )

    def test_refusesUnparseable(self) -> None:
        """An entry with an unknown option or access value is refused."""
        for options in [(("bogus", "x"),), (("access", "root"),), (("no-pty", "x"),)]:
            self.assertRaises(
                AuthorizedKeyError, serialise, AuthorizedKey(options, ED_TYPE, ED_BLOB)
            )

    def test_injectionInComment(self) -> None:
        """A hostile username in the comment cannot add options or access."""
        for name in ['a",access="admin', "a\\\\", "a b", 'a,alias="prod"', "#comment", "x" * 300]:
            entry = AuthorizedKey(
                (("access", "initiate"), ("access", "listen")), ED_TYPE, ED_BLOB, name + "@1.2.3.4"
            )
            line = serialise(entry)
            entries, errors = parse_text(line + "\n")
            self.assertEqual((entries, errors), ([entry], []))
            self.assertEqual(entries[0].access, frozenset(TOFU_ACCESS))


class ParseTextTests(unittest.TestCase):
    """parse_text over whole files."""

    def test_crlf(self) -> None:
        """A CRLF file parses as if it had LF line ends."""
        text = f'access="listen" {ED}\r\n# comment\r\n{ED2} x\r\n'
        entries, errors = parse_text(text)
        self.assertEqual(errors, [])
        self.assertEqual([e.comment for e in entries], ["", "x"])
        self.assertEqual([e.lineno for e in entries], [1, 3])

    def test_bom(self) -> None:
        """A leading UTF-8 BOM is ignored."""
        entries, errors = parse_text(f"\ufeff{ED}\n")
        self.assertEqual((len(entries), errors), (1, []))

    def test_badKeyBeforeGood(self) -> None:
        """A bad base64 key is reported and the good line after it still parses."""
        entries, errors = parse_text(f"ssh-ed25519 AAAA@@@@ broken\n{ED2} good\n")
        self.assertEqual([(e.comment, e.lineno) for e in entries], [("good", 2)])
        self.assertEqual([n for n, _ in errors], [1])
        self.assertIn("base64", errors[0][1])

    def test_hugeLine(self) -> None:
        """A line of a megabyte is one error; the next line still parses."""
        entries, errors = parse_text("#" + "x" * (1 << 20) + "\n" + "a" * (1 << 20) + f"\n{ED}")
        self.assertEqual([n for n, _ in errors], [2])
        self.assertIn("line too long", errors[0][1])
        self.assertEqual([e.lineno for e in entries], [3])

    def test_onlyNewlineSplits(self) -> None:
        """Unicode line separators in a comment do not split the line."""
        entries, errors = parse_text(f"{ED} a\u2028b\x0bc\x1cd\n")
        self.assertEqual(errors, [])
        self.assertEqual(entries[0].comment, "a\u2028b\x0bc\x1cd")

    def test_commentsAndBlanks(self) -> None:
        """Comments and blank lines give neither entries nor errors."""
        self.assertEqual(parse_text("# x\n\n   \n\t# y\n"), ([], []))


# (patterns, address, hostname, expected)
FROM_CASES: list[tuple[str, str, str | None, bool]] = [
    ("1.2.3.4", "1.2.3.4", None, True),
    ("1.2.3.4", "1.2.3.5", None, False),
    ("1.2.3.0/24", "1.2.3.200", None, True),
    ("1.2.3.0/24", "1.2.4.1", None, False),
    ("1.2.3.0/24,!1.2.3.5", "1.2.3.4", None, True),
    ("1.2.3.0/24,!1.2.3.5", "1.2.3.5", None, False),
    ("!1.2.3.5,1.2.3.0/24", "1.2.3.5", None, False),
    ("!1.2.3.5", "1.2.3.4", None, False),
    ("2001:db8::/32", "2001:db8::1", None, True),
    ("2001:db8::/32", "2001:db9::1", None, False),
    ("2001:DB8::1", "2001:db8:0::1", None, True),
    ("127.0.0.0/8", "::ffff:127.0.0.1", None, True),
    ("::ffff:127.0.0.0/104", "127.0.0.1", None, True),
    ("::ffff:127.0.0.1", "127.0.0.1", None, True),
    ("!127.0.0.0/8,*", "::ffff:127.0.0.1", None, False),
    ("127.0.0.1", "::1", None, False),
    ("::1", "::1", None, True),
    ("*.example.com", "1.2.3.4", "host.example.com", True),
    ("*.example.com", "1.2.3.4", "host.example.org", False),
    ("*.EXAMPLE.com", "1.2.3.4", "Host.Example.COM", True),
    ("*.example.com,!bad.example.com", "1.2.3.4", "bad.example.com", False),
    ("*.example.com,!1.2.3.4", "1.2.3.4", "ok.example.com", False),
    ("1.2.3.*", "1.2.3.9", None, True),
    ("1.2.3.?", "1.2.3.10", None, False),
    ("host?", "1.2.3.4", "host1", True),
    ("host[1]", "1.2.3.4", "host1", False),
    ("*", "10.9.8.7", None, True),
    ("1.2.3.4", "9.9.9.9", "1.2.3.4", False),
    ("1.2.3.*", "9.9.9.9", "1.2.3.4", False),
    ("1.2.3.0/33", "1.2.3.4", None, False),
    ("1.2.3.4/24", "1.2.3.4", None, False),
    ("1.2.3.0/33,1.2.3.4", "1.2.3.4", None, False),
    ("*,!10.0.0.0/99", "1.2.3.4", None, False),
    ("1.2.3.0/abc", "1.2.3.4", None, False),
    ("", "1.2.3.4", None, False),
    ("!", "1.2.3.4", None, False),
    ("1.2.3.4,,5.6.7.8", "5.6.7.8", None, True),
    ("*", "not-an-address", None, True),
    ("1.2.3.0/24", "not-an-address", None, False),
]


class MatchFromTests(unittest.TestCase):
    """match_from and from_allows follow OpenSSH's match_host_and_ip."""

    def test_table(self) -> None:
        """Every case in the table gives the OpenSSH answer."""
        wrong = [
            case for case in FROM_CASES if match_from(case[0], case[1], case[2]) is not case[3]
        ]
        self.assertEqual(wrong, [])

    def test_allFromOptionsMustMatch(self) -> None:
        """With two from= options, an address must match each of them."""
        entry = parse_line(f'from="1.2.3.0/24",from="1.2.0.0/16,!1.2.3.9" {ED}')
        assert entry is not None
        self.assertTrue(from_allows(entry, "1.2.3.4"))
        self.assertFalse(from_allows(entry, "1.2.4.4"))
        self.assertFalse(from_allows(entry, "1.2.3.9"))

    def test_noFromAllows(self) -> None:
        """An entry without from= allows every address."""
        entry = parse_line(ED)
        assert entry is not None
        self.assertTrue(from_allows(entry, "203.0.113.9", "anything"))

    def test_hostnamePassedThrough(self) -> None:
        """from_allows hands the hostname to the glob match."""
        entry = parse_line(f'from="*.lan" {ED}')
        assert entry is not None
        self.assertTrue(from_allows(entry, "10.0.0.1", "pc.lan"))
        self.assertFalse(from_allows(entry, "10.0.0.1"))


@implementer(ILogObserver)
class _Events:
    """A log observer that keeps events, for assertions."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def at(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] is level]


class FakeClock:
    """A settable stand-in for time.monotonic."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FileTestCase(unittest.TestCase):
    """Helpers for tests on a real authorized_keys file in a temp dir."""

    def makeFile(self, content: bytes | None = b"") -> tuple[AuthorizedKeysFile, _Events, str]:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "authorized_keys")
        if content is not None:
            with open(path, "wb") as f:
                f.write(content)
        events = _Events()
        self.clock = FakeClock()
        return AuthorizedKeysFile(path, Logger(observer=events), self.clock), events, path


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class AuthorizedKeysFileReadTests(FileTestCase):
    """AuthorizedKeysFile: creation, reload, lookup and fail-closed reads."""

    def test_ensureExistsCreates(self) -> None:
        """ensure_exists creates an empty 0600 file and a 0700 parent directory."""
        base = self.mktemp()
        path = os.path.join(base, "keys", "authorized_keys")
        AuthorizedKeysFile(path, Logger(observer=_Events())).ensure_exists()
        self.assertEqual(_read(path), b"")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)

    def test_ensureExistsKeeps(self) -> None:
        """ensure_exists leaves an existing file's content and mode alone."""
        keys, _, path = self.makeFile(ED.encode() + b"\n")
        os.chmod(path, 0o640)
        keys.ensure_exists()
        self.assertEqual(_read(path), ED.encode() + b"\n")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)

    def test_reloadOnAppend(self) -> None:
        """A line appended by someone else shows up on the next call."""
        keys, _, path = self.makeFile(f"{ED} one\n".encode())
        self.assertEqual([e.comment for e in keys.entries()], ["one"])
        with open(path, "a") as f:
            f.write(f"{ED2} two\n")
        self.assertEqual([e.comment for e in keys.entries()], ["one", "two"])

    def test_reloadOnReplaceSameSize(self) -> None:
        """An editor-style os.replace with a same-size file is noticed."""
        keys, _, path = self.makeFile(f'access="listen" {ED} c\n'.encode())
        self.assertEqual(keys.entries()[0].access, {"listen"})
        new = path + ".new"
        with open(new, "w") as f:
            f.write(f'access="denied" {ED} c\n')
        self.assertEqual(os.path.getsize(new), os.path.getsize(path))
        os.replace(new, path)
        self.assertTrue(keys.entries()[0].denied)

    def test_reloadSameStatInPlace(self) -> None:
        """A same-size in-place edit within one mtime tick of the load is still seen."""
        keys, _, path = self.makeFile(f'access="listen" {ED} c\n'.encode())
        before = os.stat(path)
        self.assertFalse(keys.entries()[0].denied)
        with open(path, "r+") as f:
            f.write('access="denied"')
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.assertEqual(authkeys._signature(os.stat(path)), authkeys._signature(before))
        self.clock.now += 0.5
        self.assertTrue(keys.entries()[0].denied)

    def test_statTrustedAfterRacyWindow(self) -> None:
        """Once re-read well after the load, an unchanged stat serves the cache."""
        keys, _, path = self.makeFile(f"{ED} c\n".encode())
        keys.entries()
        self.clock.now += 5
        keys.entries()
        reads: list[int] = []
        original = authkeys._read_fd

        def countingRead(fd: int) -> bytes:
            reads.append(fd)
            return original(fd)

        self.patch(authkeys, "_read_fd", countingRead)
        keys.entries()
        keys.entries()
        self.assertEqual(reads, [])

    def test_entriesIsACopy(self) -> None:
        """Mutating the returned list does not change the cached view."""
        keys, _, _ = self.makeFile(f"{ED} c\n".encode())
        keys.entries().clear()
        self.assertEqual(len(keys.entries()), 1)

    def test_badLinesLoggedOncePerReload(self) -> None:
        """Each bad line is warned about once per reload, with file name and line number."""
        keys, events, path = self.makeFile(f'access="bogus" {ED}\n{ED2} ok\nnonsense\n'.encode())
        for _ in range(3):
            self.assertEqual(len(keys.entries()), 1)
        warnings = events.at(LogLevel.warn)
        self.assertEqual(len(warnings), 2)
        self.assertIn(f"{path}, line 1: unknown access value 'bogus'", warnings[0])
        self.assertIn(f"{path}, line 3:", warnings[1])
        with open(path, "a") as f:
            f.write("# touched\n")
        keys.entries()
        self.assertEqual(len(events.at(LogLevel.warn)), 4)

    def test_invalidUtf8SpoilsOnlyItsLine(self) -> None:
        """Invalid UTF-8 in one comment does not stop that or other keys parsing."""
        keys, _, _ = self.makeFile(ED.encode() + b" caf\xe9\n" + ED2.encode() + b" ok\n")
        self.assertEqual([e.comment for e in keys.entries()], ["caf\ufffd", "ok"])

    def test_deniedWinsAcrossLines(self) -> None:
        """If any line for a key is denied, lookup returns a denied entry."""
        keys, _, _ = self.makeFile(
            f'access="listen" {ED} allow\n{ED2} other\naccess="denied" {ED} deny\n'.encode()
        )
        entry = keys.lookup(ED_BLOB)
        assert entry is not None
        self.assertTrue(entry.denied)

    def test_firstLineWins(self) -> None:
        """Without a denied line, lookup returns the first line with the key."""
        keys, _, _ = self.makeFile(f'access="listen" {ED} a\naccess="admin" {ED} b\n'.encode())
        entry = keys.lookup(ED_BLOB)
        assert entry is not None
        self.assertEqual((entry.comment, entry.lineno), ("a", 1))

    def test_lookupUnknown(self) -> None:
        """lookup returns None for a key that is not in the file."""
        keys, _, _ = self.makeFile(f"{ED2} x\n".encode())
        self.assertIsNone(keys.lookup(ED_BLOB))

    def test_badLineWithKeyDenies(self) -> None:
        """A line that fails to parse but holds the key makes lookup deny it."""
        keys, _, _ = self.makeFile(f'acess="denied" {ED} typo\naccess="listen" {ED}\n'.encode())
        entry = keys.lookup(ED_BLOB)
        assert entry is not None
        self.assertTrue(entry.denied)
        self.assertEqual(entry.lineno, 1)

    def test_certAuthorityNotAUserKey(self) -> None:
        """A cert-authority line does not admit the CA key itself."""
        keys, _, _ = self.makeFile(f'cert-authority,access="listen" {ED}\n'.encode())
        self.assertIsNone(keys.lookup(ED_BLOB))

    def test_missingFileFailsClosed(self) -> None:
        """A deleted file raises AuthorizedKeysUnavailable, logged once, until it returns."""
        keys, events, path = self.makeFile(f"{ED} c\n".encode())
        keys.entries()
        os.unlink(path)
        for _ in range(3):
            self.assertRaises(AuthorizedKeysUnavailable, keys.entries)
            self.assertRaises(AuthorizedKeysUnavailable, keys.lookup, ED_BLOB)
        self.assertEqual(len(events.at(LogLevel.error)), 1)
        self.assertIn(path, events.at(LogLevel.error)[0])
        with open(path, "w") as f:
            f.write(f"{ED2} back\n")
        self.assertEqual([e.comment for e in keys.entries()], ["back"])
        self.assertEqual(len(events.at(LogLevel.error)), 1)

    def test_directoryFailsClosed(self) -> None:
        """A directory in place of the file raises AuthorizedKeysUnavailable."""
        keys, _, path = self.makeFile(None)
        os.mkdir(path)
        exc = self.assertRaises(AuthorizedKeysUnavailable, keys.entries)
        self.assertIsInstance(exc, OSError)
        os.rmdir(path)
        with open(path, "w") as f:
            f.write(ED + "\n")
        self.assertEqual(len(keys.entries()), 1)

    def test_listenerOnChange(self) -> None:
        """Listeners run after a reload that changed the entries, not otherwise."""
        keys, _, path = self.makeFile(f"{ED} c\n".encode())
        calls: list[int] = []
        keys.add_listener(lambda: calls.append(1))
        keys.entries()
        os.utime(path)
        keys.entries()
        self.assertEqual(calls, [])
        with open(path, "a") as f:
            f.write("# only a comment\n")
        keys.entries()
        self.assertEqual(calls, [])
        with open(path, "w") as f:
            f.write(f'access="denied" {ED} c\n')
        keys.entries()
        self.assertEqual(calls, [1])

    def test_listenerFailureContained(self) -> None:
        """A failing listener is logged and the reload still completes."""
        keys, events, path = self.makeFile(f"{ED} c\n".encode())
        keys.add_listener(lambda: 1 / 0)  # type: ignore[arg-type,func-returns-value]
        keys.entries()
        with open(path, "w") as f:
            f.write(f"{ED2} c\n")
        self.assertEqual(len(keys.entries()), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 0)
        self.assertEqual(len(events.at(LogLevel.critical)), 1)


def _tofu(line: str, comment: str = "user@127.0.0.1") -> AuthorizedKey:
    entry = parse_line(line)
    assert entry is not None
    return AuthorizedKey(
        tuple(("access", a) for a in TOFU_ACCESS), entry.keytype, entry.blob, comment
    )


class AuthorizedKeysFileWriteTests(FileTestCase):
    """AuthorizedKeysFile.append and rewrite."""

    def test_append(self) -> None:
        """append adds one complete line that parses back to the entry."""
        keys, _, path = self.makeFile(b"# header\n")
        entry = _tofu(ED)
        keys.append(entry)
        self.assertEqual(_read(path), b"# header\n" + serialise(entry).encode() + b"\n")
        self.assertEqual(keys.entries(), [entry])

    def test_appendTwice(self) -> None:
        """Appending the same key twice leaves one line."""
        keys, _, path = self.makeFile()
        keys.append(_tofu(ED, "first"))
        keys.append(_tofu(ED, "second"))
        self.assertEqual([e.comment for e in keys.entries()], ["first"])
        self.assertEqual(_read(path).count(b"\n"), 1)

    def test_appendSkipsKeyInBadLine(self) -> None:
        """A key already present on an unparseable line is not appended again."""
        content = f'access="bogus" {ED}\n'.encode()
        keys, _, path = self.makeFile(content)
        keys.append(_tofu(ED))
        self.assertEqual(_read(path), content)

    def test_appendNoTrailingNewline(self) -> None:
        """Appending to a file without a final newline adds one first."""
        keys, _, path = self.makeFile(f"{ED2} last".encode())
        keys.append(_tofu(ED))
        data = _read(path)
        self.assertTrue(data.startswith(f"{ED2} last\n".encode()))
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual([e.comment for e in keys.entries()], ["last", "user@127.0.0.1"])

    def test_appendMissingFile(self) -> None:
        """append to a missing file fails closed rather than creating it."""
        keys, _, path = self.makeFile(None)
        self.assertRaises(AuthorizedKeysUnavailable, keys.append, _tofu(ED))
        self.assertFalse(os.path.exists(path))

    def test_appendRefusesUnwritable(self) -> None:
        """An entry that cannot be written faithfully is refused before touching the file."""
        keys, _, path = self.makeFile(b"")
        self.assertRaises(AuthorizedKeyError, keys.append, _tofu(ED, "a\nssh-ed25519 AAAA x"))
        self.assertEqual(_read(path), b"")

    def test_concurrentThreads(self) -> None:
        """Fifty threads appending at once give exactly fifty well-formed lines."""
        keys, _, path = self.makeFile(b"# existing\n")
        entries = [_tofu(ed25519_line(), f"t{i}@10.0.0.1") for i in range(50)]
        barrier = threading.Barrier(50)
        failures: list[BaseException] = []

        def run(entry: AuthorizedKey) -> None:
            try:
                barrier.wait()
                AuthorizedKeysFile(path, Logger(observer=_Events())).append(entry)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(e,)) for e in entries]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(failures, [])
        data = _read(path)
        self.assertEqual(data.count(b"\n"), 51)
        parsed, errors = parse_text(data.decode())
        self.assertEqual(errors, [])
        self.assertEqual(sorted(e.comment for e in parsed), sorted(e.comment for e in entries))

    def test_concurrentProcesses(self) -> None:
        """Two processes appending 25 keys each give exactly fifty lines."""
        keys, _, path = self.makeFile(b"")
        go = path + ".go"
        script = textwrap.dedent(
            """
            import os, sys, time
            from cryptography.hazmat.primitives.asymmetric import ed25519
            from twisted.conch.ssh.keys import Key
            from nuttconch.authkeys import AuthorizedKeysFile, parse_line, AuthorizedKey
            path, go, tag = sys.argv[1:]
            entries = []
            for i in range(25):
                line = Key(ed25519.Ed25519PrivateKey.generate()).public().toString("openssh")
                e = parse_line(line.decode())
                entries.append(AuthorizedKey(
                    (("access", "initiate"), ("access", "listen")), e.keytype, e.blob,
                    f"{tag}{i}@10.0.0.1"))
            open(go + "." + tag, "w").close()
            while not os.path.exists(go):
                time.sleep(0.001)
            keys = AuthorizedKeysFile(path)
            for e in entries:
                keys.append(e)
            """
        )
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        procs = [
            subprocess.Popen([sys.executable, "-c", script, path, go, tag], env=env)
            for tag in ("a", "b")
        ]
        deadline = time.monotonic() + 60
        while not all(os.path.exists(go + "." + t) for t in "ab"):
            self.assertTrue(time.monotonic() < deadline, "appender processes did not start")
            self.assertEqual([p.poll() for p in procs], [None, None])
            time.sleep(0.01)
        open(go, "w").close()
        for p in procs:
            self.assertEqual(p.wait(timeout=60), 0)
        parsed, errors = parse_text(_read(path).decode())
        self.assertEqual(errors, [])
        self.assertEqual(len(parsed), 50)
        self.assertEqual(_read(path).count(b"\n"), 50)
        self.assertEqual(len(keys.entries()), 50)

    def _faultCase(self, patchName: str, fake: object) -> None:
        content = f"{ED2} existing".encode()
        keys, _, path = self.makeFile(content)
        patcher = self.patch(authkeys.os, patchName, fake)
        exc = self.assertRaises(OSError, keys.append, _tofu(ED))
        self.assertIn(exc.errno, (errno.ENOSPC, errno.EIO))
        patcher.restore()
        self.assertEqual(_read(path), content)
        keys.append(_tofu(ED))
        self.assertEqual([e.comment for e in keys.entries()], ["existing", "user@127.0.0.1"])

    def test_enospcDuringWrite(self) -> None:
        """ENOSPC after a partial write leaves the file byte-identical; the next append works."""
        real = os.write

        def partialThenFull(fd: int, data: bytes) -> int:
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        self._faultCase("write", partialThenFull)

    def test_shortWrite(self) -> None:
        """A short write is undone like an error and reported as EIO."""
        real = os.write
        self._faultCase("write", lambda fd, data: real(fd, data[:10]))

    def test_eioDuringFsync(self) -> None:
        """EIO from fsync after a complete write truncates the line away again."""

        def failingFsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        self._faultCase("fsync", failingFsync)

    def test_rewriteKeepsOtherLines(self) -> None:
        """rewrite keeps comments, unknown and undecodable lines byte for byte, and the mode."""
        content = (
            b"# admin notes \xff\xfe\r\n"
            + b'frobnicate="yes" '
            + ED2.encode()
            + b" weird\n\n"
            + ED.encode()
            + b" drop-me\n"
            + b"   # indented comment\t\n"
        )
        keys, _, path = self.makeFile(content)
        os.chmod(path, 0o640)
        before = os.stat(path).st_ino
        keys.rewrite(lambda lines: [line for line in lines if "drop-me" not in line])
        self.assertEqual(_read(path), content.replace(ED.encode() + b" drop-me\n", b""))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertNotEqual(os.stat(path).st_ino, before)
        self.assertEqual(
            [f for f in os.listdir(os.path.dirname(path)) if f != "authorized_keys"], []
        )

    def test_rewriteThenAppend(self) -> None:
        """An append after a rewrite lands in the new file."""
        keys, _, path = self.makeFile(f"{ED2} a\n".encode())
        keys.rewrite(lambda lines: lines + ["# added"])
        keys.append(_tofu(ED))
        self.assertEqual(_read(path).count(b"\n"), 3)
        self.assertEqual(len(keys.entries()), 2)

    def test_rewriteFailureLeavesFile(self) -> None:
        """If the transform fails, the file and directory are unchanged."""
        keys, _, path = self.makeFile(f"{ED2} a\n".encode())

        def boom(lines: list[str]) -> list[str]:
            raise RuntimeError("no")

        self.assertRaises(RuntimeError, keys.rewrite, boom)
        self.assertRaises(ValueError, keys.rewrite, lambda lines: ["a\nb"])
        self.assertEqual(_read(path), f"{ED2} a\n".encode())
        self.assertEqual(os.listdir(os.path.dirname(path)), ["authorized_keys"])
