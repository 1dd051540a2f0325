# -*- test-case-name: tests.test_units,tests.test_auth_security -*-
"""Public-key authentication from authorized_keys, with per-key options.

The checker decides everything about a key at probe time (before the
client signs), so a key that is denied, unknown or not allowed from this
address is refused before an agent or hardware token is asked to sign,
and a new key is only ever written to the file after its signature has
been verified.  Refusals carry a sentence that the client is shown in a
USERAUTH_BANNER, because "Permission denied (publickey)" alone tells a
user nothing.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.conch import error as conch_error
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey, SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import authkeys, certs
from .access import ALL, TOFU, Access, authenticated
from .keyrules import admits
from .limits import MAX_SOURCES, source_of
from .logs import conch_logger
from .names import InvalidName, escape, generated_alias, normalise
from .policy import UNRESTRICTED, KeyPolicy, PolicyError

log = Logger()

ALL_ACCESS = ALL
MIN_RSA_BITS = 2048
MAX_USER_BYTES = 1024
# How much of an unsupported key algorithm name is logged.
MAX_ALG_BYTES = 64


class Refused(UnauthorizedLogin):
    """A refusal whose message is shown to the client and logged."""

    def __init__(self, message: str, *, reason: str = "refused") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """Who authenticated, and what their authorized_keys line grants them."""

    username: str
    hostname: str
    aliases: tuple[str, ...]
    access: Access
    fingerprint: str
    key_blob: bytes = field(repr=False)
    peer: str = ""
    new_key: bool = False
    lineno: int = 0
    #: The key options in force (expiry, forwarding, pty, command); see policy.py.
    policy: KeyPolicy = UNRESTRICTED
    #: The client's forward-confirmed host name, if a from= hostname pattern asked.
    peer_name: str | None = None
    # Admitted by a line from authorized_keys_command, not from the file.
    external: bool = False
    # Set when the login used an OpenSSH certificate (its CA's line is ``lineno``).
    certificate: certs.CertLogin | None = None

    @property
    def connect_name(self) -> str:
        return self.aliases[0]


@dataclass
class ConnectionInfo:
    """What the checker needs to know about the connection a login arrives on."""

    peer: str
    conn_id: int = 0
    # The key of the latest attempt, for refusal logs and events.
    fingerprint: str = ""
    # The forward-confirmed host name of ``peer`` (None: none, or not looked up).
    peer_name: str | None = None
    names_checked: bool = False


fingerprint = authkeys.fingerprint_of


class FirstUseLimiter:
    """
    Bounds trust on first use: per source, overall, and in total.

    Every first-use login appends a line that every later reload and the
    key watcher pay for, and anyone can make keys; token buckets (refilled
    per minute, bursting to the same number) bound how fast strangers can
    grow the file, and ``max_keys`` bounds how far: past it, only keys an
    administrator added log in. Sources are grouped as penalties group them
    (an IPv6 /64 counts as one).
    """

    def __init__(
        self,
        per_source: int = 60,
        overall: int = 300,
        max_keys: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_source = per_source
        self.overall = overall
        self.max_keys = max_keys
        self.clock = clock
        self._sources: dict[str, tuple[float, float]] = {}
        self._all = (float(overall), clock())

    @staticmethod
    def _level(bucket: tuple[float, float], rate: int, now: float) -> float:
        tokens, then = bucket
        return min(float(rate), tokens + (now - then) * rate / 60.0)

    def refusal(self, peer: str, first_use_keys: int) -> str | None:
        """Why a new key from ``peer`` may not be trusted now, or None if it may."""
        if first_use_keys >= self.max_keys:
            return (
                "this server trusts no more new keys (its first-use limit is reached);"
                " ask its operator to add yours"
            )
        now = self.clock()
        if self._level(self._all, self.overall, now) < 1:
            return "too many new keys are arriving; try again in a minute"
        bucket = self._sources.get(source_of(peer))
        if bucket is not None and self._level(bucket, self.per_source, now) < 1:
            return "too many new keys from your address; try again later"
        return None

    def take(self, peer: str) -> None:
        """Spend one token of ``peer``'s source and one of the overall bucket."""
        now = self.clock()
        source = source_of(peer)
        if source not in self._sources and len(self._sources) >= MAX_SOURCES:
            full = float(self.per_source)
            self._sources = {
                k: v
                for k, v in self._sources.items()
                if self._level(v, self.per_source, now) < full
            }
        bucket = self._sources.get(source, (float(self.per_source), now))
        self._sources[source] = (self._level(bucket, self.per_source, now) - 1, now)
        self._all = (self._level(self._all, self.overall, now) - 1, now)


def _refuse_unavailable(reason: Failure) -> None:
    reason.trap(authkeys.AuthorizedKeysUnavailable)
    if isinstance(reason.value, authkeys.AuthorizedKeysBusy):
        raise Refused(
            "the server's authorized keys are being changed; try again",
            reason="authorized_keys busy",
        )
    raise Refused(
        "the server cannot read its authorized keys; try again later",
        reason="authorized_keys unavailable",
    )


@implementer(ICredentialsChecker)
class AuthorizedKeysChecker:
    """Authenticates keys against the switchboard's own authorized_keys file."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(
        self,
        keys_file: authkeys.AuthorizedKeysFile,
        secret: bytes,
        *,
        enable_auth: bool = True,
        allow_new_clients: bool = True,
        first_use: FirstUseLimiter | None = None,
        names: Any = None,
        clock: Callable[[], float] = time.time,
        key_command: Any = None,
        revoked: certs.RevokedKeys | None = None,
    ) -> None:
        self.key_command = key_command
        self.keys_file = keys_file
        self.revoked = revoked
        #: hostnames.VerifiedNames for from= hostname patterns, or None (use_dns off).
        self.names = names
        self.clock = clock
        self.secret = secret
        self.enable_auth = enable_auth
        self.allow_new_clients = allow_new_clients
        self.first_use = first_use if first_use is not None else FirstUseLimiter()
        self.calls = 0

    def requestAvatarId(self, credentials: Any) -> Any:
        self.calls += 1
        return defer.maybeDeferred(self._check, credentials)

    def _check(self, credentials: Any) -> Any:
        info: ConnectionInfo = getattr(credentials, "connection", None) or ConnectionInfo("?")
        username, key = self._screen(credentials, info)
        if not self.enable_auth:
            return self._decide(credentials, info, username, key, None)
        cert: certs.Certificate | None = getattr(credentials, "certificate", None)
        # A certificate is admitted by its CA's cert-authority line, never by its key's.
        blob, ca = (cert.ca_blob, True) if cert is not None else (credentials.blob, False)
        fresh, entry = self.keys_file.cached_lookup(blob, ca=ca)
        if fresh:
            return self._withNames(credentials, info, username, key, entry)
        if self.keys_file.reload_cost() <= authkeys.INLINE_RELOAD_BYTES:
            # A small change: read it here, unless a writer holds the lock.
            try:
                entry = self.keys_file.lookup(blob, 0.0, stale=False, ca=ca)
            except authkeys.AuthorizedKeysBusy:
                pass
            except authkeys.AuthorizedKeysUnavailable:
                _refuse_unavailable(Failure())
            else:
                return self._withNames(credentials, info, username, key, entry)
        # The file changed since the last look: read it in a thread (a big
        # file must not stall the reactor) and wait there for a writer's
        # lock, so that the login is decided on what the file says now.
        d = threads.deferToThread(self.keys_file.lookup, blob, authkeys.LOGIN_LOCK_WAIT, ca=ca)
        d.addErrback(_refuse_unavailable)
        d.addCallback(lambda found: self._withNames(credentials, info, username, key, found))
        return d

    def _withNames(
        self,
        credentials: Any,
        info: ConnectionInfo,
        username: str,
        key: keys.Key,
        entry: authkeys.AuthorizedKey | None,
        external: bool = False,
    ) -> Any:
        """Look the client's host name up first if, and only if, this key's from= needs it."""
        if (
            self.names is None
            or info.names_checked
            or entry is None
            or not authkeys.wants_hostname(entry)
        ):
            return self._decide(credentials, info, username, key, entry, external)

        def named(name: str | None) -> Any:
            info.peer_name, info.names_checked = name, True
            return self._decide(credentials, info, username, key, entry, external)

        return self.names.lookup(info.peer).addCallback(named)

    def _screen(self, credentials: Any, info: ConnectionInfo) -> tuple[str, keys.Key]:
        """What is refused whatever the file says: bad names, keys and algorithms."""
        try:
            username = normalise(credentials.username, "user name")
        except InvalidName as exc:
            raise Refused(str(exc), reason="bad user name") from None
        cert = None
        if certs.is_cert_algorithm(credentials.algName):
            cert = self._screen_certificate(credentials)
            key = keys.Key.fromString(cert.key_blob, type="blob")
        else:
            try:
                key = keys.Key.fromString(credentials.blob, type="blob")
            except (keys.BadKeyError, ValueError) as exc:
                raise Refused(f"unsupported or malformed key: {exc}", reason="bad key") from None
        if cert is None and key.blob() != credentials.blob:
            # Trailing bytes, an RSA number with a leading zero, a compressed
            # ECDSA point: Conch reads them as the same key, but the lookup by
            # blob would miss its line (and its from=, denied) and take the
            # first-use path.
            raise Refused(
                "the public key blob is not in its canonical form", reason="bad key"
            ) from None
        if key.type() == "DSA":
            raise Refused(
                "DSA keys are not accepted (1024 bits and SHA-1); use an ed25519 key",
                reason="weak key",
            )
        if key.type() == "RSA" and key.size() < MIN_RSA_BITS:
            raise Refused(
                f"RSA keys need at least {MIN_RSA_BITS} bits", reason="weak key"
            ) from None
        algorithm = _plain_algorithm(credentials.algName)
        if algorithm == b"ssh-rsa":
            raise Refused(
                "ssh-rsa (SHA-1) signatures are not accepted; use rsa-sha2-256/512",
                reason="sha1 signature",
            )
        if algorithm not in key.supportedSignatureAlgorithms():
            raise Refused(
                f"signature algorithm {escape(credentials.algName[:64])} does not fit"
                f" a {key.type()} key",
                reason="bad algorithm",
            )
        info.fingerprint = fingerprint(key.blob() if cert is not None else credentials.blob)
        self._check_revoked(key.blob(), cert)
        return username, key

    @staticmethod
    def _screen_certificate(credentials: Any) -> certs.Certificate:
        """Parse and CA-verify a certificate once per request, before any lookup."""
        try:
            cert = certs.parse(credentials.blob, credentials.algName)
        except certs.CertificateError as exc:
            raise Refused(str(exc), reason="bad certificate") from None
        credentials.certificate = cert
        return cert

    def _check_revoked(self, blob: bytes, cert: certs.Certificate | None) -> None:
        if self.revoked is None:
            return
        try:
            why = self.revoked.revoked(blob, cert)
        except certs.RevokedKeysUnavailable:
            raise Refused(
                "the server cannot read its revoked keys list; try again later",
                reason="revoked_keys unavailable",
            ) from None
        if why is not None:
            raise Refused(why, reason="revoked")

    def _decide(
        self,
        credentials: Any,
        info: ConnectionInfo,
        username: str,
        key: keys.Key,
        entry: authkeys.AuthorizedKey | None,
        external: bool = False,
    ) -> Any:
        cert: certs.Certificate | None = getattr(credentials, "certificate", None)
        login: certs.CertLogin | None = None
        if (
            self.enable_auth
            and cert is None
            and entry is None
            and self.key_command
            and not external
        ):
            return self._ask_command(credentials, info, username, key)
        if cert is not None and self.enable_auth:
            login = self._certificate_allowed(cert, username, info, entry)
        elif self.enable_auth:
            if entry is not None or not self.allow_new_clients:
                self._enforce(entry, info, self.clock())
            else:
                self._first_use_allowed(info)
        if credentials.signature is None:
            raise conch_error.ValidPublicKey()
        if _signature_algorithm(credentials.signature) != _plain_algorithm(credentials.algName):
            # Conch's verify picks the hash from the signature itself, so an
            # ssh-rsa (SHA-1) signature would pass under an rsa-sha2-* request.
            raise Refused(
                "the signature algorithm differs from the one the request announced",
                reason="bad signature",
            )
        if not key.verify(credentials.signature, credentials.sigData):
            raise Refused("bad signature", reason="bad signature")
        if not self.enable_auth:
            return self._identity(username, key, None, ALL_ACCESS, info)
        if login is not None and entry is not None:
            identity = self._identity(username, key, entry, entry.access.granted(), info)
            policy = certs.login_policy(entry.policy, login)
            return Identity(**{**identity.__dict__, "certificate": login, "policy": policy})
        if entry is None:
            self.first_use.take(info.peer)
            return self._trust_on_first_use(username, key, info)
        identity = self._identity(username, key, entry, entry.access.granted(), info)
        return replace(identity, external=True) if external else identity

    def _ask_command(
        self, credentials: Any, info: ConnectionInfo, username: str, key: keys.Key
    ) -> Any:
        """authorized_keys has no line for this key: authorized_keys_command's line (or
        none) is decided like a file's; a command that fails refuses the login."""
        from .keycommand import KeyCommandError

        d = self.key_command.lookup(
            username, key.sshType().decode("ascii"), key.blob(), info.conn_id
        )

        def failed(reason: Failure) -> None:
            reason.trap(KeyCommandError)
            raise Refused(
                "the server could not look up your key; try again later",
                reason="authorized_keys_command failed",
            )

        d.addCallbacks(
            lambda found: self._withNames(credentials, info, username, key, found, external=True),
            failed,
        )
        return d

    def _first_use_allowed(self, info: ConnectionInfo) -> None:
        why = self.first_use.refusal(info.peer, self.keys_file.first_use_count)
        if why is not None:
            raise Refused(why, reason="first-use limit")

    def _trust_on_first_use(self, username: str, key: keys.Key, info: ConnectionInfo) -> Any:
        entry = authkeys.AuthorizedKey(
            options=tuple(("access", a) for a in TOFU),
            keytype=key.sshType().decode("ascii"),
            blob=key.blob(),
            comment=f"{username}@{info.peer}",
        )

        def appended(current: authkeys.AuthorizedKey | None) -> Identity:
            # ``current`` is what the file said under the append's own lock:
            # the line written, or one that appeared since the probe (an
            # administrator's, or the same key's from a concurrent login).
            # It gets the whole policy, exactly like a line found at probe.
            if current is None:
                raise Refused("this key is not authorized", reason="unknown key")
            self._enforce(current, info, self.clock())
            new = current.lineno != 0 and current == entry
            if new:
                log.info(
                    "conn {conn_id}: trusted new key {fingerprint} for {user} on first use",
                    conn_id=info.conn_id,
                    fingerprint=fingerprint(entry.blob),
                    user=username,
                )
            identity = self._identity(username, key, current, current.access.granted(), info)
            return Identity(**{**identity.__dict__, "new_key": new})

        def failed(reason: Failure) -> Identity:
            reason.trap(OSError, authkeys.AuthorizedKeyError)
            log.error(
                "conn {conn_id}: cannot persist new key {fingerprint}: {error}",
                conn_id=info.conn_id,
                fingerprint=fingerprint(entry.blob),
                error=str(reason.value),
            )
            raise Refused("the server cannot persist your key; try again later", reason="io")

        d = threads.deferToThread(self.keys_file.append, entry)
        d.addCallbacks(appended, failed)
        return d

    def _certificate_allowed(
        self,
        cert: certs.Certificate,
        username: str,
        info: ConnectionInfo,
        entry: authkeys.AuthorizedKey | None,
    ) -> certs.CertLogin:
        """A certificate's CA line, its own rules, and its key's line if any; never first use."""
        self._enforce(entry, info, self.clock(), ca=True)
        assert entry is not None  # admits() refuses a missing line
        own = self.keys_file.resolve(cert.key_blob)
        if own is not None and own.denied:
            raise Refused("this key is denied", reason="denied")
        try:
            login = certs.check(
                cert,
                username,
                info.peer,
                self.clock(),
                tuple(v for n, v in entry.options if n == "principals" and v is not None),
            )
            certs.login_policy(entry.policy, login)
            return login
        except (certs.CertificateError, PolicyError) as exc:
            log.info(
                "conn {conn_id}: {certificate} (authority on line {lineno}) refused: {why}",
                conn_id=info.conn_id,
                certificate=cert.describe(),
                lineno=entry.lineno,
                why=str(exc),
            )
            raise Refused(str(exc), reason="certificate refused") from None

    @staticmethod
    def _enforce(
        entry: authkeys.AuthorizedKey | None, info: ConnectionInfo, now: float, ca: bool = False
    ) -> None:
        """Every rule of ``entry`` that can refuse a login, for any path to a login.

        The rules are `keyrules.admits`, the same the key watcher applies to
        live connections; this turns its refusal into the client's banner.
        """
        decision = admits(entry, peer=info.peer, peer_name=info.peer_name, now=now, ca=ca)
        if decision:
            return
        if decision.rule == "option":
            assert entry is not None and entry.policy_error is not None
            log.info(
                "conn {conn_id}: authorized_keys line {lineno}: {why}; key {fingerprint} refused",
                conn_id=info.conn_id,
                lineno=entry.lineno,
                why=entry.policy_error,
                fingerprint=entry.fingerprint,
            )
        raise Refused(decision.message, reason=decision.reason)

    def _identity(
        self,
        username: str,
        key: keys.Key,
        entry: authkeys.AuthorizedKey | None,
        access: Access,
        info: ConnectionInfo,
    ) -> Identity:
        blob = key.blob()
        try:
            hostname, aliases = login_names(self.secret, username, blob, entry)
        except InvalidName as exc:
            lineno = entry.lineno if entry is not None else 0
            raise Refused(f"authorized_keys line {lineno}: {exc}", reason="bad option") from None
        return Identity(
            username=username,
            hostname=hostname,
            aliases=aliases,
            access=Access(access),
            fingerprint=fingerprint(blob),
            key_blob=blob,
            peer=info.peer,
            lineno=entry.lineno if entry is not None else 0,
            policy=entry.policy if entry is not None else UNRESTRICTED,
            peer_name=info.peer_name,
        )


def login_names(
    secret: bytes, username: str, blob: bytes, entry: authkeys.AuthorizedKey | None
) -> tuple[str, tuple[str, ...]]:
    """
    The hostname and aliases a login with ``entry`` gets, generated alias first.

    One function for the login and for the key watcher, so the watcher
    compares the names a login would build now with the ones it built then:
    a repeated alias or one equal to the generated alias is folded the same
    way both times. Raises `InvalidName` for a bad ``hostname=``/``alias=``.
    """
    hostname = username
    extra: list[str] = []
    if entry is not None:
        if entry.hostname:
            hostname = normalise(entry.hostname, "hostname option")
        extra = [normalise(a, "alias option") for a in entry.aliases]
    aliases = (generated_alias(secret, blob, hostname), *extra)
    return hostname, tuple(dict.fromkeys(aliases))


def _plain_algorithm(alg_name: bytes) -> bytes:
    """The algorithm a signature is made with: a certificate's is its key's."""
    return certs.CERT_ALGORITHMS.get(alg_name, (b"", alg_name))[1]


def _signature_algorithm(signature: bytes) -> bytes | None:
    """The algorithm name a signature blob says it was made with, or None if unreadable."""
    try:
        name, _ = getNS(signature)
    except (struct.error, IndexError, ValueError):
        return None
    return name


def _certificate_text(identity: Identity) -> str:
    login = identity.certificate
    if login is None:
        return ""
    return f" with {login.describe()} (authority on line {identity.lineno})"


class _PortalProxy:
    """Gives the checker the peer address, which Conch does not pass on."""

    def __init__(self, portal: Any, info: ConnectionInfo) -> None:
        self._portal = portal
        self._info = info

    def listCredentialsInterfaces(self) -> list[Any]:
        return self._portal.listCredentialsInterfaces()

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Any:
        credentials.connection = self._info
        return self._portal.login(credentials, self._info, *interfaces)


class SwitchboardUserAuth(userauth.SSHUserAuthServer):
    """Public key only, bounded attempts, one login at a time, and readable refusals."""

    _log = conch_logger("nuttconch.auth.SwitchboardUserAuth")

    transport: Any

    maxNoneAttempts = 10

    def serviceStarted(self) -> None:
        factory = self.transport.factory
        self.loginTimeout = max(1, factory.config.login_grace_time or 3600)
        self.attemptsBeforeDisconnect = factory.config.max_auth_tries - 1
        self.clock = self.transport.clock
        super().serviceStarted()
        self.supportedAuthentications = [b"publickey"]
        self.info = ConnectionInfo(peer=self.transport._peerHost, conn_id=self.transport.connId)
        self.portal = _PortalProxy(factory.portal, self.info)
        self._queue: list[bytes] = []
        self._busy = False
        self._noneAttempts = 0
        self._shown: set[str] = set()
        self._firstUser: bytes | None = None

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> Any:
        """Serialise pipelined requests so that at most one login can ever succeed."""
        if authenticated(self.transport):
            return None
        if self._busy:
            if len(self._queue) >= self.attemptsBeforeDisconnect + 2:
                self.transport.protocolError("too many pipelined authentication requests")
                return None
            self._queue.append(packet)
            return None
        user, nextService, method = userauth.getNS(packet, 3)[:3]
        if len(user) > MAX_USER_BYTES:
            # Refused before anything (Conch's own debug records included) sees it whole.
            self.user, self.nextService, self.method = user[:64], nextService, method
            self._ebBadAuth(Failure(Refused("user name is too long", reason="bad user name")))
            return None
        if nextService != b"ssh-connection":
            self.transport.protocolError("authentication for an unknown service")
            return None
        if self._firstUser is None:
            self._firstUser = user
        elif user != self._firstUser:
            self.transport.protocolError("user name changed during authentication")
            return None
        if method == b"none":
            self._noneAttempts += 1
            if self._noneAttempts > self.maxNoneAttempts:
                self.transport.protocolError("too many 'none' authentication requests")
                return None
        self._busy = True
        d = super().ssh_USERAUTH_REQUEST(packet)
        if d is None:
            self._next()
            return None
        d.addBoth(self._done)
        return d

    def auth_publickey(self, packet: bytes) -> Any:
        """Refuse a key blob that does not parse before Conch sees it: Conch logs the
        peer's algorithm name whole, raw and at error level, as a format string (one
        256 KiB line per attempt, ESC and CR written through to the operator's terminal).
        Here it is one info line with the name truncated and escaped."""
        algName, blob = userauth.getNS(packet[1:], 2)[:2]
        if certs.is_cert_algorithm(algName):
            return self._auth_certificate(packet)
        try:
            keys.Key.fromString(blob)
        except keys.BadKeyError:
            shown = algName[:MAX_ALG_BYTES]
            log.info(
                "conn {conn_id} from {peer}: unsupported key type {alg}{more}",
                conn_id=self.info.conn_id,
                peer=self.info.peer,
                alg=escape(shown),
                more=f" ({len(algName)} bytes)" if len(algName) > len(shown) else "",
            )
            message = "unsupported key type or malformed key"
            if message not in self._shown:
                self._shown.add(message)
                self.sendBanner(f"nuttconch: {message}\r\n")
            return defer.fail(UnauthorizedLogin(message))
        return super().auth_publickey(packet)

    def _auth_certificate(self, packet: bytes) -> Any:
        """Conch's auth_publickey for certificates, which its key parser refuses.

        The blob goes to the checker whole; it parses and CA-verifies it.
        """
        has_sig = packet[0:1] != b"\x00"
        alg_name, blob, rest = userauth.getNS(packet[1:], 2)
        if not has_sig:
            creds = SSHPrivateKey(self.user, alg_name, blob, None, None)
            return self.portal.login(creds, None, IConchUser).addErrback(
                self._ebCheckKey, packet[1:]
            )
        signature = userauth.getNS(rest)[0]
        signed = (
            NS(self.transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + NS(self.user or b"")
            + NS(self.nextService or b"")
            + NS(b"publickey")
            + packet[0:1]
            + NS(alg_name)
            + NS(blob)
        )
        creds = SSHPrivateKey(self.user, alg_name, blob, signed, signature)
        return self.portal.login(creds, None, IConchUser)

    def _done(self, result: object) -> object:
        self._busy = False
        if not authenticated(self.transport) and self.transport.transport is not None:
            self._next()
        return None if isinstance(result, Failure) else result

    def _next(self) -> None:
        self._busy = False
        if self._queue and not getattr(self.transport.transport, "disconnecting", False):
            self.ssh_USERAUTH_REQUEST(self._queue.pop(0))

    def _ebBadAuth(self, reason: Failure) -> None:
        if isinstance(reason.value, Refused):
            refusal = reason.value
            if refusal.message not in self._shown:
                self._shown.add(refusal.message)
                self.sendBanner(f"nuttconch: {refusal.message}\r\n")
            log.info(
                "conn {conn_id} from {peer}: login refused for {user}: {reason}"
                " (key {fingerprint})",
                conn_id=self.info.conn_id,
                peer=self.info.peer,
                fingerprint=self.info.fingerprint or "none",
                user=escape((self.user or b"")[:64]),
                reason=refusal.reason,
                message=refusal.message,
            )
            self.transport.factory.authFailed(self.info.peer, refusal.reason, self.info.fingerprint)
            self.transport.penaltyKind = getattr(refusal, "penaltyKind", "authfail")
            code = getattr(refusal, "disconnectCode", None)
            if code is not None:
                # Over a connection cap: more keys would not help; say why and end here.
                self.transport.sendDisconnect(code, refusal.message.encode("utf-8"))
                return
        elif not reason.check(conch_error.IgnoreAuthentication) and self.method != b"none":
            self.transport.factory.authFailed(self.info.peer, "failed", self.info.fingerprint)
            self.transport.penaltyKind = "authfail"
        if not reason.check(
            conch_error.IgnoreAuthentication, UnauthorizedLogin, conch_error.ConchError
        ):
            log.failure("unexpected error checking a login", failure=reason)
            reason = Failure(UnauthorizedLogin("internal error"))
        super()._ebBadAuth(reason)

    def sendBanner(self, text: str) -> None:
        """A USERAUTH_BANNER: the only text OpenSSH shows before login, even with -N."""
        self.transport.sendPacket(userauth.MSG_USERAUTH_BANNER, NS(text.encode("utf-8")) + NS(b""))

    def _cbFinishedAuth(self, result: Any) -> None:
        _, avatar, logout = result
        tcp = self.transport.transport
        if tcp is None or tcp.disconnecting or not getattr(tcp, "connected", True):
            # The connection ended while the checker ran (e.g. a slow first-use write).
            logout()
            return
        log.info(
            "conn {conn_id} from {peer}: authenticated {hostname} key {fingerprint}"
            " access {access}{new}",
            conn_id=self.info.conn_id,
            peer=self.info.peer,
            hostname=avatar.identity.hostname,
            fingerprint=avatar.identity.fingerprint,
            access=avatar.identity.access.describe(),
            new=" (new key)" if avatar.identity.new_key else _certificate_text(avatar.identity),
        )
        super()._cbFinishedAuth(result)
