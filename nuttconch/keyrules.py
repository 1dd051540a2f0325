# -*- test-case-name: tests.test_access_policy -*-
"""
Whether an authorized_keys line admits a peer: one function for the login
and for the key watcher.

The checker (auth.py) used to apply a line's rules at login and the key
watcher (server.py) applied its own copy when the file changed, so a rule
added to one could be forgotten in the other and a connection would stay
up on terms a new login no longer gets.  `admits` holds the rules once.

The two callers say the outcome in different words (a client being
refused is told "this key is denied"; a live connection being closed is
logged and told "key denied in authorized_keys"), and those words are
part of what users and operators see, so a `Decision` carries both:
``message`` and ``reason`` for a login, ``live`` for a connection judged
again.  Which rule fired is ``rule``, for callers and tests that need to
act on it (the checker logs an unusable option line).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import authkeys
from .access import INITIATE
from .policy import format_time

__all__ = ["ADMITTED", "Decision", "admits"]


@dataclass(frozen=True)
class Decision:
    """The outcome of `admits`: admitted, or which rule refused and how to say so."""

    admitted: bool
    #: Which rule refused: unknown, denied, not-ca, option, from, expired,
    #: initiate, listen, ca-names ("" when admitted).
    rule: str = ""
    #: The short reason a refused login is logged and counted under.
    reason: str = ""
    #: The sentence a client being refused at login is shown.
    message: str = ""
    #: The sentence a live connection is closed with when the file changed.
    live: str = ""

    def __bool__(self) -> bool:
        return self.admitted


ADMITTED = Decision(True)


def admits(
    entry: authkeys.AuthorizedKey | None,
    *,
    peer: str,
    peer_name: str | None,
    now: float,
    ca: bool = False,
    external: bool = False,
    holds_ports: bool = False,
    ports: Iterable[tuple[int, str]] = (),
) -> Decision:
    """
    Whether ``entry`` (the line found for a key, or for a certificate's
    authority when ``ca``) admits a peer at ``peer`` (forward-confirmed
    name ``peer_name``) at time ``now``.

    ``external``: the login came from authorized_keys_command, so the file
    not having a line is no reason to refuse.  ``holds_ports`` and
    ``ports`` (port, bind host) describe what a live connection already
    holds; a login holds nothing.  Rules run in one fixed order, so the
    same line gives the same first refusal on both paths.
    """
    if entry is None:
        if ca:
            return Decision(
                False,
                "unknown",
                "unknown CA",
                "this certificate's authority is not trusted here",
                "its certificate authority removed from authorized_keys",
            )
        if external:
            return ADMITTED  # admitted by authorized_keys_command; the file never had it
        return Decision(
            False,
            "unknown",
            "unknown key",
            "this key is not authorized",
            "key removed from authorized_keys",
        )
    if entry.denied:
        what = "this certificate's authority" if ca else "this key"
        return Decision(
            False, "denied", "denied", f"{what} is denied", "key denied in authorized_keys"
        )
    unusable = f"authorized_keys line {entry.lineno} has an option that cannot be honoured"
    if entry.cert_authority != ca:
        # Only a line that denies its key (denied, or options that cannot be
        # honoured) is ever found for the wrong kind of login.
        return Decision(
            False,
            "not-ca",
            "unknown key",
            "this key is not authorized",
            unusable
            if entry.policy_error is not None
            else "its certificate authority removed from authorized_keys",
        )
    if entry.policy_error is not None:
        return Decision(
            False,
            "option",
            "bad option",
            f"this key's authorized_keys line {entry.lineno} has an option the server"
            " cannot honour; ask its operator",
            unusable,
        )
    if not authkeys.from_allows(entry, peer, peer_name):
        return Decision(
            False,
            "from",
            "from",
            f"this key is not allowed from {peer}",
            "key no longer allowed from this address",
        )
    if entry.policy.expired(now):
        return Decision(
            False,
            "expired",
            "expired",
            f"this key expired on {format_time(entry.policy.expires)}",
            "key expired",
        )
    if holds_ports and INITIATE not in entry.access:
        return Decision(
            False,
            "initiate",
            "refused",
            "this key lacks access=initiate",
            "key lost access=initiate while holding virtual ports",
        )
    for port, bind_host in sorted(ports):
        refusal = entry.policy.listen_refusal(bind_host, port)
        if refusal is not None:
            return Decision(
                False,
                "listen",
                "refused",
                refusal,
                f"key's options no longer allow virtual port {port}",
            )
    if ca and (entry.hostname is not None or entry.aliases):
        return Decision(
            False,
            "ca-names",
            "bad option",
            f"authorized_keys line {entry.lineno}: a cert-authority line cannot give"
            " hostname= or alias= (every certificate would share them)",
            "the certificate authority's line now gives hostname= or alias=",
        )
    return ADMITTED
