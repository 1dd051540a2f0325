# -*- test-case-name: tests.test_admission,tests.test_threats -*-
"""Who may start an SSH connection, before any protocol work is done for it.

Penalised sources are refused, and MaxStartups bounds the connections that
have not authenticated yet (making room, when it is full, by dropping the
oldest one that has not even finished its key exchange).  It is its own
object, built by the composition in tap.py, so that the transport factory
only asks it, tests drive it with a clock and no sockets, and a cluster node
can later give it shared penalties without touching the factory.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from . import authkeys
from .limits import DescriptorGuard, Penalties, Startups, open_file_limit

# The namespace these lines always had (they were logged by the factory): operators'
# log filters and the text format's "[nuttconch.server#info]" stay as they were.
log = Logger(namespace="nuttconch.server")
# An unauthenticated connection that has not finished key exchange after this many seconds
# may be dropped to admit a newcomer when MaxStartups is full.
STALLER_AGE = 2.0
NO_KEXINIT_AGE = 0.5


class Admission:
    """MaxStartups and per-source penalties for one server."""

    def __init__(self, config: Any, clock: Any, events: Any) -> None:
        self.clock = clock
        self.events = events
        start, rate, full = config.max_startups
        self.startups = Startups(start, rate, full, config.per_source_max_startups)
        exempt = config.per_source_penalty_exempt_list
        self.penalties = Penalties(
            clock=clock.seconds,
            exempt=(lambda host: authkeys.match_from(exempt, host))
            if exempt
            else (lambda h: False),
            enabled=config.per_source_penalties,
        )
        # Refuses new sockets near the open-file limit, so the connections held keep working.
        self.descriptors = DescriptorGuard(*open_file_limit(), clock=clock.seconds)
        self.dropped = 0
        # Unauthenticated transports in arrival order (a dict used as an ordered set).
        self.preauth: dict[Any, None] = {}
        self._dropLogged: dict[str, float] = {}

    def admit(self, host: str, open_transports: int = 0) -> bool:
        """Whether a new TCP connection from ``host`` gets a transport at all."""
        if not self.descriptors.admit(open_transports):
            self._descriptorsFull(open_transports)
            return False
        if self.penalties.refused(host):
            self._drop(host, "source is penalised")
            return False
        reason = self.startups.admit(host)
        if reason is not None and reason != "per-source startups exceeded":
            # Full of unauthenticated connections: make room by dropping the oldest one that
            # has not even finished key exchange (a staller), so a real client still gets in.
            victim = self.oldestStaller()
            if victim is not None:
                self.done(victim)
                victim.penaltyKind = "grace-exceeded"
                victim.transport.abortConnection()
                reason = self.startups.admit(host, early_drop=False)
        if reason is not None:
            self._drop(host, reason)
            return False
        return True

    def started(self, transport: Any) -> None:
        """An admitted transport now counts among the unauthenticated."""
        transport.preauthCounted = True
        transport.startedAt = self.clock.seconds()
        self.preauth[transport] = None

    def done(self, transport: Any) -> None:
        """The connection authenticated or closed: it leaves the MaxStartups count."""
        if transport.preauthCounted:
            transport.preauthCounted = False
            self.preauth.pop(transport, None)
            self.startups.done(transport._peerHost)

    def oldestStaller(self) -> Any:
        """The oldest unauthenticated connection that looks stalled: no KEXINIT after
        NO_KEXINIT_AGE (real clients send it with their banner), or no finished key
        exchange after STALLER_AGE."""
        now = self.clock.seconds()
        for transport in self.preauth:  # insertion order: oldest first
            age = now - transport.startedAt
            if transport.firstKexDone:
                continue
            if age >= STALLER_AGE or (age >= NO_KEXINIT_AGE and not transport.gotKexInit):
                return transport
        return None

    def penalise(self, host: str, kind: str) -> None:
        seconds = self.penalties.add(host, kind)
        if seconds is not None:
            log.info(
                "penalising {peer} for {seconds:.0f}s ({kind})",
                peer=host,
                seconds=seconds,
                kind=kind,
            )
            self.events.emit("penalty", peer=host, seconds=seconds, kind=kind)

    def _descriptorsFull(self, open_transports: int) -> None:
        """Near the open-file limit: one line an interval, not one per refused socket."""
        self.dropped += 1
        count = self.descriptors.report()
        if count is not None:
            log.warn(
                "near the open-file limit ({limit}): refused {count} new connection(s) since"
                " the last such line; still serving {n} connections",
                limit=self.descriptors.limit,
                count=count,
                n=open_transports,
            )

    def _drop(self, host: str, reason: str) -> None:
        """Count every drop; log at most one line per source and reason a minute."""
        self.dropped += 1
        now = self.clock.seconds()
        key = f"{host} {reason}"
        if now - self._dropLogged.get(key, -1e9) >= 60:
            if len(self._dropLogged) > 4096:
                self._dropLogged.clear()
            self._dropLogged[key] = now
            log.info("refused connection from {peer}: {reason}", peer=host, reason=reason)
        self.events.emit("connection.refused", peer=host, reason=reason)
