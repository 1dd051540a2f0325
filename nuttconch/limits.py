# -*- test-case-name: tests.test_threats -*-
"""Pre-authentication limits and per-source penalties, as OpenSSH's sshd has them.

A switchboard on the open internet is flooded and probed constantly; what
keeps it serving its own users is refusing strangers cheaply, before any
key exchange is spent on them: a cap on unauthenticated connections
(MaxStartups, with random early drop), a cap per source address
(PerSourceMaxStartups), and a growing refusal time for sources that fail
authentication, send garbage or stall (PerSourcePenalties). After login, a
token bucket bounds how fast one connection may do things that each cost
the server log lines, events and work (forward add/cancel), and misses
(circuit opens to names that do not exist) are penalised like failed logins,
so that guessing a generated alias costs the guesser time.
"""

from __future__ import annotations

import ipaddress
import os
import random
import resource
from collections.abc import Callable
from dataclasses import dataclass, field

# Penalty seconds per kind of misbehaviour, and the bounds OpenSSH uses.
# "miss": a circuit open to an unknown name, port or index (enumeration).
PENALTIES = {
    "authfail": 5.0,
    "noauth": 1.0,
    "grace-exceeded": 10.0,
    "garbage": 10.0,
    "miss": 2.0,
}
PENALTY_MIN = 15.0
PENALTY_MAX = 600.0
MAX_SOURCES = 65536
# Headroom kept below the open-file limit for what is not a client socket: authorized_keys
# reads and appends, log files, webhook and metrics connections, Redis, threads' files.
FD_HEADROOM_MIN = 32
FD_HEADROOM_FRACTION = 0.02
FD_LOG_INTERVAL = 60.0


def source_of(host: str) -> str:
    """The unit a penalty applies to: the IPv4 address, or the IPv6 /64."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass
class Penalties:
    """Accumulated penalty per source; a source is refused once it passes ``minimum``."""

    clock: Callable[[], float]
    exempt: Callable[[str], bool] = lambda host: False
    enabled: bool = True
    minimum: float = PENALTY_MIN
    maximum: float = PENALTY_MAX
    until: dict[str, float] = field(default_factory=dict)
    announced: set[str] = field(default_factory=set)

    def add(self, host: str, kind: str) -> float | None:
        """Record misbehaviour; returns the refusal time when it newly starts to apply."""
        if not self.enabled or self.exempt(host):
            return None
        now = self.clock()
        source = source_of(host)
        if len(self.until) >= MAX_SOURCES:
            self._expire(now)
        current = max(self.until.get(source, now), now)
        expiry = min(current + PENALTIES.get(kind, 1.0), now + self.maximum)
        self.until[source] = expiry
        remaining = expiry - now
        if remaining >= self.minimum and source not in self.announced:
            self.announced.add(source)
            return remaining
        return None

    def refused(self, host: str) -> bool:
        if not self.enabled or not self.until:
            return False
        source = source_of(host)
        expiry = self.until.get(source)
        if expiry is None:
            return False
        now = self.clock()
        if expiry <= now:
            del self.until[source]
            self.announced.discard(source)
            return False
        # Refused only once the accumulated penalty has passed the minimum.
        return source in self.announced

    def _expire(self, now: float) -> None:
        for source, expiry in list(self.until.items()):
            if expiry <= now:
                del self.until[source]
                self.announced.discard(source)

    def in_force(self) -> int:
        now = self.clock()
        return sum(1 for s, e in self.until.items() if e > now and s in self.announced)


@dataclass
class Startups:
    """Counts unauthenticated connections, globally and per source, with early drop."""

    start: int
    rate: int
    full: int
    per_source: int
    rng: random.Random = field(default_factory=random.SystemRandom)
    total: int = 0
    by_source: dict[str, int] = field(default_factory=dict)

    def admit(self, host: str, *, early_drop: bool = True) -> str | None:
        """None to admit, else the reason to drop (and the caller must not call done).

        ``early_drop=False`` skips the random drop: used once room was made by evicting a
        staller, so that the newcomer is not refused by a second roll of the dice.

        A source with nothing pending is never early-dropped, only refused when the
        table is full (and the caller first evicts a staller): a fleet of devices from
        many addresses logging in at once is what a switchboard exists for, while a
        flood comes from sources that already hold connections, and it is those whose
        further attempts the dice thin out.
        """
        source = source_of(host)
        held = self.by_source.get(source, 0)
        if held >= self.per_source:
            return "per-source startups exceeded"
        if self.total >= self.full:
            return "startups full"
        if early_drop and held > 0 and self.total >= self.start:
            # OpenSSH: drop with probability rising linearly from rate% at start to 100% at full.
            span = max(1, self.full - self.start)
            probability = self.rate + (100 - self.rate) * (self.total - self.start) / span
            if self.rng.random() * 100 < probability:
                return "startups early drop"
        self.total += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return None

    def done(self, host: str) -> None:
        """The connection authenticated or went away: it no longer counts."""
        source = source_of(host)
        count = self.by_source.get(source, 0)
        if count <= 1:
            self.by_source.pop(source, None)
        else:
            self.by_source[source] = count - 1
        self.total = max(0, self.total - 1)


@dataclass
class TokenBucket:
    """``burst`` actions at once, then ``rate`` a second: a per-connection budget.

    Used where each action is cheap to ask for but costs the server more than
    the asker (log lines, events, registry work), so that a loop of requests
    runs at a bounded pace instead of as fast as the peer can send.
    """

    rate: float
    burst: float
    clock: Callable[[], float]
    tokens: float = -1.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.stamp = self.clock()

    def take(self) -> bool:
        """Spend one token; False (and nothing spent) when the budget is used up."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class DescriptorGuard:
    """Refuses new connections a little before the open-file limit instead of at it.

    At the limit itself every ``open()`` fails too: a login could not read
    authorized_keys, a first-use key could not be appended, a log file could
    not be rotated. So new sockets are closed as soon as they are accepted
    once ``open_connections`` would leave less than the headroom, the
    connections already held keep working, and one log line per interval
    says how many were refused (a refusal per line would let a flood fill
    the disk). ``limit`` 0 means unknown: never refuse.
    """

    limit: int
    baseline: int
    clock: Callable[[], float]
    interval: float = FD_LOG_INTERVAL
    refused: int = 0
    _unlogged: int = 0
    _logged_at: float = -1e18

    @property
    def ceiling(self) -> int:
        """Connections allowed at once: the limit less the headroom."""
        if self.limit <= 0:
            return 1 << 62
        headroom = max(FD_HEADROOM_MIN, int(self.limit * FD_HEADROOM_FRACTION))
        return max(1, self.limit - headroom - self.baseline)

    def admit(self, open_connections: int) -> bool:
        if open_connections < self.ceiling:
            return True
        self.refused += 1
        self._unlogged += 1
        return False

    def report(self) -> int | None:
        """How many were refused since the last line, when a line is due now (else None)."""
        now = self.clock()
        if self._unlogged == 0 or now - self._logged_at < self.interval:
            return None
        count, self._unlogged, self._logged_at = self._unlogged, 0, now
        return count


def open_file_limit() -> tuple[int, int]:
    """(soft open-file limit, descriptors open now): read once, when the server is built.

    The descriptors open at start (listeners, log, host keys, the reactor's own) are
    not client sockets; they are taken off what connections may use.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0, 0
    try:
        baseline = len(os.listdir("/proc/self/fd"))
    except OSError:
        baseline = 16
    return int(soft), baseline
