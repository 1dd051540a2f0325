# -*- test-case-name: tests.test_keycommand -*-
"""Keys from an external command, as OpenSSH's AuthorizedKeysCommand.

When a key has no line in authorized_keys, the checker asks
``[keys] authorized_keys_command``: the command is run with the user
name, key type, fingerprint and key (``%u %t %f %k``) as separate argv
elements (split with shlex once, at start; never through a shell, so
nothing a client sends is interpreted), and whatever it prints is read
as authorized_keys lines, options included.  A fleet can then keep its
keys in a directory service or a Git forge instead of in the file.

The command runs in a child process through the reactor, so a slow one
delays only the login that waits for it.  It is bounded in time and in
output (past either it is killed and the login refused, with the reason
in the log), at most ``MAX_RUNNING`` run at once, one run serves every
concurrent login of the same key, and answers are kept for a short while
per key: a client probes with its key before it signs, which would
otherwise run the command twice per login.
"""

from __future__ import annotations

import base64
import shlex
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import authkeys
from .names import escape

log = Logger()

TOKENS = {"%u": "user name", "%t": "key type", "%f": "key fingerprint", "%k": "base64 key"}
# Commands running at once; more wait in line (a fleet reconnecting after a restart).
MAX_RUNNING = 16
# Logins waiting for a run beyond which new ones are refused at once.
MAX_WAITING = 1024
# Answers kept; past it the oldest is forgotten.
MAX_CACHED = 10000
# What is kept of the command's stderr for the log.
MAX_STDERR = 1024
# The environment the command sees: nothing of the server's own.
CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class KeyCommandError(Exception):
    """The command could not give an answer; str() is the reason for the log."""


def parse_command(text: str) -> tuple[str, ...]:
    """The argv template of ``authorized_keys_command``; empty text turns it off.

    Raises ValueError with a sentence for the operator: bad quoting, a
    relative program path (the server's PATH is not the operator's shell's),
    or an unknown ``%`` token.
    """
    text = text.strip()
    if not text:
        return ()
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"cannot split into arguments: {exc}") from None
    if not argv[0].startswith("/"):
        raise ValueError(f"the program must be an absolute path, not {argv[0]!r}")
    for arg in argv:
        rest = arg.replace("%%", "")
        for index, char in enumerate(rest):
            if char == "%" and rest[index : index + 2] not in TOKENS:
                raise ValueError(
                    f"unknown token {rest[index : index + 2]!r} in {arg!r}"
                    f" (known: {', '.join(TOKENS)}, %% for a percent sign)"
                )
    return argv


def expand(template: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """The argv for one key: each token replaced inside its own argument only."""
    argv = []
    for arg in template:
        out = []
        index = 0
        while index < len(arg):
            pair = arg[index : index + 2]
            if pair == "%%":
                out.append("%")
                index += 2
            elif pair in values:
                out.append(values[pair])
                index += 2
            else:
                out.append(arg[index])
                index += 1
        argv.append("".join(out))
    return argv


class _Collector(protocol.ProcessProtocol):
    """Reads a child's output up to a limit; ``done`` fires with stdout or fails."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.out: list[bytes] = []
        self.size = 0
        self.err = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.stop(f"printed more than {self.limit} bytes")
            return
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        if len(self.err) < MAX_STDERR:
            self.err += data[: MAX_STDERR - len(self.err)]

    def stop(self, why: str) -> None:
        """Kill the child and give up on it now: an orphan it left may hold the pipes
        open, and waiting for them would hold the login too."""
        if self.done.called:
            return
        if self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except (error.ProcessExitedAlready, OSError):
                pass
            self.transport.loseConnection()
        self.done.errback(KeyCommandError(why + self._stderr()))

    def _stderr(self) -> str:
        text = self.err.decode("utf-8", "replace").strip().splitlines()
        return f" (stderr: {escape(text[0][:200])})" if text else ""

    def processEnded(self, reason: Failure) -> None:
        if self.done.called:
            return
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        if code == 0:
            self.done.callback(b"".join(self.out))
        elif signal is not None:
            self.done.errback(KeyCommandError(f"killed by signal {signal}" + self._stderr()))
        else:
            self.done.errback(KeyCommandError(f"exited with status {code}" + self._stderr()))


@dataclass
class _Cached:
    expires: float
    entry: authkeys.AuthorizedKey | None


class KeyCommand:
    """Runs the configured command for keys authorized_keys does not list."""

    def __init__(
        self,
        template: tuple[str, ...],
        reactor: Any,
        *,
        timeout: float = 5.0,
        max_output: int = 65536,
        cache_time: float = 60.0,
    ) -> None:
        self.template = template
        self.reactor = reactor
        self.timeout = timeout
        self.max_output = max_output
        self.cache_time = cache_time
        self.cache: OrderedDict[tuple[str, bytes], _Cached] = OrderedDict()
        self.running: dict[tuple[str, bytes], list[defer.Deferred[Any]]] = {}
        self.slots = defer.DeferredSemaphore(MAX_RUNNING)
        self.runs = 0

    def lookup(
        self, username: str, keytype: str, blob: bytes, conn_id: int = 0
    ) -> defer.Deferred[authkeys.AuthorizedKey | None]:
        """The line the command gives for this key (None if it gives none), or a
        KeyCommandError failure if the command failed, timed out or was too loud."""
        key = (username, blob)
        clock: IReactorTime = self.reactor
        cached = self.cache.get(key)
        if cached is not None:
            if cached.expires > clock.seconds():
                return defer.succeed(cached.entry)
            del self.cache[key]
        waiters = self.running.get(key)
        d: defer.Deferred[authkeys.AuthorizedKey | None] = defer.Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        if len(self.slots.waiting) >= MAX_WAITING:
            return defer.fail(KeyCommandError("too many key lookups waiting"))
        self.running[key] = [d]
        run = self.slots.run(self._run, username, keytype, blob)
        run.addBoth(self._answer, key, conn_id)
        return d

    def _run(self, username: str, keytype: str, blob: bytes) -> defer.Deferred[bytes]:
        argv = expand(
            self.template,
            {
                "%u": username,
                "%t": keytype,
                "%f": authkeys.fingerprint_of(blob),
                "%k": base64.b64encode(blob).decode("ascii"),
            },
        )
        collector = _Collector(self.max_output)
        self.runs += 1
        try:
            IReactorProcess(self.reactor).spawnProcess(
                collector, argv[0], argv, env=dict(CHILD_ENV), path="/"
            )
        except OSError as exc:
            return defer.fail(KeyCommandError(f"cannot run {argv[0]}: {exc.strerror or exc}"))
        timer = self.reactor.callLater(
            self.timeout, collector.stop, f"did not finish within {self.timeout:g} s"
        )

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return collector.done.addBoth(finished)

    def _answer(self, result: Any, key: tuple[str, bytes], conn_id: int) -> None:
        waiters = self.running.pop(key, [])
        username, blob = key
        if isinstance(result, Failure):
            if not result.check(KeyCommandError):
                log.failure("authorized_keys_command", failure=result)
                result = Failure(KeyCommandError("internal error"))
            log.warn(
                "conn {conn_id}: authorized_keys_command failed for {user} key {fingerprint}:"
                " {reason}",
                conn_id=conn_id,
                user=username,
                fingerprint=authkeys.fingerprint_of(blob),
                reason=str(result.value),
            )
            for d in waiters:
                d.errback(result)
            return
        entry, bad = self._parse(result, blob)
        log.info(
            "conn {conn_id}: authorized_keys_command {outcome} for {user} key {fingerprint}{bad}",
            conn_id=conn_id,
            outcome=f"gave line {entry.lineno}" if entry is not None else "gave no line",
            user=username,
            fingerprint=authkeys.fingerprint_of(blob),
            bad=f" ({bad} unreadable lines ignored)" if bad else "",
        )
        self.cache[key] = _Cached(self.reactor.seconds() + self.cache_time, entry)
        while len(self.cache) > MAX_CACHED:
            self.cache.popitem(last=False)
        for d in waiters:
            d.callback(entry)

    @staticmethod
    def _parse(output: bytes, blob: bytes) -> tuple[authkeys.AuthorizedKey | None, int]:
        """The entry for ``blob`` among the output's lines, as authorized_keys would
        pick it (a denial wins; a line about this key that cannot be parsed denies it),
        and how many lines could not be parsed."""
        text = output.decode("utf-8", "replace")
        entries, errors = authkeys.parse_text(text)
        matching = [e for e in entries if e.blob == blob]
        tainted = authkeys._tainted_tokens(text.split("\n"), errors)
        return authkeys._resolve(matching, tainted, blob), len(errors)
