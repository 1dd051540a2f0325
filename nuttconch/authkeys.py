# -*- test-case-name: tests.test_authkeys -*-
"""
OpenSSH ``authorized_keys`` handling: parse, serialise, match ``from=``,
and keep a live view of the file with safe trust-on-first-use appends.

The grammar follows sshd(8) "AUTHORIZED_KEYS FILE FORMAT" and OpenSSH's
``auth-options.c``:

- A line is an optional options field, a key type, the base64 key blob and
  an optional comment (the rest of the line). Fields are separated by
  spaces or tabs only. Blank lines and lines whose first non-blank
  character is ``#`` are ignored.
- The options field is a comma-separated list of ``name`` or
  ``name="value"``. Names are case-insensitive (stored lower-cased).
  Inside double quotes a backslash escapes only a double quote: ``\\"`` is
  a literal ``"`` and every other backslash is kept literally, exactly as
  OpenSSH's ``opt_dequote`` reads it. So ``\\\\`` stays two backslashes,
  and a value that *ends* in a backslash cannot be written at all (its
  closing quote would read as an escaped one); `serialise` refuses such a
  value rather than write a line that means something else.
- Unquoted values (``access=listen``) are accepted for compatibility with
  hand-written files; they end at the next comma or blank and may not
  contain a double quote. `serialise` always quotes.

Anything the grammar cannot express is an error for that one line
(`AuthorizedKeyError`); `parse_text` collects those errors and carries on,
so one bad line never hides the others.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import fcntl
import functools
import hashlib
import ipaddress
import os
import re
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.conch.ssh.keys import Key
from twisted.logger import Logger

from . import access as _access
from .access import Access
from .policy import KeyPolicy, PolicyError, glob_match

__all__ = [
    "ACCESS_VALUES",
    "TOFU_ACCESS",
    "AuthorizedKey",
    "AuthorizedKeyError",
    "AuthorizedKeysFile",
    "AuthorizedKeysBusy",
    "AuthorizedKeysUnavailable",
    "from_allows",
    "is_hostname_pattern",
    "match_from",
    "parse_line",
    "parse_text",
    "serialise",
    "wants_hostname",
]


class AuthorizedKeyError(ValueError):
    """One line could not be parsed; message says what is wrong in user words."""


class AuthorizedKeysUnavailable(OSError):  # noqa: N818 (name fixed by the API)
    """
    The authorized_keys file is missing or unreadable.

    Callers must refuse key logins while this is raised (fail closed): an
    empty view of the file would otherwise silently let TOFU re-admit keys
    that an administrator had denied.
    """


#: Every permission ``access=`` may grant (SPEC.md, "Permissions").
ACCESS_VALUES = _access.VALUES

#: What a key accepted on first use gets.
TOFU_ACCESS = _access.TOFU

#: Longest line accepted, in UTF-8 bytes. OpenSSH reads lines of any length
#: but no real key line comes close; a limit keeps hostile files cheap.
MAX_LINE_BYTES = 16 * 1024

#: Options this server understands; each takes a value.
_OWN_OPTIONS = frozenset({"access", "from", "hostname", "alias"})

#: OpenSSH's standard options that take a value. They are kept so a file
#: shared with sshd still parses; this module does not act on them.
_OPENSSH_VALUE_OPTIONS = frozenset(
    {
        "command",
        "environment",
        "expiry-time",
        "permitlisten",
        "permitopen",
        "principals",
        "tunnel",
    }
)

#: OpenSSH's standard flag options (no value).
_OPENSSH_FLAG_OPTIONS = frozenset(
    {
        "agent-forwarding",
        "cert-authority",
        "no-agent-forwarding",
        "no-port-forwarding",
        "no-pty",
        "no-touch-required",
        "no-user-rc",
        "no-x11-forwarding",
        "port-forwarding",
        "pty",
        "restrict",
        "user-rc",
        "verify-required",
        "x11-forwarding",
    }
)

_VALUE_OPTIONS = _OWN_OPTIONS | _OPENSSH_VALUE_OPTIONS

#: Key type -> number of SSH wire strings in its public blob (type included),
#: used to reject blobs with trailing data, which Twisted would ignore.
_KEY_TYPES: dict[str, int] = {
    "ssh-ed25519": 2,
    "ssh-rsa": 3,
    "ecdsa-sha2-nistp256": 3,
    "ecdsa-sha2-nistp384": 3,
    "ecdsa-sha2-nistp521": 3,
    "sk-ssh-ed25519@openssh.com": 3,
    "sk-ecdsa-sha2-nistp256@openssh.com": 4,
    "ssh-dss": 5,
}

#: OpenSSH refuses RSA keys below this many bits (SSH_RSA_MINIMUM_MODULUS_SIZE).
_RSA_MIN_BITS = 1024

_OPTION_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_BLANKS = " \t"
_EXPIRY_RE = re.compile(r"\d{8}(\d{4}(\d{2})?)?Z?")
#: Characters that can appear in a base64 key; used to spot a key's blob in
#: a line that failed to parse.
_B64_TOKEN_RE = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")


@dataclass(frozen=True)
class AuthorizedKey:
    """
    One parsed authorized_keys line.

    ``options`` keeps every option in file order (names lower-cased, value
    ``None`` for flags) so that nothing an administrator wrote is lost; the
    properties below are the views the server acts on. ``lineno`` is where
    it came from, for log messages only, so it takes no part in equality.
    """

    options: tuple[tuple[str, str | None], ...]
    keytype: str
    blob: bytes
    comment: str = ""
    lineno: int = field(default=0, compare=False)

    def _values(self, name: str) -> tuple[str, ...]:
        return tuple(v for n, v in self.options if n == name and v is not None)

    @property
    def access(self) -> Access:
        """Every known ``access=`` value; unknown ones grant nothing."""
        return Access.known(self._values("access"))

    @property
    def denied(self) -> bool:
        """True if any ``access="denied"``: it wins over everything else."""
        return self.access.denied

    @property
    def from_patterns(self) -> tuple[str, ...]:
        """One pattern list per ``from=`` option; each must match on its own."""
        return self._values("from")

    @property
    def hostname(self) -> str | None:
        """The ``hostname=`` override, or None to use the SSH username."""
        values = self._values("hostname")
        return values[0] if values else None

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every ``alias=``, in file order."""
        return self._values("alias")

    @property
    def cert_authority(self) -> bool:
        """True for a ``cert-authority`` line, which never admits a plain key."""
        return any(n == "cert-authority" for n, _ in self.options)

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint as ``ssh-keygen -l`` prints it."""
        return fingerprint_of(self.blob)

    @functools.cached_property
    def _policy(self) -> KeyPolicy | PolicyError:
        try:
            return KeyPolicy.from_options(self.options)
        except PolicyError as exc:
            return exc

    @property
    def policy(self) -> KeyPolicy:
        """What a login with this line may do; raises `PolicyError` if an option
        cannot be honoured (then the line admits nobody)."""
        policy = self._policy
        if isinstance(policy, PolicyError):
            raise policy
        return policy

    @property
    def policy_error(self) -> str | None:
        """Why this line's options cannot be honoured, or None."""
        policy = self._policy
        return str(policy) if isinstance(policy, PolicyError) else None


def fingerprint_of(blob: bytes) -> str:
    """OpenSSH's ``SHA256:`` + unpadded base64 form of a key blob's fingerprint."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


# ---------------------------------------------------------------------------
# Parsing


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _parse_options(text: str) -> list[tuple[str, str | None]]:
    """
    Split an options field into ``(name, value)`` pairs.

    ``text`` is the whole field: it contains no unquoted blank (the caller
    cut it there) but may end inside an unterminated quote.
    """
    options: list[tuple[str, str | None]] = []
    pos = 0
    end = len(text)
    while True:
        match = _OPTION_NAME_RE.match(text, pos)
        if match is None:
            if pos >= end or text[pos] in ",=":
                raise AuthorizedKeyError("empty option name in the options")
            raise AuthorizedKeyError(f"unexpected character {text[pos]!r} in an option name")
        name = match.group().lower()
        pos = match.end()
        value: str | None = None
        if pos < end and text[pos] == "=":
            pos += 1
            if pos < end and text[pos] == '"':
                pos += 1
                chars: list[str] = []
                while pos < end and text[pos] != '"':
                    if text[pos] == "\\" and pos + 1 < end and text[pos + 1] == '"':
                        pos += 1
                    chars.append(text[pos])
                    pos += 1
                if pos >= end:
                    raise AuthorizedKeyError(f"unterminated quote in the value of option {name!r}")
                pos += 1
                value = "".join(chars)
            else:
                start = pos
                while pos < end and text[pos] != ",":
                    pos += 1
                value = text[start:pos]
                if '"' in value:
                    raise AuthorizedKeyError(f"stray double quote in the value of option {name!r}")
                if not value:
                    raise AuthorizedKeyError(f"option {name!r} has an empty value")
        options.append((name, value))
        if pos >= end:
            return options
        if text[pos] != ",":
            raise AuthorizedKeyError(
                f"unexpected character {text[pos]!r} after option {name!r}"
                " (options are separated by commas, without spaces)"
            )
        pos += 1
        if pos >= end:
            raise AuthorizedKeyError("trailing comma after the last option")


def _check_options(options: Iterable[tuple[str, str | None]]) -> None:
    """Reject what this server cannot honour; see the module docstring."""
    seen_hostname = False
    for name, value in options:
        if name in _OPENSSH_FLAG_OPTIONS:
            if value is not None:
                raise AuthorizedKeyError(f"option {name!r} takes no value")
            continue
        if name not in _VALUE_OPTIONS:
            raise AuthorizedKeyError(f"unknown option {name!r}")
        if value is None:
            raise AuthorizedKeyError(f'option {name!r} needs a value, as {name}="..."')
        if name == "access" and value not in ACCESS_VALUES:
            expected = ", ".join(sorted(ACCESS_VALUES))
            raise AuthorizedKeyError(f"unknown access value {value!r} (expected one of {expected})")
        if name == "hostname":
            if seen_hostname:
                raise AuthorizedKeyError("duplicate hostname option (only one is allowed)")
            seen_hostname = True
        if name in ("hostname", "alias") and not value:
            raise AuthorizedKeyError(f"option {name!r} has an empty value")
        if name == "expiry-time" and _EXPIRY_RE.fullmatch(value) is None:
            raise AuthorizedKeyError(
                f"expiry-time {value!r} is not YYYYMMDD[HHMM[SS]][Z] as OpenSSH expects"
            )


def _split_field(text: str, pos: int) -> tuple[str, int]:
    """Return the blank-delimited field starting at ``pos`` and the index after it."""
    start = pos
    while pos < len(text) and text[pos] not in _BLANKS:
        pos += 1
    return text[start:pos], pos


def _skip_blanks(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _BLANKS:
        pos += 1
    return pos


def _split_options_field(text: str, pos: int) -> tuple[str, int]:
    """Like `_split_field`, but blanks inside double quotes do not end it."""
    start = pos
    quoted = False
    while pos < len(text):
        char = text[pos]
        if quoted:
            if char == "\\" and pos + 1 < len(text) and text[pos + 1] == '"':
                pos += 1
            elif char == '"':
                quoted = False
        elif char in _BLANKS:
            break
        elif char == '"':
            quoted = True
        pos += 1
    return text[start:pos], pos


def _wire_strings(blob: bytes) -> list[bytes]:
    """Split a public key blob into its SSH wire strings."""
    parts = []
    pos = 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise AuthorizedKeyError("the key data is truncated")
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        pos += 4
        if pos + length > len(blob):
            raise AuthorizedKeyError("the key data is truncated")
        parts.append(blob[pos : pos + length])
        pos += length
    return parts


def _check_blob(keytype: str, blob: bytes) -> None:
    """Make sure ``blob`` is a loadable public key of type ``keytype``."""
    parts = _wire_strings(blob)
    if not parts:
        raise AuthorizedKeyError("the key data is empty")
    inner = parts[0].decode("ascii", "replace")
    if inner != keytype:
        raise AuthorizedKeyError(
            f"key type {keytype!r} does not match the key data, which is {inner!r}"
        )
    if len(parts) != _KEY_TYPES[keytype]:
        raise AuthorizedKeyError(f"the {keytype} key data has the wrong number of fields")
    curve = {"sk-ecdsa-sha2-nistp256@openssh.com": b"nistp256"}.get(
        keytype, keytype.removeprefix("ecdsa-sha2-").encode()
    )
    if "ecdsa" in keytype and parts[1] != curve:
        raise AuthorizedKeyError(f"the {keytype} key data names another curve")
    try:
        key = Key.fromString(blob, type="blob")
    except Exception as exc:  # Twisted and cryptography raise many kinds.
        raise AuthorizedKeyError(f"the {keytype} key data is not a valid key ({exc})") from None
    if keytype == "ssh-rsa" and key.size() < _RSA_MIN_BITS:
        raise AuthorizedKeyError(f"the RSA key is too small ({key.size()} bits)")


def parse_line(line: str, lineno: int = 0) -> AuthorizedKey | None:
    """
    Parse one authorized_keys line.

    Returns None for blank and comment lines, and raises
    `AuthorizedKeyError` (never anything else) for a line that cannot be
    honoured as written, so the caller can skip just that line and log why.
    A trailing ``\\n`` or ``\\r\\n`` is ignored.
    """
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    pos = _skip_blanks(line, 0)
    if pos >= len(line) or line[pos] == "#":
        return None
    if len(line) > MAX_LINE_BYTES or _utf8_len(line) > MAX_LINE_BYTES:
        raise AuthorizedKeyError(f"line too long (more than {MAX_LINE_BYTES} bytes)")
    if "\n" in line or "\0" in line:
        raise AuthorizedKeyError("line contains a newline or NUL character")

    options: list[tuple[str, str | None]] = []
    first, after_first = _split_field(line, pos)
    if first in _KEY_TYPES:
        keytype, pos = first, after_first
    else:
        options_text, pos = _split_options_field(line, pos)
        pos = _skip_blanks(line, pos)
        keytype, pos = _split_field(line, pos)
        if keytype not in _KEY_TYPES:
            if not any(c in options_text for c in '=",') and (
                not keytype or keytype.startswith("AAAA")
            ):
                # Read without options, the first field is the key type.
                raise AuthorizedKeyError(_unknown_keytype(options_text))
            _check_options(_parse_options(options_text))
            if not keytype:
                raise AuthorizedKeyError("missing the key type and key after the options")
            raise AuthorizedKeyError(_unknown_keytype(keytype))
        options = _parse_options(options_text)
        _check_options(options)

    pos = _skip_blanks(line, pos)
    encoded, pos = _split_field(line, pos)
    if not encoded:
        raise AuthorizedKeyError(f"missing the base64 key after {keytype!r}")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise AuthorizedKeyError("the key is not valid base64") from None
    if base64.b64encode(blob).decode("ascii") != encoded:
        raise AuthorizedKeyError("the key is not valid base64 (bad padding)")
    _check_blob(keytype, blob)
    comment = line[pos:].strip(_BLANKS)
    return AuthorizedKey(tuple(options), keytype, blob, comment, lineno)


def _unknown_keytype(keytype: str) -> str:
    if keytype.endswith("-cert-v01@openssh.com"):
        return f"certificate key type {keytype!r} is not supported here"
    return f"unknown key type {keytype!r}"


def _check_representable(what: str, text: str) -> None:
    if any(c in text for c in "\n\r\0"):
        raise AuthorizedKeyError(f"{what} contains a line break or NUL and cannot be written")


def serialise(entry: AuthorizedKey) -> str:
    """
    Write ``entry`` as one line (without the newline).

    Every value is double-quoted with ``"`` written as ``\\"``; backslashes
    are written as they are, since OpenSSH reads them literally. The result
    is parsed back before it is returned and must give ``entry`` again, so
    nothing a client sends (a username in the comment, say) can smuggle in
    options, lines or keys: what cannot be written faithfully raises
    `AuthorizedKeyError` instead.
    """
    parts: list[str] = []
    for name, value in entry.options:
        if value is None:
            parts.append(name)
            continue
        _check_representable(f"the value of option {name!r}", value)
        if value.endswith("\\"):
            raise AuthorizedKeyError(
                f"the value of option {name!r} ends with a backslash, which the"
                " authorized_keys format cannot represent"
            )
        parts.append(name + '="' + value.replace('"', '\\"') + '"')
    _check_representable("the comment", entry.comment)
    if entry.comment != entry.comment.strip(_BLANKS):
        raise AuthorizedKeyError("the comment starts or ends with a blank")
    fields = [entry.keytype, base64.b64encode(entry.blob).decode("ascii")]
    if parts:
        fields.insert(0, ",".join(parts))
    if entry.comment:
        fields.append(entry.comment)
    line = " ".join(fields)
    if parse_line(line) != entry:
        raise AuthorizedKeyError("the entry does not survive a round trip through the file format")
    return line


def parse_text(
    text: str, first_lineno: int = 1
) -> tuple[list[AuthorizedKey], list[tuple[int, str]]]:
    """
    Parse a whole file's text.

    Returns the entries and, for each line that could not be parsed, its
    1-based line number and the reason. Lines end at ``\\n`` only (as in
    OpenSSH; other Unicode line separators are ordinary characters), a
    ``\\r`` before it is dropped, and a leading UTF-8 BOM is ignored.
    ``first_lineno`` numbers the lines of a tail read after the others.
    """
    if text.startswith("\ufeff") and first_lineno == 1:
        text = text[1:]
    entries: list[AuthorizedKey] = []
    errors: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.split("\n"), start=first_lineno):
        try:
            entry = parse_line(line, lineno)
        except AuthorizedKeyError as exc:
            errors.append((lineno, str(exc)))
        else:
            if entry is not None:
                entries.append(entry)
    return entries, errors


def _decode(data: bytes, strip_bom: bool = True) -> str:
    """Decode file bytes line by line so one bad byte spoils only its line."""
    if strip_bom and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return "\n".join(line.decode("utf-8", "replace") for line in data.split(b"\n"))


# ---------------------------------------------------------------------------
# from= matching

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


class _InvalidPatternError(Exception):
    """A from= pattern that looks like an address but is not a valid one."""


def _parse_address(text: str) -> _IPAddress | None:
    """Parse an IP literal, reading an IPv4-mapped IPv6 address as IPv4."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_network(pattern: str) -> _IPNetwork | None:
    """
    Parse an address or CIDR pattern; None if it is a glob instead.

    Raises `_InvalidPatternError` for a bad CIDR (mask too long, host bits set,
    garbage after ``/``): OpenSSH treats those as an error that denies.
    """
    if "/" not in pattern:
        address = _parse_address(pattern)
        return None if address is None else ipaddress.ip_network(address)
    try:
        network = ipaddress.ip_network(pattern, strict=True)
    except ValueError:
        raise _InvalidPatternError(pattern) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_V4):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _glob(pattern: str, text: str) -> bool:
    """OpenSSH's match_pattern: only ``*`` and ``?`` are special (no ``[]``).

    Matched without backtracking (`policy.glob_match`): a regex built from
    ``*a*a*a...b`` took 31 s of CPU for one 63-character host name.
    """
    return glob_match(pattern, text)


def match_from(patterns: str, address: str, hostname: str | None = None) -> bool:
    """
    Match one ``from=`` pattern list as OpenSSH's ``match_host_and_ip`` does.

    ``patterns`` is comma separated. A pattern is an IP address or CIDR
    network (compared with the address; IPv4-mapped IPv6 on either side
    counts as IPv4) or a ``*``/``?`` glob matched case-insensitively against
    the address and the hostname. Any matching ``!pattern`` denies at once;
    otherwise one matching positive pattern allows. An invalid CIDR anywhere
    denies (fail closed, like OpenSSH), and so does an empty list.

    ``hostname`` should be the verified (forward-confirmed) name, or None.
    A hostname that is itself an IP literal is ignored, since it can only
    come from a PTR record faking an address.
    """
    ip = _parse_address(address)
    address_text = (str(ip) if ip is not None else address).lower()
    if hostname is not None and _parse_address(hostname) is None:
        host = hostname.lower().rstrip(".")
    else:
        host = address_text
    matched = False
    for item in patterns.split(","):
        if not item:
            continue
        negated = item.startswith("!")
        pattern = item[1:] if negated else item
        if not pattern:
            return False
        try:
            network = _parse_network(pattern)
        except _InvalidPatternError:
            return False
        if network is not None:
            hit = ip is not None and ip.version == network.version and ip in network
        else:
            lowered = pattern.lower()
            hit = (ip is not None and _glob(lowered, address_text)) or _glob(lowered, host)
        if hit:
            if negated:
                return False
            matched = True
    return matched


def is_hostname_pattern(pattern: str) -> bool:
    """True if a ``from=`` pattern can only match a host name (``*.lan``, ``local*``).

    Address literals, networks and globs of digits, dots and colons are matched
    against the address alone, so keys with only those never cost a DNS lookup.
    """
    pattern = pattern.removeprefix("!")
    if ":" in pattern or "/" in pattern or _parse_address(pattern) is not None:
        return False
    return any(c.isalpha() for c in pattern)


def wants_hostname(entry: AuthorizedKey) -> bool:
    """True if one of the line's ``from=`` lists has a hostname pattern."""
    return any(is_hostname_pattern(p) for ps in entry.from_patterns for p in ps.split(","))


def from_allows(entry: AuthorizedKey, address: str, hostname: str | None = None) -> bool:
    """True if every ``from=`` of ``entry`` matches (vacuously true without any)."""
    return all(match_from(p, address, hostname) for p in entry.from_patterns)


# ---------------------------------------------------------------------------
# The live file


#: How long after a load the file's stat signature is not trusted on its
#: own: a same-size edit within one timestamp tick of the load leaves
#: (mtime, inode, size) unchanged, so until a re-read made this long after
#: the load, content is compared too. 2 s covers FAT-style granularity.
_RACY_SECONDS = 2.0

_Signature = tuple[int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_ino, st.st_size, st.st_dev)


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _flock_shared(fd: int, timeout: float | None) -> bool:
    """Take a shared flock: None waits as long as it takes, 0 tries once, else polls."""
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return True
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.05)


def _b64_tokens(text: str) -> set[str]:
    return set(_B64_TOKEN_RE.findall(text))


class AuthorizedKeysBusy(AuthorizedKeysUnavailable):
    """
    A writer held the file's lock longer than a login may wait.

    The view from before the write must not decide a login (a ban written
    meanwhile would be ignored), so the login is refused instead.
    """


#: How long a login waits for a writer's lock before it is refused.
LOGIN_LOCK_WAIT = 10.0

#: Reloads that would parse more bytes than this are done off the reactor
#: thread by the periodic check (about 40 us a line, so ~25 ms at most inline).
INLINE_RELOAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class _View:
    """One parsed state of the file; replaced whole, never changed in place."""

    entries: tuple[AuthorizedKey, ...] = ()
    index: dict[bytes, tuple[AuthorizedKey, ...]] = field(default_factory=dict)
    tainted: dict[str, int] = field(default_factory=dict)
    errors: tuple[tuple[int, str], ...] = ()
    first_use: int = 0
    size: int = 0
    lines: int = 0
    ends_with_newline: bool = True


def _index_of(
    base: dict[bytes, tuple[AuthorizedKey, ...]], entries: Iterable[AuthorizedKey]
) -> dict[bytes, tuple[AuthorizedKey, ...]]:
    index = dict(base)
    for entry in entries:
        index[entry.blob] = (*index.get(entry.blob, ()), entry)
    return index


def _is_first_use(entry: AuthorizedKey) -> bool:
    """A line of the shape first use writes (and the cap counts)."""
    return entry.options == tuple(("access", a) for a in TOFU_ACCESS)


class AuthorizedKeysFile:
    """
    A live view of one authorized_keys file.

    `entries` re-reads the file when it changes, so edits take effect for
    new logins without a restart; `append` adds a TOFU key safely against
    concurrent appenders (threads and processes, through ``flock``) and
    against a full disk. Every method may be called from any thread.

    Keys are indexed by blob, and a reload that finds only lines appended
    after the old content parses just those lines: first-use appends and
    ``>>`` edits cost what they add, not the size of the file. Parsing
    happens outside the lock that readers take, so a thread parsing a big
    file never stalls a reader on the reactor thread.
    """

    def __init__(
        self,
        path: str,
        log: Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._log = log if log is not None else Logger()
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below; held briefly
        self._loading = threading.Lock()  # one reload at a time; held while parsing
        self._listeners: list[Callable[[], None]] = []
        self._signature: _Signature | None = None
        self._digest: bytes | None = None
        self._loaded_at = 0.0
        self._racy = False
        self._view = _View()
        self._loaded_once = False
        self._unavailable: str | None = None

    def ensure_exists(self) -> None:
        """Create an empty file (mode 0600, parent 0700) if there is none."""
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return
        try:
            os.fchmod(fd, 0o600)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(parent)
        self._log.info("Created empty authorized_keys file {path}", path=self.path)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after each reload that changed the entries.

        It runs on the thread that did the reload, which may be a worker
        thread: a listener that touches Twisted must hop to the reactor.
        """
        self._listeners.append(callback)

    # -- reading ----------------------------------------------------------

    def _fail(self, reason: str, err: int) -> AuthorizedKeysUnavailable:
        with self._lock:
            changed = self._unavailable != reason
            self._unavailable = reason
            self._signature = None
        if changed:
            self._log.error(
                "authorized_keys file {path} is unavailable ({reason});"
                " refusing key logins until it is back",
                path=self.path,
                reason=reason,
            )
        return AuthorizedKeysUnavailable(err, f"authorized_keys unavailable: {reason}", self.path)

    def _stat(self) -> os.stat_result:
        try:
            return os.stat(self.path)
        except OSError as exc:
            raise self._fail(exc.strerror or str(exc), exc.errno or errno.EIO) from None

    def _current(self, st: os.stat_result) -> _View | None:
        """The view if ``st`` proves it is up to date, else None."""
        with self._lock:
            if self._unavailable is None and self._signature == _signature(st) and not self._racy:
                return self._view
        return None

    def reload_cost(self) -> int:
        """Bytes the next reload would parse (0: none); a guess made from stat alone."""
        try:
            st = self._stat()
        except AuthorizedKeysUnavailable:
            return 0
        if self._current(st) is not None:
            return 0
        with self._lock:
            view, signature = self._view, self._signature
        appended = (
            signature is not None
            and (signature[1], signature[3]) == (st.st_ino, st.st_dev)
            and st.st_size > view.size
            and view.ends_with_newline
        )
        return max(1, st.st_size - view.size if appended else st.st_size)

    def entries(self, wait: float = 0.0) -> list[AuthorizedKey]:
        """
        The current entries, re-read if the file changed since the last load.

        Raises `AuthorizedKeysUnavailable` if the file is missing or
        unreadable; logins must then be refused. With ``wait`` 0 (the
        reactor thread) this never waits for a writer: while an append
        holds the lock, the previous view is returned. With ``wait`` > 0
        (a worker thread deciding a login) it waits up to that long for the
        lock and raises `AuthorizedKeysBusy` if it is still held, so a
        login is never decided on a view older than the file.
        """
        return list(self._refresh(wait).entries)

    def _refresh(self, wait: float, stale: bool = True) -> _View:
        view = self._current(self._stat())
        if view is not None:
            return view
        with self._lock:
            have_view = self._signature is not None
        if wait > 0:
            if not self._loading.acquire(timeout=wait):
                raise AuthorizedKeysBusy(errno.EAGAIN, "authorized_keys is busy", self.path)
        elif have_view:
            if not self._loading.acquire(blocking=False):
                if not stale:
                    raise AuthorizedKeysBusy(errno.EAGAIN, "authorized_keys is busy", self.path)
                with self._lock:
                    return self._view
        else:
            self._loading.acquire()
        try:
            return self._reload(wait, have_view, stale)
        finally:
            self._loading.release()

    def _reload(self, wait: float, have_view: bool, stale: bool) -> _View:
        view = self._current(self._stat())  # another thread may just have loaded it
        if view is not None:
            return view
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise self._fail(exc.strerror or str(exc), exc.errno or errno.EIO) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._fail("not a regular file", errno.EISDIR)
            if not _flock_shared(fd, wait if wait > 0 else (None if not have_view else 0.0)):
                if wait > 0 or not stale:
                    raise AuthorizedKeysBusy(errno.EAGAIN, "authorized_keys is busy", self.path)
                with self._lock:
                    return self._view
            try:
                data = _read_fd(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            if isinstance(exc, AuthorizedKeysUnavailable):
                raise
            raise self._fail(exc.strerror or str(exc), exc.errno or errno.EIO) from None
        finally:
            os.close(fd)
        return self._load(st, data)

    def _load(self, st: os.stat_result, data: bytes) -> _View:
        digest = hashlib.sha256(data).digest()
        now = self._clock()
        with self._lock:
            recovered = self._unavailable is not None
            self._unavailable = None
            old, old_digest, old_signature = self._view, self._digest, self._signature
            if old_digest == digest and old_signature is not None:
                # Same bytes (a racy re-check, or a touch): keep the view.
                # A re-read this long after the load proves that any later
                # edit will change the mtime, so the signature is trusted
                # again; a new signature starts a new racy window.
                if old_signature != _signature(st):
                    self._signature = _signature(st)
                    self._loaded_at = now
                    self._racy = True
                else:
                    self._racy = now - self._loaded_at < _RACY_SECONDS
                return old
        appended = (
            old_signature is not None
            and old.size > 0
            and old.ends_with_newline
            and len(data) > old.size
            and hashlib.sha256(data[: old.size]).digest() == old_digest
        )
        if appended:
            # Only lines were added after the old content: parse just those.
            text = _decode(data[old.size :], strip_bom=False)
            added, added_errors = parse_text(text, first_lineno=old.lines + 1)
            relative = [(n - old.lines, r) for n, r in added_errors]
            tail_tainted = {
                token: n + old.lines
                for token, n in _tainted_tokens(text.split("\n"), relative).items()
            }
            view = _View(
                entries=old.entries + tuple(added),
                index=_index_of(old.index, added),
                tainted={**old.tainted, **tail_tainted},
                errors=old.errors + tuple(added_errors),
                first_use=old.first_use + sum(map(_is_first_use, added)),
            )
            checked: Iterable[AuthorizedKey] = added
            changed = bool(added) or bool(tail_tainted)
        else:
            text = _decode(data)
            parsed, errors = parse_text(text)
            view = _View(
                entries=tuple(parsed),
                index=_index_of({}, parsed),
                tainted=_tainted_tokens(text.split("\n"), errors),
                errors=tuple(errors),
                first_use=sum(map(_is_first_use, parsed)),
            )
            checked = view.entries
            changed = self._loaded_once and old.entries != view.entries
        view = dataclasses.replace(
            view,
            size=len(data),
            lines=data.count(b"\n"),
            ends_with_newline=not data or data.endswith(b"\n"),
        )
        with self._lock:
            self._view = view
            self._signature = _signature(st)
            self._digest = digest
            self._loaded_at = now
            self._racy = True
            self._loaded_once = True
        if recovered:
            self._log.info("authorized_keys file {path} is readable again", path=self.path)
        self._warn(view, st, checked)
        if changed:
            for callback in list(self._listeners):
                try:
                    callback()
                except Exception:
                    self._log.failure("authorized_keys change listener failed")
        return view

    def _warn(
        self,
        view: _View,
        st: os.stat_result,
        checked: Iterable[AuthorizedKey],
    ) -> None:
        """Each bad line once per reload, as an operator expects after any change."""
        for lineno, reason in view.errors:
            self._log.warn(
                "{path}, line {lineno}: {reason}; line ignored",
                path=self.path,
                lineno=lineno,
                reason=reason,
            )
        for entry in checked:
            if entry.policy_error is not None and not entry.cert_authority:
                self._log.warn(
                    "{path}, line {lineno}: {reason}; the key is refused",
                    path=self.path,
                    lineno=entry.lineno,
                    reason=entry.policy_error,
                )
            if entry.keytype == "ssh-dss":
                self._log.warn(
                    "{path}, line {lineno}: ssh-dss keys are obsolete and are refused at login",
                    path=self.path,
                    lineno=entry.lineno,
                )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            self._log.warn(
                "authorized_keys file {path} is writable by group or others;"
                " anyone who can write it can grant themselves access",
                path=self.path,
            )

    def problems(self) -> list[tuple[int, str]]:
        """Lines of the file as last loaded that could not be parsed: (line number, why)."""
        with self._lock:
            return list(self._view.errors)

    @property
    def first_use_count(self) -> int:
        """Lines of the shape first use writes, in the current view."""
        with self._lock:
            return self._view.first_use

    def lookup(
        self, blob: bytes, wait: float = 0.0, stale: bool = True, *, ca: bool = False
    ) -> AuthorizedKey | None:
        """
        The entry whose options apply to the key ``blob``, or None.

        That is the first line with this key, except that a denied line for
        the key anywhere wins. A line that failed to parse but contains the
        key also counts as denied (fail closed: a typo in a deny line must
        not let the key in). ``cert-authority`` lines never admit a plain
        key. Raises `AuthorizedKeysUnavailable` like `entries`, with the
        same meaning of ``wait``; with ``stale`` False, a writer holding the
        lock raises `AuthorizedKeysBusy` at once instead of giving the
        previous view (for a login decided on the reactor thread). With
        ``ca`` True it finds the ``cert-authority`` line of the CA key
        ``blob`` instead (and only such a line).
        """
        view = self._refresh(wait, stale)
        return _resolve(list(view.index.get(blob, ())), view.tainted, blob, ca)

    def resolve(self, blob: bytes, *, ca: bool = False) -> AuthorizedKey | None:
        """`lookup` in the view as last loaded, without looking at the file.

        For change listeners: they run right after a reload, so the view is
        the file, and re-checking N connected keys must not read it N times.
        """
        with self._lock:
            view = self._view
        return _resolve(list(view.index.get(blob, ())), view.tainted, blob, ca)

    def cached_lookup(self, blob: bytes, *, ca: bool = False) -> tuple[bool, AuthorizedKey | None]:
        """``(True, entry)`` if the view is provably current, else ``(False, None)``.

        For the reactor thread: a stat and a dictionary lookup, never a read
        or a parse; a caller that gets False does a `lookup` in a thread.
        """
        try:
            view = self._current(self._stat())
        except AuthorizedKeysUnavailable:
            return False, None
        if view is None:
            return False, None
        return True, _resolve(list(view.index.get(blob, ())), view.tainted, blob, ca)

    # -- writing ----------------------------------------------------------

    def _open_locked(self, flags: int) -> int:
        """
        Open the file and take an exclusive flock on it.

        If the file was replaced (by `rewrite` or an editor) while we waited
        for the lock, our descriptor points at the old inode; retry so the
        write lands in the file that is actually in place.
        """
        while True:
            try:
                fd = os.open(self.path, flags | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise AuthorizedKeysUnavailable(
                    exc.errno, "authorized_keys file is missing", self.path
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = os.fstat(fd)
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is not None and (current.st_ino, current.st_dev) == (
                    held.st_ino,
                    held.st_dev,
                ):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def append(self, entry: AuthorizedKey) -> AuthorizedKey | None:
        """
        Append ``entry`` for trust on first use, atomically and durably.

        Returns the entry that now applies to the key, decided from the
        bytes read under the lock (as `lookup` would): ``entry`` itself
        when it was written, otherwise the line already there (maybe denied,
        or with a ``from=``), so the caller judges the login on what the
        file says at that moment and never on an older view.

        Under an exclusive ``flock``, the file is re-read and nothing is
        written if the key is already there (on any line, even one that
        fails to parse). Otherwise the complete line, with a newline in
        front if the file lacks a final one, goes out in one ``write`` with
        ``O_APPEND`` and is fsynced. If anything fails (ENOSPC, EIO) the file
        is truncated back to its old size, so no partial line remains, and
        the error is re-raised.
        """
        line = serialise(entry)
        token = base64.b64encode(entry.blob).decode("ascii")
        fd = self._open_locked(os.O_RDWR | os.O_APPEND)
        try:
            data = _read_fd(fd)
            text = _decode(data)
            if token in _b64_tokens(text):
                entries, errors = parse_text(text)
                tainted = _tainted_tokens(text.split("\n"), errors)
                return _resolve([e for e in entries if e.blob == entry.blob], tainted, entry.blob)
            size = len(data)
            payload = (line + "\n").encode("utf-8")
            if data and not data.endswith(b"\n"):
                payload = b"\n" + payload
            try:
                written = os.write(fd, payload)
                if written != len(payload):
                    raise OSError(errno.EIO, "short write to authorized_keys", self.path)
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    self._log.failure("could not undo a failed append to {path}", path=self.path)
                raise
            lineno = text.count("\n") + (2 if text and not text.endswith("\n") else 1)
            return dataclasses.replace(entry, lineno=lineno)
        finally:
            os.close(fd)  # also releases the flock

    def rewrite(self, transform: Callable[[list[str]], list[str]]) -> None:
        """
        Replace the file's lines with ``transform(lines)``, atomically.

        ``lines`` are the raw lines without their ``\\n`` (a ``\\r`` stays,
        undecodable bytes survive as surrogate escapes), so comments and
        lines this module does not understand come back byte for byte; a
        leading UTF-8 BOM is kept out of line 1 and written back. The
        new content goes to a temporary file in the same directory with the
        old mode, is fsynced and renamed over the old file, all under the
        same ``flock`` `append` uses. Lines must not contain ``\\n``.
        """
        fd = self._open_locked(os.O_RDWR)
        try:
            st = os.fstat(fd)
            text = _read_fd(fd).decode("utf-8", "surrogateescape")
            # A BOM (some Windows editors write one) is not part of line 1:
            # the reader skips it, so the edit must too, or it would not
            # recognise the first key; it is put back in front afterwards.
            bom = "\ufeff" if text.startswith("\ufeff") else ""
            text = text[len(bom) :]
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            new_lines = transform(list(lines))
            for new_line in new_lines:
                if "\n" in new_line:
                    raise ValueError("rewrite: a line must not contain a newline")
            new_text = bom + "".join(x + "\n" for x in new_lines)
            directory = os.path.dirname(os.path.abspath(self.path))
            tmp_fd, tmp_path = tempfile.mkstemp(
                dir=directory, prefix="." + os.path.basename(self.path) + "."
            )
            try:
                try:
                    os.fchmod(tmp_fd, stat.S_IMODE(st.st_mode))
                    try:
                        os.fchown(tmp_fd, st.st_uid, st.st_gid)
                    except PermissionError:
                        pass
                    payload = new_text.encode("utf-8", "surrogateescape")
                    view = memoryview(payload)
                    while view:
                        view = view[os.write(tmp_fd, view) :]
                    os.fsync(tmp_fd)
                finally:
                    os.close(tmp_fd)
                os.replace(tmp_path, self.path)
            except BaseException:
                try:
                    os.unlink(tmp_path)
                except OSError:
                    pass
                raise
            _fsync_dir(directory)
        finally:
            os.close(fd)


def _resolve(
    matching: list[AuthorizedKey], tainted: dict[str, int], blob: bytes, ca: bool = False
) -> AuthorizedKey | None:
    """The entry that applies to ``blob`` among its lines ``matching``; see `lookup`."""
    for entry in matching:
        if entry.denied or (not entry.cert_authority and entry.policy_error is not None):
            # A line whose options cannot be honoured denies its key, wherever it is:
            # its administrator meant it to restrict the key.
            return entry
    bad_lineno = tainted.get(base64.b64encode(blob).decode("ascii"))
    if bad_lineno is not None:
        return AuthorizedKey(
            (("access", _access.DENIED),),
            _wire_strings_safe_type(blob),
            blob,
            f"line {bad_lineno} could not be parsed",
            bad_lineno,
        )
    for entry in matching:
        if entry.cert_authority == ca:
            return entry
    return None


def _tainted_tokens(lines: list[str], errors: list[tuple[int, str]]) -> dict[str, int]:
    """Base64 tokens of lines that failed to parse, with their line numbers."""
    return {token: lineno for lineno, _ in errors for token in _b64_tokens(lines[lineno - 1])}


def _wire_strings_safe_type(blob: bytes) -> str:
    """The key type named inside ``blob``, or "unknown"."""
    try:
        parts = _wire_strings(blob)
    except AuthorizedKeyError:
        return "unknown"
    return parts[0].decode("ascii", "replace") if parts else "unknown"


def _fsync_dir(path: str) -> None:
    """Make a create or rename durable; best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
