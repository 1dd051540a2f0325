# -*- test-case-name: tests.test_budget -*-
"""What one party may make the server hold: a memory budget for circuit windows, and
caps on authenticated connections per key and per source address.

A circuit end can be made to hold, at most, the receive window it has handed to its
sender (the splice only re-grants bytes that have moved on).  So the memory a
connection can pin is the sum of its circuit ends' windows, and without a limit that
is ``max_channels`` times ``channel_window`` per connection, on as many connections as
a first-use key or an address can open.  Here every circuit end holds an *allotment*,
the window it may have outstanding (what its sender may still send, plus what it has
received and not yet re-granted).  Allotments are charged to the end's connection and
to the server as a whole:

- a new end gets a full window while both budgets have room, else only what is left,
  but never less than ``FLOOR`` (one packet), so that a circuit whose far end reads
  always makes progress, however full the budgets are;
- when an end re-grants bytes that have moved on, it keeps at most its fair share
  (the budget divided among the ends that share it): over budget, windows shrink as
  data flows and grow back, within the room left, once others close or shrink;
- a new circuit is refused while the server-wide budget cannot pay even the floors
  of its two ends.

The memory in circuit buffers is thus at most ``memory_total`` plus one packet for each
circuit being opened at that moment (its client end is charged when the initiator
answers); per connection, ``memory_per_connection`` plus one packet per circuit end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from .auth import Refused
from .limits import source_of

log = Logger()

# One maximum-size packet (the circuit ends' localMaxPacket): the least window that
# still moves data one packet per round trip.
FLOOR = 32768

# RFC 4253 11.1 reason code: OpenSSH shows it as "Received disconnect ...: 12: text".
DISCONNECT_TOO_MANY_CONNECTIONS = 12


@dataclass
class Account:
    """The allotments of one connection's circuit ends."""

    limit: int
    conn: Any = None
    total: int = 0
    ends: int = 0
    announced: bool = False


class MemoryBudget:
    """Window allotments for circuit ends, per connection and server-wide.

    ``total == 0`` means no server-wide limit; ``per_connection == 0`` no
    per-connection limit.  The circuit ends call ``open``, ``regrant`` and
    ``close``; the connection asks ``refusal`` before starting a circuit.
    """

    def __init__(self, per_connection: int, total: int, window: int, floor: int = FLOOR) -> None:
        self.per_connection = per_connection
        self.limit = total
        self.window = window
        self.floor = min(floor, window)
        self.total = 0
        self.ends = 0
        self.accounts: dict[Any, Account] = {}
        self._refusals = 0
        self.announced = False

    # bookkeeping

    def _account(self, conn: Any) -> Account:
        account = self.accounts.get(conn)
        if account is None:
            account = self.accounts[conn] = Account(self.per_connection, conn)
        return account

    def _charge(self, end: Any, account: Account, delta: int) -> None:
        end.allotment += delta
        account.total += delta
        self.total += delta

    def room(self, account: Account) -> int:
        """Bytes of window that may still be handed out without passing either limit."""
        rooms = []
        if account.limit:
            rooms.append(account.limit - account.total)
        if self.limit:
            rooms.append(self.limit - self.total)
        return max(0, min(rooms)) if rooms else self.window

    def share(self, account: Account) -> int:
        """The window one end of this connection may keep: the whole window, or its fair
        part of whichever budget is smaller, and never less than the floor."""
        share = self.window
        if account.limit:
            share = min(share, account.limit // max(1, account.ends))
        if self.limit:
            share = min(share, self.limit // max(1, self.ends))
        return max(self.floor, share)

    # the circuit ends' hooks

    def open(self, end: Any, conn: Any) -> int:
        """Charge a new end and return the receive window it may advertise."""
        account = self._account(conn)
        account.ends += 1
        self.ends += 1
        initial = max(self.floor, min(self.share(account), self.room(account)))
        end.allotment = 0
        end.budgetAccount = account
        self._charge(end, account, initial)
        if initial < self.window:
            self._announce(account, conn)
        return initial

    def regrant(self, end: Any, moved: int) -> int:
        """``moved`` bytes of ``end``'s window have moved on: how many to give back.

        Giving all of them back keeps the allotment; giving fewer shrinks it toward the
        fair share; giving more grows it, within the room the budgets have left.
        """
        account: Account | None = getattr(end, "budgetAccount", None)
        if account is None:
            return moved
        current = end.allotment
        kept = current - moved  # still outstanding: the sender's window plus queued bytes
        share = self.share(account)
        if share > current:
            target = current + min(share - current, self.room(account))
        else:
            target = max(share, kept)
        target = max(target, kept, self.floor)
        self._charge(end, account, target - current)
        return target - kept

    def close(self, end: Any) -> None:
        """The end is gone: its allotment returns to the budgets (idempotent)."""
        account: Account | None = getattr(end, "budgetAccount", None)
        if account is None:
            return
        end.budgetAccount = None
        self._charge(end, account, -end.allotment)
        account.ends -= 1
        self.ends -= 1
        if account.ends <= 0 and self.accounts.get(account.conn) is account:
            del self.accounts[account.conn]

    # admission of new circuits

    def refusal(self) -> str | None:
        """Why a new circuit may not start now (two ends' floors do not fit), or None."""
        if not self.limit or self.limit - self.total >= 2 * self.floor:
            if self._refusals:
                log.info(
                    "memory budget: accepting new circuits again ({count} refused)",
                    count=self._refusals,
                )
                self._refusals = 0
            return None
        self._refusals += 1
        if self._refusals == 1 or self._refusals % 1000 == 0:
            log.info(
                "memory budget: {total} of {limit} bytes allotted; refusing new circuits"
                " ({count} so far)",
                total=self.total,
                limit=self.limit,
                count=self._refusals,
            )
        return "the server is short of memory for new circuits; try again later"

    def _announce(self, account: Account, conn: Any) -> None:
        """Say once per connection (and once server-wide) that windows are being cut."""
        if account.limit and account.total + self.floor > account.limit:
            if not account.announced:
                account.announced = True
                transport = getattr(conn, "transport", None)
                log.info(
                    "conn {conn_id}: memory budget of {limit} bytes reached: circuit"
                    " windows shrink to fit",
                    conn_id=getattr(transport, "connId", "?"),
                    limit=account.limit,
                )
        elif self.limit and not self.announced and self.total + self.floor > self.limit:
            self.announced = True
            log.info(
                "server memory budget of {limit} bytes reached: circuit windows shrink to fit",
                limit=self.limit,
            )


def budget_of(conn: Any) -> MemoryBudget | None:
    """The server's budget, reached from a connection (None for bare test doubles)."""
    transport = getattr(conn, "transport", None)
    factory = getattr(transport, "factory", None)
    budget = getattr(factory, "budget", None)
    return budget if isinstance(budget, MemoryBudget) else None


class TooManyConnections(Refused):
    """A login over a connection cap: shown to the client, then the connection ends."""

    disconnectCode = DISCONNECT_TOO_MANY_CONNECTIONS
    # Not an authentication failure: a user over the cap must not get their address
    # penalised as if guessing keys; only the small "closed without login" penalty.
    penaltyKind = "noauth"


@dataclass
class ConnectionLimits:
    """Authenticated connections per key and per source address (0: no limit)."""

    per_key: int
    per_source: int
    by_key: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, int] = field(default_factory=dict)

    def admit(self, fingerprint: str, peer: str) -> None:
        """Count a new login, or raise TooManyConnections with the sentence to show."""
        source = source_of(peer)
        if self.per_key and self.by_key.get(fingerprint, 0) >= self.per_key:
            raise TooManyConnections(
                f"too many connections with this key (at most {self.per_key});"
                " close one and try again",
                reason="max connections per key",
            )
        if self.per_source and self.by_source.get(source, 0) >= self.per_source:
            raise TooManyConnections(
                f"too many connections from {source} (at most {self.per_source});"
                " close one and try again",
                reason="max connections per source",
            )
        self.by_key[fingerprint] = self.by_key.get(fingerprint, 0) + 1
        self.by_source[source] = self.by_source.get(source, 0) + 1

    def release(self, fingerprint: str, peer: str) -> None:
        """A counted connection logged out."""
        for table, name in ((self.by_key, fingerprint), (self.by_source, source_of(peer))):
            count = table.get(name, 0)
            if count <= 1:
                table.pop(name, None)
            else:
                table[name] = count - 1
