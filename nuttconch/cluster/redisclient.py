# -*- test-case-name: tests.test_cluster_registry -*-
"""A small adapter around txredisapi, so the rest of nuttconch never touches it.

txredisapi is pinned exactly and wrapped here because of how it behaves on
a bad day (checked against 1.6.0 with hiredis): a command issued while
disconnected waits forever, cancelling does not end a server-side BLOCK,
a refused AUTH or SELECT stops reconnecting for good, its reconnect backoff
grows to 10 s, and MULTI/EXEC misreads replies with hiredis.  So every
command here has a deadline, blocking reads get their own connection with
a short BLOCK, the backoff is short, a pool that gave up is rebuilt, and
atomic changes are Lua scripts.  Replacing the client means rewriting only
this file.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

log = Logger()


class RedisUnavailable(Exception):
    """Redis did not answer in time or is not connected; str() names the cause."""


def parse_url(
    reactor: Any, url: str, timeout: float
) -> tuple[IStreamClientEndpoint, str, str | None, int | None]:
    """The endpoint, a printable address (never the password), the password and the db."""
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    if parts.scheme == "unix":
        db_text = parse_qs(parts.query).get("db", ["0"])[0]
        return (
            UNIXClientEndpoint(reactor, parts.path, timeout=timeout),
            parts.path,
            password,
            int(db_text),
        )
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 6379
    db = int(parts.path.strip("/")) if parts.path.strip("/") else None
    kind = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=timeout), f"{host}:{port}", password, db


class RedisClient:
    """One Redis server: a pool for commands and, on demand, one connection per blocking reader."""

    #: Reconnect quickly: a node is degraded while it waits, so 1 s growing to 10 s is too slow.
    initial_delay = 0.05
    max_delay = 0.5

    def __init__(self, reactor: IReactorTime, url: str, timeout: float) -> None:
        self.reactor = reactor
        self.url = url
        self.timeout = timeout
        self.endpoint, self.address, self.password, self.db = parse_url(reactor, url, timeout)
        self._factories: dict[str, txredisapi.RedisFactory] = {}
        self._closed = False
        #: Whether the last command that ended got an answer (a reply or a Redis error).
        self.reachable = False
        self._pending: set[defer.Deferred[Any]] = set()
        self.last_error = ""

    def _factory(self, role: str, reply_timeout: float) -> txredisapi.RedisFactory:
        factory = self._factories.get(role)
        if factory is not None and factory.stopped and not self._closed:
            # txredisapi gives up for good after a refused AUTH or SELECT; a fleet
            # whose Redis password is being rotated must not need a restart.
            log.warn(
                "Redis at {address}: the {role} connection gave up (password or db refused?);"
                " starting it again",
                address=self.address,
                role=role,
            )
            factory.disconnect()
            factory = None
        if factory is None:
            factory = txredisapi.RedisFactory(
                None,
                self.db,
                1,
                isLazy=True,
                password=self.password,
                replyTimeout=reply_timeout,
                convertNumbers=False,
            )
            factory.initialDelay = self.initial_delay
            factory.maxDelay = self.max_delay
            factory.factor = 2.0
            # The factory reports a refused AUTH or SELECT on this Deferred; unread, it
            # would surface as an unhandled error far from here.
            factory.deferred.addErrback(self._refused, role)
            factory.startConnecting(self.endpoint)
            self._factories[role] = factory
        return factory

    def _refused(self, failure: Any, role: str) -> None:
        self.last_error = failure.getErrorMessage()
        log.warn(
            "Redis at {address} refused the {role} connection: {why}",
            address=self.address,
            role=role,
            why=self.last_error,
        )

    def _deadline(self, d: defer.Deferred[Any], seconds: float, what: str) -> defer.Deferred[Any]:
        def explain(failure: Any) -> Any:
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise RedisUnavailable(
                    f"Redis at {self.address} did not answer {what} within {seconds:g} s"
                )
            if failure.check(txredisapi.ResponseError):
                return failure
            if failure.check(txredisapi.ConnectionError, ConnectionError, OSError):
                raise RedisUnavailable(f"Redis at {self.address}: {failure.getErrorMessage()}")
            return failure

        def answered(result: Any) -> Any:
            self.reachable = True
            return result

        def unreachable(failure: Any) -> Any:
            if failure.check(RedisUnavailable):
                self.reachable = False
            return failure

        d.addTimeout(seconds, self.reactor)
        d.addCallbacks(answered, explain)
        d.addErrback(unreachable)
        self._pending.add(d)

        def settled(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(settled)
        return d

    def command(self, *args: Any) -> defer.Deferred[Any]:
        """One command on the shared connection; RedisUnavailable past the deadline."""
        if self._closed:
            return defer.fail(RedisUnavailable("the Redis client is closed"))
        handler = self._factory("commands", self.timeout).handler
        return self._deadline(handler.execute_command(*args), self.timeout, args[0])

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        """A Lua script (EVALSHA, then EVAL after NOSCRIPT): our only way to be atomic."""
        if self._closed:
            return defer.fail(RedisUnavailable("the Redis client is closed"))
        handler = self._factory("commands", self.timeout).handler
        return self._deadline(handler.eval(script, keys, args), self.timeout, "a script")

    def blocking(self, role: str, block_ms: int, *args: Any) -> defer.Deferred[Any]:
        """A blocking command (XREAD BLOCK) on the connection of ``role``, never shared.

        A PING queued behind a BLOCK waits for it, so a blocking reader on the
        shared connection would stall every command; and since cancelling does
        not end a server-side BLOCK, the deadline is the BLOCK plus our timeout
        and the connection is dropped when it passes (txredisapi aborts it).
        """
        if self._closed:
            return defer.fail(RedisUnavailable("the Redis client is closed"))
        seconds = block_ms / 1000 + self.timeout
        handler = self._factory(role, seconds).handler
        return self._deadline(handler.execute_command(*args), seconds + 0.5, args[0])

    def close(self) -> defer.Deferred[Any]:
        """Stop reconnecting and close every connection."""
        self._closed = True
        # Commands still waiting for a connection would otherwise keep their timers.
        for pending in list(self._pending):
            pending.cancel()
        factories, self._factories = list(self._factories.values()), {}
        return defer.gatherResults([f.disconnect() for f in factories], consumeErrors=True)
