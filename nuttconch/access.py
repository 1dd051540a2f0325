# -*- test-case-name: tests.test_access_policy -*-
"""
What a key may do (its ``access=`` values), spelled one way.

The values used to be written as bare strings and frozensets in auth,
authkeys, admin and commands, each with its own idea of "every value" and
"what a grant may add"; `Access` is the one type and this module the one
list.  It is a frozenset of the value strings, so ``"list" in access``,
``sorted(access)`` and equality with a plain frozenset keep working in
logs, JSON and tests unchanged.

This module imports nothing from nuttconch, so authkeys (which parses the
values) and everything above it can use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ADMIN",
    "ALL",
    "DENIED",
    "HOP",
    "GRANTABLE",
    "INITIATE",
    "LIST",
    "LISTEN",
    "TOFU",
    "VALUES",
    "Access",
    "authenticated",
]

INITIATE = "initiate"
LISTEN = "listen"
LIST = "list"
ADMIN = "admin"
#: Not a capability: a line with it refuses its key whatever else it says.
DENIED = "denied"

#: Every value an ``access=`` option may hold.
VALUES = frozenset({INITIATE, LISTEN, LIST, ADMIN, DENIED})


#: A cluster node logged in on the relay port; never written in authorized_keys.
HOP = "hop"


class Access(frozenset[str]):
    """A set of access values; what a line grants is built with `known`."""

    __slots__ = ()

    @classmethod
    def known(cls, values: Iterable[str]) -> Access:
        """The values an authorized_keys line may give; unknown ones grant nothing."""
        return cls(v for v in values if v in VALUES)

    @property
    def denied(self) -> bool:
        """``denied`` wins over everything else on the line."""
        return DENIED in self

    def granted(self) -> Access:
        """What a login with these values may do: everything but the ``denied`` marker."""
        return Access(self - {DENIED})

    def describe(self) -> str:
        """The form log lines use: sorted and comma-joined, ``none`` when empty."""
        return ",".join(sorted(self)) or "none"


#: Everything (auth disabled: every key may do everything).
ALL = Access({INITIATE, LISTEN, LIST, ADMIN})
#: What trust on first use writes, in the order the line spells it.
TOFU = (INITIATE, LISTEN)
#: What ``grant`` may add, in the order help and errors list them.
GRANTABLE = tuple(sorted(ALL))


def authenticated(transport: object) -> bool:
    """
    Whether ``transport`` has finished user authentication.

    Conch marks that only by setting ``transport.avatar`` (and itself tests
    for the attribute's presence when the connection is lost), so the
    attribute cannot be given a class default; this is the one place that
    knows how it is spelled.
    """
    return "avatar" in getattr(transport, "__dict__", {})
