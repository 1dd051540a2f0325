# -*- test-case-name: tests.test_key_options -*-
"""The verified host name of a client address, for ``from=`` hostname patterns.

As sshd with ``UseDNS yes``: the address's reverse name counts only if a
forward lookup of that name gives the address back (otherwise anyone who
controls the PTR record of their own address could claim any name). The
system resolver is used, so ``/etc/hosts`` and nsswitch apply as for sshd.

Lookups are asked for only by logins whose key has a hostname pattern, run in
a small thread pool of their own (a slow DNS server never holds the threads
that read authorized_keys for other logins), give up after ``timeout`` seconds
and are cached for ``ttl`` seconds, failures included, so a client whose
reverse zone hangs pays the timeout once a minute, not at every attempt.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

#: Addresses remembered at once; past it the oldest half is forgotten.
MAX_CACHED = 4096
#: Lookups waiting for a thread; past it a login gets no name at once (fail closed).
MAX_QUEUED = 256


def _normal(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def forward_confirmed_name(address: str) -> str | None:
    """The reverse name of ``address`` if its forward lookup contains ``address``, else None.

    Blocking (system resolver): run it in a thread.
    """
    wanted = _normal(address)
    try:
        name, _ = socket.getnameinfo((wanted, 0), socket.NI_NAMEREQD)
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError):
        return None
    if not name or _normal(name) != name.lower():
        return None  # a PTR record that is itself an address proves nothing
    if wanted in {_normal(str(info[4][0])) for info in infos}:
        return name.lower().rstrip(".")
    return None


class VerifiedNames:
    """Asynchronous, bounded and cached `forward_confirmed_name`."""

    def __init__(
        self,
        reactor: Any,
        timeout: float = 5.0,
        ttl: float = 60.0,
        threads_max: int = 4,
        resolve: Callable[[str], str | None] = forward_confirmed_name,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.ttl = ttl
        self.resolve = resolve
        self.clock = clock
        self.threads_max = threads_max
        self._pool: ThreadPool | None = None
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._waiting: dict[str, list[defer.Deferred[str | None]]] = {}
        self.lookups = 0
        self.timeouts = 0

    def _threads(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(0, self.threads_max, name="nuttconch-dns")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return self._pool

    def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()

    def lookup(self, address: str) -> defer.Deferred[str | None]:
        """Fires with the verified name, or None (no name, not confirmed, too slow)."""
        key = _normal(address)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return defer.succeed(cached[1])
        d: defer.Deferred[str | None] = defer.Deferred()
        if key in self._waiting:
            self._waiting[key].append(d)
            return d
        if len(self._waiting) >= MAX_QUEUED:
            log.warn(
                "host name lookups: {count} waiting; {address} gets no name",
                count=len(self._waiting),
                address=key,
            )
            return defer.succeed(None)
        self._waiting[key] = [d]
        self.lookups += 1
        started = now
        work = threads.deferToThreadPool(self.reactor, self._threads(), self.resolve, key)
        timer = self.reactor.callLater(self.timeout, self._timedOut, key, started)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
            name = result if isinstance(result, str) else None
            self._finish(key, name)

        work.addBoth(done)
        return d

    def _timedOut(self, key: str, started: float) -> None:
        self.timeouts += 1
        log.info(
            "host name lookup of {address} took over {timeout}s; no name for it",
            address=key,
            timeout=self.timeout,
        )
        self._finish(key, None)

    def _finish(self, key: str, name: str | None) -> None:
        waiting = self._waiting.pop(key, None)
        if waiting is None:
            return  # already answered (timed out), this is the late thread
        if len(self._cache) >= MAX_CACHED:
            for old in list(self._cache)[: MAX_CACHED // 2]:
                del self._cache[old]
        self._cache[key] = (self.clock() + self.ttl, name)
        for d in waiting:
            d.callback(name)
