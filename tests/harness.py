"""Test harness: a real nuttconch server on 127.0.0.1:0 and the real OpenSSH client.

The server runs in the trial process, so a test can wait on the registry
instead of sleeping; every ssh child is killed by its own pid in cleanup.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.ssh.keys import Key
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.procutils import which
from zope.interface import implementer

from nuttconch import config as configmod
from nuttconch.tap import build

SSH = (which("ssh") or [None])[0]
_HOSTKEY_CACHE: str | None = None


def missing(what: str, install: str) -> NoReturn:
    """A tool or package a test needs is absent: a skip on a developer's machine, a
    failure under CI (``.ci/run`` installs everything), so CI never skips silently."""
    if os.environ.get("CI"):
        raise RuntimeError(f"{what} is not installed ({install})")
    from twisted.trial.unittest import SkipTest

    raise SkipTest(f"{what} is not installed ({install})")


def require_ssh() -> str:
    """The OpenSSH client; in CI its absence is a failure, never a silent skip."""
    if SSH is None:
        missing("OpenSSH client 'ssh'", "apt-get install openssh-client")
    return SSH


def host_key_dir() -> str:
    """Generate host keys once per test run; RSA 3072 generation is slow."""
    global _HOSTKEY_CACHE
    if _HOSTKEY_CACHE is None:
        _HOSTKEY_CACHE = tempfile.mkdtemp(prefix="nuttconch-hostkeys-")
        from nuttconch.hostkeys import load_host_keys

        # With an ECDSA key too, as an installation moved over from Nuttssh has
        # (a new one gets none; tests.test_audit checks that).
        load_host_keys(
            {
                "ecdsa": os.path.join(_HOSTKEY_CACHE, "ssh_host_ecdsa_key"),
                "ed25519": os.path.join(_HOSTKEY_CACHE, "ssh_host_ed25519_key"),
                "rsa": os.path.join(_HOSTKEY_CACHE, "ssh_host_rsa_key"),
            },
            generate=frozenset({"ecdsa", "ed25519", "rsa"}),
        )
    return _HOSTKEY_CACHE


def make_key(directory: str, name: str, kind: str = "ed25519") -> tuple[str, str]:
    """Write a private key (0600) for ssh -i; return (path, public line)."""
    if kind == "ed25519":
        key = Key(ed25519.Ed25519PrivateKey.generate())
    elif kind == "ecdsa":
        key = Key(ec.generate_private_key(ec.SECP256R1()))
    else:
        key = Key(rsa.generate_private_key(65537, int(kind.split("-")[1]) if "-" in kind else 2048))
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.toString("openssh", subtype="v1"))
    public = key.public().toString("openssh").decode("ascii")
    with open(path + ".pub", "w") as handle:
        handle.write(public + " " + name + "\n")
    return path, public


class SSHProcess(protocol.ProcessProtocol):
    """An ssh child whose output is collected and whose end is a Deferred."""

    def __init__(self, stdin: bytes | None) -> None:
        self.stdin = stdin
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[tuple[bytes, bytes, int]] = defer.Deferred()
        self.code: int | None = None
        self.watchers: list[tuple[bytes, defer.Deferred[None]]] = []

    def connectionMade(self) -> None:
        if self.stdin is not None:
            self.transport.write(self.stdin)
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def _check(self) -> None:
        for needle, d in list(self.watchers):
            if needle in self.out or needle in self.err:
                self.watchers.remove((needle, d))
                d.callback(None)

    def waitOutput(self, needle: bytes, timeout: float = 10) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.watchers.append((needle, d))
        self._check()
        return _timeout(
            d, timeout, f"output {needle!r}; got {bytes(self.out)!r} {bytes(self.err)!r}"
        )

    def processEnded(self, reason: Any) -> None:
        self.code = reason.value.exitCode
        if self.code is None:
            self.code = -1
        for _, d in self.watchers:
            d.errback(AssertionError(f"ssh ended before output: {bytes(self.err)!r}"))
        self.watchers = []
        self.ended.callback((bytes(self.out), bytes(self.err), self.code))

    def kill(self) -> defer.Deferred[Any]:
        if self.code is None:
            try:
                self.transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
        d: defer.Deferred[Any] = defer.Deferred()
        self.ended.addBoth(lambda r: (d.callback(None), r)[1])
        return d


def _timeout(d: defer.Deferred[Any], seconds: float, what: str) -> defer.Deferred[Any]:
    def expired() -> None:
        if not d.called:
            d.errback(AssertionError(f"timed out after {seconds}s waiting for {what}"))

    call = reactor.callLater(seconds, expired)

    def done(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return d.addBoth(done)


class SwitchboardTestMixin:
    """Start a server per test; helpers to run ssh against it."""

    settings: dict[str, str] = {}

    def setUp(self) -> Any:  # type: ignore[override]
        require_ssh()
        self.dir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.dir)
        self.keydir = os.path.join(self.dir, "keys")
        shutil.copytree(host_key_dir(), self.keydir)
        self.akfile = os.path.join(self.keydir, "authorized_keys")
        self.processes: list[SSHProcess] = []
        return self.startServer()

    def writeConfig(self, **overrides: str) -> str:
        values = {
            "listen_host": "127.0.0.1",
            "listen_port": "0",
            "server_fqdn": "switchboard",
            # Tests refuse logins on purpose from 127.0.0.1; penalty tests use 127.0.0.2+.
            "per_source_penalty_exempt_list": "127.0.0.1",
            # The Conch client in tests/rawssh.py knows only encrypt-and-MAC, which is
            # off by default (issue 12.6); tests.test_audit checks the real defaults.
            "macs": "+hmac-sha2-256,hmac-sha2-512",
        }
        values.update(self.settings)
        values.update(overrides)
        server = "\n".join(f"{k} = {v}" for k, v in values.items())
        path = os.path.join(self.dir, "nuttssh.ini")
        with open(path, "w") as handle:
            handle.write(f"[server]\n{server}\n[keys]\nhost_key_dir = {self.keydir}\n")
        return path

    def startServer(self, **overrides: str) -> Any:
        cfg = configmod.load(self.writeConfig(**overrides))
        self.config = cfg
        self.factory, self.registry = build(cfg)
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        self.addCleanup(self.stopServer)  # type: ignore[attr-defined]
        return None

    @defer.inlineCallbacks
    def stopServer(self) -> Any:
        for proc in list(self.processes):
            yield proc.kill()
        if self.listening is not None:
            yield self.listening.stopListening()
            self.listening = None
        yield self.factory.disconnectAll()
        # Let threads (key appends) and connection teardown settle.
        yield task.deferLater(reactor, 0.01, lambda: None)

    def key(self, name: str, kind: str = "ed25519", options: str | None = None) -> str:
        """Make a client key; with ``options``, add it to authorized_keys first."""
        path, public = make_key(self.dir, name, kind)
        if options is not None:
            self.addAuthorized(public, options, name)
        return path

    def addAuthorized(self, public: str, options: str, comment: str = "") -> None:
        line = f"{options} {public} {comment}".strip() if options else f"{public} {comment}"
        with open(self.akfile, "a") as handle:
            handle.write(line + "\n")

    def sshArgs(
        self, key: str | None, user: str, *extra: str, command: tuple[str, ...] = ()
    ) -> list[str]:
        args = [
            SSH or "ssh",
            "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={os.path.join(self.dir, 'known_hosts')}",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", "HostKeyAlias=nuttconch-test",
            "-o", "ControlMaster=no",
            "-o", "ConnectTimeout=5",
            "-o", "ExitOnForwardFailure=yes",
            "-p", str(self.port),
        ]  # fmt: skip
        if key:
            args += ["-i", key]
        return args + [*extra, "-l", user, "127.0.0.1", *command]

    def spawn(
        self,
        key: str | None,
        user: str,
        *extra: str,
        stdin: bytes | None = b"",
        argv: list[str] | None = None,
        command: tuple[str, ...] = (),
    ) -> SSHProcess:
        proc = SSHProcess(stdin)
        args = argv or self.sshArgs(key, user, *extra, command=command)
        reactor.spawnProcess(proc, args[0], args, env={"PATH": os.environ.get("PATH", "")})
        self.processes.append(proc)
        return proc

    def ssh(
        self,
        key: str | None,
        user: str,
        *extra: str,
        stdin: bytes = b"",
        timeout: float = 20,
        command: tuple[str, ...] = (),
    ) -> defer.Deferred[tuple[bytes, bytes, int]]:
        """Run ssh to completion; fires (stdout, stderr, exit code)."""
        proc = self.spawn(key, user, *extra, stdin=stdin, command=command)
        return _timeout(proc.ended, timeout, "ssh to exit")

    def waitPort(
        self, port: int, name: str | None = None, timeout: float = 10
    ) -> defer.Deferred[Any]:
        """Fires with the listener once some initiator (or ``name``) holds ``port``."""

        def find() -> Any:
            for listener in self.registry.listeners():
                if port in listener.ports and (name is None or name in listener.aliases):
                    return listener
            return None

        return self.waitFor(find, timeout, f"port {port} to be registered")

    def waitFor(
        self, predicate: Any, timeout: float = 10, what: str = "condition"
    ) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        deadline = reactor.seconds() + timeout

        def poll() -> None:
            value = predicate()
            if value:
                d.callback(value)
            elif reactor.seconds() > deadline:
                d.errback(AssertionError(f"timed out after {timeout}s waiting for {what}"))
            else:
                reactor.callLater(0.02, poll)

        poll()
        return d

    @defer.inlineCallbacks
    def initiator(self, key: str, user: str, *forwards: str, extra: tuple[str, ...] = ()) -> Any:
        """Start ``ssh -N -R ...`` and wait until every forward is registered."""
        args: list[str] = ["-N", *extra]
        for fwd in forwards:
            args += ["-R", fwd]
        proc = self.spawn(key, user, *args, stdin=None)
        for fwd in forwards:
            port = int(fwd.split(":")[-3])
            if port:
                yield self.waitPort(port)
        return proc


@implementer(IHalfCloseableProtocol)
class EchoServer(protocol.Protocol):
    """The device behind an initiator: echoes what it gets, prefixed by its tag.

    On EOF it finishes writing and then closes, as a well-behaved TCP service does.
    """

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionMade(self) -> None:
        tag = self.factory.tag  # type: ignore[attr-defined]
        if tag:
            self.transport.write(tag)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def listen_echo(testcase: Any, tag: bytes = b"") -> int:
    """A local TCP echo service (the initiator's target); returns its port."""
    factory = protocol.Factory.forProtocol(EchoServer)
    factory.tag = tag  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


def listening_sockets() -> set[str]:
    """Inodes of TCP sockets in LISTEN state that this process holds."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            ours.add(link[8:-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":
                listening.add(fields[9])
    return ours & listening
