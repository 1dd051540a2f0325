# -*- test-case-name: tests.test_certs -*-
"""OpenSSH user certificates and revoked keys.

A ``cert-authority`` line in authorized_keys lets a fleet sign its devices'
keys once instead of listing every key. This module reads a certificate
(`parse`), judges it against the CA's line and the connection
(`check`), and reads the operator's list of revoked keys
(`RevokedKeys`: a plain key list or OpenSSH's binary KRL). Parsing and the
CA's signature are left to ``cryptography``; the rules are OpenSSH's where
the switchboard has an equivalent, and stricter where OpenSSH's default is
a trap (a certificate without principals is valid for *any* user name in
OpenSSH; here it is refused).

Every refusal is a `CertificateError` whose text is shown to the client, so
it must say what is wrong in words a user can act on, and never include
more than a bounded, escaped piece of what the peer sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import stat
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import (
    SSHCertificate,
    SSHCertificateType,
    load_ssh_public_identity,
)
from twisted.conch.ssh import keys

from .authkeys import fingerprint_of
from .names import escape
from .policy import KeyPolicy, check_command

__all__ = [
    "CERT_ALGORITHMS",
    "CertLogin",
    "Certificate",
    "CertificateError",
    "RevokedKeys",
    "RevokedKeysUnavailable",
    "check",
    "is_cert_algorithm",
    "parse",
]

#: Signature algorithm named in USERAUTH_REQUEST -> (certificate blob type,
#: algorithm of the signature made with the certified key).
CERT_ALGORITHMS: dict[bytes, tuple[bytes, bytes]] = {
    b"ssh-ed25519-cert-v01@openssh.com": (b"ssh-ed25519-cert-v01@openssh.com", b"ssh-ed25519"),
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": (
        b"ecdsa-sha2-nistp256-cert-v01@openssh.com",
        b"ecdsa-sha2-nistp256",
    ),
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": (
        b"ecdsa-sha2-nistp384-cert-v01@openssh.com",
        b"ecdsa-sha2-nistp384",
    ),
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": (
        b"ecdsa-sha2-nistp521-cert-v01@openssh.com",
        b"ecdsa-sha2-nistp521",
    ),
    b"rsa-sha2-512-cert-v01@openssh.com": (b"ssh-rsa-cert-v01@openssh.com", b"rsa-sha2-512"),
    b"rsa-sha2-256-cert-v01@openssh.com": (b"ssh-rsa-cert-v01@openssh.com", b"rsa-sha2-256"),
    b"ssh-rsa-cert-v01@openssh.com": (b"ssh-rsa-cert-v01@openssh.com", b"ssh-rsa"),
}

#: Number of key fields (after the nonce) in each certificate type's blob.
_KEY_FIELDS = {
    b"ssh-ed25519-cert-v01@openssh.com": 1,
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": 2,
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": 2,
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": 2,
    b"ssh-rsa-cert-v01@openssh.com": 2,
}

#: Largest certificate blob read. An RSA-8192 key signed by an RSA-8192 CA
#: with a few hundred principals stays well under it; a peer's megabyte of
#: "certificate" is refused before it is parsed.
MAX_CERT_BYTES = 16 * 1024
#: OpenSSH's SSHKEY_CERT_MAX_PRINCIPALS.
MAX_PRINCIPALS = 256
#: How much of a key id or principal is shown or logged.
MAX_SHOWN = 64

#: valid_before meaning "forever" (ssh-keygen -V always:forever).
FOREVER = 0xFFFFFFFFFFFFFFFF

#: Critical options the switchboard honours; any other refuses the
#: certificate, as OpenSSH refuses one it does not understand.
KNOWN_CRITICAL = frozenset({"force-command", "source-address"})

#: CA signature algorithms accepted (OpenSSH's CASignatureAlgorithms default).
CA_SIGNATURE_ALGORITHMS = frozenset(
    {
        b"ssh-ed25519",
        b"ecdsa-sha2-nistp256",
        b"ecdsa-sha2-nistp384",
        b"ecdsa-sha2-nistp521",
        b"rsa-sha2-512",
        b"rsa-sha2-256",
    }
)

#: Largest revoked-keys file read (a KRL with a million serials is ~8 MB).
MAX_REVOKED_BYTES = 32 * 1024 * 1024


class CertificateError(ValueError):
    """A certificate cannot log in; the message is shown to the client."""


def is_cert_algorithm(alg_name: bytes) -> bool:
    """True for a ``*-cert-v01@openssh.com`` signature algorithm name."""
    return alg_name.endswith(b"-cert-v01@openssh.com")


def _utc(seconds: int) -> str:
    if seconds >= FOREVER:
        return "forever"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return str(seconds)


def _shown(value: bytes | str) -> str:
    text = value if isinstance(value, str) else value.decode("utf-8", "replace")
    more = "..." if len(text) > MAX_SHOWN else ""
    return escape(text[:MAX_SHOWN]) + more


@dataclass(frozen=True)
class Certificate:
    """One parsed user certificate whose CA signature has been verified."""

    blob: bytes = field(repr=False)
    cert_type: bytes
    key_blob: bytes = field(repr=False)
    ca_blob: bytes = field(repr=False)
    serial: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical: tuple[tuple[str, str], ...]
    extensions: frozenset[str]

    @property
    def fingerprint(self) -> str:
        """The certified key's fingerprint (what ``ssh-keygen -l`` shows for the key)."""
        return fingerprint_of(self.key_blob)

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint_of(self.ca_blob)

    def describe(self) -> str:
        """For log lines: id, serial and CA, as OpenSSH's sshd logs a certificate."""
        return (
            f'certificate ID "{_shown(self.key_id)}" serial {self.serial} CA {self.ca_fingerprint}'
        )


@dataclass(frozen=True)
class CertLogin:
    """What a verified certificate grants a login, beyond its CA line's options."""

    key_id: str
    serial: int
    ca_blob: bytes = field(repr=False)
    ca_fingerprint: str
    principal: str
    valid_before: int
    force_command: str | None
    permit_pty: bool
    permit_port_forwarding: bool

    def describe(self) -> str:
        return (
            f'certificate ID "{_shown(self.key_id)}" serial {self.serial} CA {self.ca_fingerprint}'
        )


class _Reader:
    """SSH wire fields from a blob, raising `CertificateError` when it runs out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CertificateError("malformed certificate: truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self) -> bytes:
        (n,) = struct.unpack(">I", self.take(4))
        return self.take(n)

    def uint64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def done(self) -> bool:
        return self.pos >= len(self.data)


def _ca_signature_algorithm(blob: bytes, cert_type: bytes) -> bytes:
    """The algorithm of the CA's signature, read from the fields cryptography hides."""
    reader = _Reader(blob)
    reader.string()  # type
    reader.string()  # nonce
    for _ in range(_KEY_FIELDS[cert_type]):
        reader.string()
    reader.take(12)  # serial, type
    reader.string()  # key id
    reader.string()  # principals
    reader.take(16)  # validity
    for _ in range(4):  # critical options, extensions, reserved, signature key
        reader.string()
    signature = _Reader(reader.string())
    return signature.string()


def _name_value_pairs(items: dict[bytes, bytes], what: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name, value in items.items():
        try:
            pairs.append((name.decode("utf-8"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise CertificateError(f"malformed certificate: a {what} is not UTF-8") from None
    return tuple(pairs)


def parse(blob: bytes, alg_name: bytes | None = None) -> Certificate:
    """
    Read a user certificate and verify its CA's signature.

    ``alg_name`` is the algorithm the client named; it must fit the blob.
    Raises `CertificateError` with a sentence for the client; nothing the
    peer sends can make this raise anything else.
    """
    if len(blob) > MAX_CERT_BYTES:
        raise CertificateError(
            f"certificate too large ({len(blob)} bytes; at most {MAX_CERT_BYTES})"
        )
    try:
        cert_type = _Reader(blob).string()
    except (CertificateError, struct.error):
        raise CertificateError("malformed certificate") from None
    if cert_type not in _KEY_FIELDS:
        raise CertificateError(f"unsupported certificate type {_shown(cert_type)}")
    if alg_name is not None:
        expected = CERT_ALGORITHMS.get(alg_name, (None, None))[0]
        if expected != cert_type:
            raise CertificateError(
                f"signature algorithm {_shown(alg_name)} does not fit a {_shown(cert_type)}"
            )
    try:
        cert = load_ssh_public_identity(cert_type + b" " + base64.b64encode(blob))
    except (ValueError, UnsupportedAlgorithm, TypeError, struct.error) as exc:
        raise CertificateError(f"malformed certificate ({_shown(str(exc))})") from None
    if not isinstance(cert, SSHCertificate):
        raise CertificateError("malformed certificate")
    if cert.type != SSHCertificateType.USER:
        raise CertificateError("a host certificate cannot log in a user")
    if len(cert.valid_principals) > MAX_PRINCIPALS:
        raise CertificateError(f"the certificate names more than {MAX_PRINCIPALS} principals")
    try:
        ca_alg = _ca_signature_algorithm(blob, cert_type)
    except (CertificateError, struct.error):
        raise CertificateError("malformed certificate: bad signature field") from None
    if ca_alg not in CA_SIGNATURE_ALGORITHMS:
        raise CertificateError(
            f"the certificate is signed with {_shown(ca_alg)}, which is not accepted"
            " (re-sign it with an ed25519, ecdsa or rsa-sha2-256/512 CA signature)"
        )
    try:
        cert.verify_cert_signature()
    except InvalidSignature:
        raise CertificateError("the certificate's CA signature does not verify") from None
    except (ValueError, UnsupportedAlgorithm, TypeError) as exc:
        raise CertificateError(
            f"the certificate's CA signature cannot be checked ({exc})"
        ) from None
    try:
        key_blob = keys.Key(cert.public_key()).blob()
        ca_blob = keys.Key(cert.signature_key()).blob()
    except (keys.BadKeyError, ValueError, TypeError) as exc:
        raise CertificateError(f"unsupported key in the certificate ({_shown(str(exc))})") from None
    try:
        principals = tuple(p.decode("utf-8") for p in cert.valid_principals)
        key_id = cert.key_id.decode("utf-8")
    except UnicodeDecodeError:
        raise CertificateError(
            "malformed certificate: a principal or key id is not UTF-8"
        ) from None
    return Certificate(
        blob=blob,
        cert_type=cert_type,
        key_blob=key_blob,
        ca_blob=ca_blob,
        serial=cert.serial,
        key_id=key_id,
        principals=principals,
        valid_after=cert.valid_after,
        valid_before=cert.valid_before,
        critical=_name_value_pairs(cert.critical_options, "critical option"),
        extensions=frozenset(n for n, _ in _name_value_pairs(cert.extensions, "extension")),
    )


def _source_allows(patterns: str, peer: str) -> bool:
    """OpenSSH's source-address: comma-separated addresses or CIDR blocks."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for item in patterns.split(","):
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise CertificateError(
                f"the certificate's source-address {_shown(item)} is not an address or CIDR block"
            ) from None
        if address.version == network.version and address in network:
            return True
    return False


def _principal_allowed(principal: str, patterns: Iterable[str]) -> bool:
    from . import authkeys  # the glob matcher of from=; authkeys imports nothing from here

    for pattern_list in patterns:
        if any(authkeys._glob(p.strip(), principal) for p in pattern_list.split(",") if p.strip()):
            return True
    return False


def check(
    cert: Certificate,
    username: str,
    peer: str,
    now: float,
    principals_options: tuple[str, ...] = (),
) -> CertLogin:
    """
    Whether ``cert`` logs in ``username`` from ``peer`` at ``now``.

    The user name must be one of the certificate's principals (the login's
    hostname is that name); ``principals_options`` are the CA line's
    ``principals=`` values, which restrict which names that CA may vouch
    for (comma-separated globs). Raises `CertificateError`.
    """
    if now < cert.valid_after:
        raise CertificateError(f"the certificate is not valid before {_utc(cert.valid_after)}")
    if cert.valid_before != FOREVER and now >= cert.valid_before:
        raise CertificateError(f"the certificate expired at {_utc(cert.valid_before)}")
    if not cert.principals:
        raise CertificateError(
            "the certificate names no principals (sign it with ssh-keygen -n NAME)"
        )
    if username not in cert.principals:
        names = ", ".join(_shown(p) for p in cert.principals[:8])
        more = ", ..." if len(cert.principals) > 8 else ""
        raise CertificateError(
            f"the certificate is not valid for user {_shown(username)} (it names {names}{more})"
        )
    if principals_options and not _principal_allowed(username, principals_options):
        raise CertificateError(
            f"this certificate authority may not vouch for the name {_shown(username)}"
        )
    force_command: str | None = None
    for name, value in cert.critical:
        if name not in KNOWN_CRITICAL:
            raise CertificateError(
                f"the certificate has an unsupported critical option {_shown(name)}"
            )
        if name == "source-address" and not _source_allows(value, peer):
            raise CertificateError(f"the certificate is not valid from {_shown(peer)}")
        if name == "force-command":
            force_command = value
    return CertLogin(
        key_id=cert.key_id,
        serial=cert.serial,
        ca_blob=cert.ca_blob,
        ca_fingerprint=cert.ca_fingerprint,
        principal=username,
        valid_before=cert.valid_before,
        force_command=force_command,
        permit_pty="permit-pty" in cert.extensions,
        permit_port_forwarding="permit-port-forwarding" in cert.extensions,
    )


def policy_of(login: CertLogin) -> KeyPolicy:
    """The certificate's own restrictions, in the terms of an authorized_keys line.

    Raises `PolicyError` for a force-command that is not a nuttconch command
    (it is all that certificate's sessions may run, so it cannot be ignored).
    """
    forever = login.valid_before >= FOREVER
    return KeyPolicy(
        expires=None if forever else float(login.valid_before),
        expiry_text=None if forever else _utc(login.valid_before),
        port_forwarding=login.permit_port_forwarding,
        pty=login.permit_pty,
        command=None if login.force_command is None else check_command(login.force_command),
    )


def login_policy(line: KeyPolicy, login: CertLogin) -> KeyPolicy:
    """What a certificate login may do: its CA line's options narrowed by the certificate's."""
    return line.narrowed(policy_of(login))


# ---------------------------------------------------------------------------
# Revoked keys


class RevokedKeysUnavailable(OSError):  # noqa: N818 (an OSError, like AuthorizedKeysUnavailable)
    """The revoked keys file cannot be read: every key login is refused (fail closed)."""


@dataclass(frozen=True)
class _Revocations:
    """One parsed state of the revoked keys file."""

    blobs: frozenset[bytes] = frozenset()
    sha1: frozenset[bytes] = frozenset()
    sha256: frozenset[bytes] = frozenset()
    # CA blob (b"" for "any CA") -> (serials, serial ranges, key ids)
    serials: dict[bytes, frozenset[int]] = field(default_factory=dict)
    ranges: dict[bytes, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    key_ids: dict[bytes, frozenset[str]] = field(default_factory=dict)
    kind: str = "none"


KRL_MAGIC = b"SSHKRL\n\0"
_KRL_CERTIFICATES = 1
_KRL_EXPLICIT_KEY = 2
_KRL_FINGERPRINT_SHA1 = 3
_KRL_SIGNATURE = 4
_KRL_FINGERPRINT_SHA256 = 5
_KRL_SERIAL_LIST = 0x20
_KRL_SERIAL_RANGE = 0x21
_KRL_SERIAL_BITMAP = 0x22
_KRL_KEY_ID = 0x23
#: Revoked serials a bitmap may expand to (a KRL is written by the operator,
#: but a typo must not turn into gigabytes).
_MAX_BITMAP_SERIALS = 1 << 20


class _KRLError(ValueError):
    pass


def parse_krl(data: bytes) -> _Revocations:
    """OpenSSH's binary KRL (PROTOCOL.krl), as ``ssh-keygen -k`` writes it."""
    try:
        return _parse_krl(data)
    except (CertificateError, struct.error) as exc:
        raise _KRLError(f"malformed KRL ({exc})") from None


def _parse_krl(data: bytes) -> _Revocations:
    reader = _Reader(data)
    if reader.take(8) != KRL_MAGIC:
        raise _KRLError("not a KRL")
    (version,) = struct.unpack(">I", reader.take(4))
    if version != 1:
        raise _KRLError(f"unsupported KRL format version {version}")
    reader.take(24)  # krl version, generated date, flags
    reader.string()  # reserved
    reader.string()  # comment
    blobs: set[bytes] = set()
    sha1: set[bytes] = set()
    sha256: set[bytes] = set()
    serials: dict[bytes, set[int]] = {}
    ranges: dict[bytes, list[tuple[int, int]]] = {}
    key_ids: dict[bytes, set[str]] = {}
    while not reader.done():
        kind = reader.take(1)[0]
        section = _Reader(reader.string())
        if kind == _KRL_CERTIFICATES:
            ca_key = section.string()
            if ca_key:
                ca_key = _canonical_blob(ca_key)
            section.string()  # reserved
            while not section.done():
                sub = section.take(1)[0]
                body = _Reader(section.string())
                if sub == _KRL_SERIAL_LIST:
                    while not body.done():
                        serials.setdefault(ca_key, set()).add(body.uint64())
                elif sub == _KRL_SERIAL_RANGE:
                    low, high = body.uint64(), body.uint64()
                    ranges.setdefault(ca_key, []).append((low, high))
                elif sub == _KRL_SERIAL_BITMAP:
                    offset = body.uint64()
                    bits = int.from_bytes(body.string(), "big")
                    if bits.bit_length() > _MAX_BITMAP_SERIALS:
                        raise _KRLError("serial bitmap too large")
                    found = serials.setdefault(ca_key, set())
                    index = 0
                    while bits:
                        if bits & 1:
                            found.add(offset + index)
                        bits >>= 1
                        index += 1
                elif sub == _KRL_KEY_ID:
                    while not body.done():
                        key_ids.setdefault(ca_key, set()).add(
                            body.string().decode("utf-8", "replace")
                        )
                else:
                    raise _KRLError(f"unknown certificate section type {sub}")
        elif kind == _KRL_EXPLICIT_KEY:
            while not section.done():
                blobs.add(_canonical_blob(section.string()))
        elif kind == _KRL_FINGERPRINT_SHA1:
            while not section.done():
                sha1.add(section.string())
        elif kind == _KRL_FINGERPRINT_SHA256:
            while not section.done():
                sha256.add(section.string())
        elif kind == _KRL_SIGNATURE:
            # A signed KRL: OpenSSH itself ignores the signature when it
            # checks keys against the file (sshd trusts the file's owner).
            break
        else:
            raise _KRLError(f"unknown section type {kind}")
    return _Revocations(
        blobs=frozenset(blobs),
        sha1=frozenset(sha1),
        sha256=frozenset(sha256),
        serials={k: frozenset(v) for k, v in serials.items()},
        ranges={k: tuple(v) for k, v in ranges.items()},
        key_ids={k: frozenset(v) for k, v in key_ids.items()},
        kind="KRL",
    )


def _canonical_blob(blob: bytes) -> bytes:
    """A key blob in the form logins are compared in (Conch's re-encoding)."""
    try:
        return keys.Key.fromString(blob, type="blob").blob()
    except Exception:  # an unknown key type still revokes exactly that blob
        return blob


def parse_key_list(text: str) -> tuple[_Revocations, list[tuple[int, str]]]:
    """A plain list: one public key (or certificate: its key is revoked) a line."""
    blobs: set[bytes] = set()
    errors: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        # Options in front (a line copied from authorized_keys) are skipped.
        index = next(
            (
                i
                for i, f in enumerate(fields[:-1])
                if f.startswith(("ssh-", "ecdsa-", "sk-", "rsa-")) and not f.startswith("ssh-rsa=")
            ),
            None,
        )
        if index is None:
            errors.append((lineno, "no key type and base64 key found"))
            continue
        keytype, encoded = fields[index], fields[index + 1]
        try:
            blob = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            errors.append((lineno, "the key is not valid base64"))
            continue
        if keytype.endswith("-cert-v01@openssh.com"):
            try:
                cert = load_ssh_public_identity(keytype.encode() + b" " + encoded.encode())
            except (ValueError, UnsupportedAlgorithm, TypeError):
                errors.append((lineno, "the certificate cannot be read"))
                continue
            if isinstance(cert, SSHCertificate):
                blob = keys.Key(cert.public_key()).blob()
        blobs.add(_canonical_blob(blob))
    return _Revocations(blobs=frozenset(blobs), kind="key list"), errors


class RevokedKeys:
    """
    The operator's revoked keys file, re-read when it changes.

    Like sshd's RevokedKeys: a listed key is refused whether it is offered
    alone or inside a certificate, and a revoked CA refuses every
    certificate it signed. If the file is missing or unreadable, every key
    login is refused until it is back (fail closed: a deleted list must not
    quietly re-admit stolen keys).
    """

    def __init__(self, path: str, log: object | None = None) -> None:
        from twisted.logger import Logger

        self.path = path
        self._log = log if log is not None else Logger()
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._state = _Revocations()
        self._unavailable: str | None = None

    def _load(self) -> _Revocations:
        try:
            st = os.stat(self.path)
            sig = (st.st_mtime_ns, st.st_ino, st.st_size, st.st_ctime_ns)
            with self._lock:
                if sig == self._signature and self._unavailable is None:
                    return self._state
            if not stat.S_ISREG(st.st_mode):
                raise OSError("not a regular file")
            if st.st_size > MAX_REVOKED_BYTES:
                raise OSError(f"larger than {MAX_REVOKED_BYTES} bytes")
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_REVOKED_BYTES + 1)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            raise
        try:
            if data.startswith(KRL_MAGIC):
                state = parse_krl(data)
                errors: list[tuple[int, str]] = []
            else:
                state, errors = parse_key_list(data.decode("utf-8", "replace"))
        except _KRLError as exc:
            self._fail(str(exc))
            raise RevokedKeysUnavailable(str(exc)) from None
        for lineno, reason in errors:
            self._log.warn(  # type: ignore[attr-defined]
                "{path}, line {lineno}: {reason}; line ignored",
                path=self.path,
                lineno=lineno,
                reason=reason,
            )
        with self._lock:
            recovered = self._unavailable is not None
            self._state, self._signature, self._unavailable = state, sig, None
        self._log.info(  # type: ignore[attr-defined]
            "revoked keys file {path} loaded ({kind}){again}",
            path=self.path,
            kind=state.kind,
            again=", readable again" if recovered else "",
        )
        return state

    def refresh(self) -> None:
        """Read the file now if it changed; a failure is logged, not raised."""
        try:
            self._load()
        except OSError:
            pass

    def _fail(self, reason: str) -> None:
        with self._lock:
            changed = self._unavailable != reason
            self._unavailable, self._signature = reason, None
        if changed:
            self._log.error(  # type: ignore[attr-defined]
                "revoked keys file {path} is unavailable ({reason}); refusing key logins"
                " until it is back",
                path=self.path,
                reason=reason,
            )

    def revoked(self, blob: bytes, cert: Certificate | None = None) -> str | None:
        """Why ``blob`` (or ``cert``, whose key is ``blob``) is revoked, or None.

        Raises `RevokedKeysUnavailable` when the file cannot be read.
        """
        try:
            state = self._load()
        except OSError as exc:
            raise RevokedKeysUnavailable(str(exc)) from None
        if _key_revoked(state, blob):
            return "this key is revoked"
        if cert is None:
            return None
        if _key_revoked(state, cert.ca_blob):
            return "the certificate's authority is revoked"
        for ca in (cert.ca_blob, b""):
            if cert.serial != 0 and cert.serial in state.serials.get(ca, ()):
                return "this certificate is revoked"
            if any(low <= cert.serial <= high for low, high in state.ranges.get(ca, ())):
                return "this certificate is revoked"
            if cert.key_id in state.key_ids.get(ca, ()):
                return "this certificate is revoked"
        return None


def _key_revoked(state: _Revocations, blob: bytes) -> bool:
    return (
        blob in state.blobs
        or hashlib.sha256(blob).digest() in state.sha256
        or hashlib.sha1(blob).digest() in state.sha1  # noqa: S324 (KRL's own format)
    )
