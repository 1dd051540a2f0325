# -*- test-case-name: tests.test_key_options -*-
"""What one login may do, as ONE object: the OpenSSH key options in the switchboard's terms.

An authorized_keys line's options (and, through `KeyPolicy.narrowed`, a
certificate's critical options and extensions) become a frozen `KeyPolicy`
carried on the login's Identity. Every place that grants something asks it:
the avatar (``tcpip-forward``: ``permitlisten``, ``no-port-forwarding``), the
connection (``direct-tcpip``: ``permitopen``), the session (``no-pty``,
``command``) and the key watcher (``expiry-time``).

``access=`` says which *kinds* of thing a key may do at all; the OpenSSH options
only ever take away from it, never add. Options are applied in file order, as
sshd does, so ``restrict,pty`` re-enables ptys and ``pty,restrict`` does not.

An option whose meaning nuttconch cannot give (``environment=``: no process is
ever run; ``verify-required``: FIDO user verification is not checked; a
``command=`` that is not a nuttconch command; a ``permitopen`` target that is not
a switchboard name) raises `PolicyError`: the line must then admit nobody,
because an administrator who wrote it believes it is in force.
"""

from __future__ import annotations

import calendar
import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "UNRESTRICTED",
    "KeyPolicy",
    "ListenRule",
    "OpenRule",
    "PolicyError",
    "glob_match",
    "parse_expiry",
]


class PolicyError(ValueError):
    """An option nuttconch cannot honour as written; the message is for the operator."""


#: Most ``permitopen``/``permitlisten`` rules one line may hold. The line itself is
#: at most 16 KiB; this bounds the work of every open and forward on that key.
MAX_RULES = 256
#: Longest name pattern in a ``permitopen`` rule (a name is at most 63 characters;
#: a pattern may add ``*`` and a ``~N`` index).
MAX_PATTERN = 128
#: Longest ``command=`` (the exec command limit, commands.MAX_COMMAND).
MAX_COMMAND = 1024

_PATTERN_RE = re.compile(r"[a-z0-9._*?-]+")
_INDEX_RE = re.compile(r"(?P<name>.*?)~(?P<index>[0-9]{1,4})")
_EXPIRY_RE = re.compile(r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(Z?)")

#: OpenSSH flags that switch on things nuttconch never offers (agents, X11, ~/.ssh/rc,
#: tun devices): honoured trivially, since the request is refused anyway.
_NEVER_OFFERED = frozenset(
    {
        "agent-forwarding",
        "no-agent-forwarding",
        "x11-forwarding",
        "no-x11-forwarding",
        "user-rc",
        "no-user-rc",
        "no-touch-required",
        "tunnel",
    }
)
#: Options that only mean something elsewhere (handled by the login code and the
#: certificate code), so the policy ignores them.
_NOT_POLICY = frozenset({"access", "from", "hostname", "alias", "cert-authority", "principals"})


def glob_match(pattern: str, text: str) -> bool:
    """
    ``*``/``?`` glob match in O(len(pattern) * len(text)), never exponential.

    OpenSSH's match_pattern (and a regex built from a glob) backtracks: a pattern of
    many ``*a`` against a long name costs seconds. This is the classic greedy
    matcher that only ever returns to the last ``*``.
    """
    p = t = 0
    star = -1
    mark = 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star = p
            mark = t
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def parse_expiry(text: str) -> float:
    """
    ``YYYYMMDD[HHMM[SS]][Z]`` as sshd reads it: local time, or UTC with ``Z``.

    Returns the epoch second from which the key is refused.
    """
    m = _EXPIRY_RE.fullmatch(text)
    if m is None:
        raise PolicyError(f"expiry-time {text!r} is not YYYYMMDD[HHMM[SS]][Z]")
    year, month, day, hour, minute, second, zulu = m.groups()
    fields = (int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    try:
        time.strptime("".join(f"{n:02d}" for n in fields), "%Y%m%d%H%M%S")
    except ValueError:
        raise PolicyError(f"expiry-time {text!r} is not a real date and time") from None
    if zulu:
        return float(calendar.timegm((*fields, 0, 0, 0)))
    return time.mktime((*fields, 0, 0, -1))


def _port(text: str, what: str) -> int | None:
    if text == "*":
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise PolicyError(f"{what}: port {text!r} is not 1-65535 or *")
    return int(text)


@dataclass(frozen=True)
class OpenRule:
    """One ``permitopen="name[~N]:port"``: a name glob, an optional index, a port or any."""

    name: str
    index: int | None
    port: int | None

    @classmethod
    def parse(cls, value: str) -> OpenRule:
        what = f"permitopen {value!r}"
        host, sep, port = value.rpartition(":")
        if not sep:
            raise PolicyError(f"{what} needs a port: name:port (or name:*)")
        host = host.lower()
        index: int | None = None
        m = _INDEX_RE.fullmatch(host)
        if m is not None:
            host, index = m.group("name"), int(m.group("index"))
        if not host or len(host) > MAX_PATTERN or _PATTERN_RE.fullmatch(host) is None:
            raise PolicyError(
                f"{what} does not name a switchboard name (name[~N]:port, with * and ? globs)"
            )
        return cls(host, index, _port(port, what))

    def allows(self, name: str, index: int, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.index is not None and self.index != index:
            return False
        return glob_match(self.name, name)

    def __str__(self) -> str:
        index = "" if self.index is None else f"~{self.index}"
        return f"{self.name}{index}:{'*' if self.port is None else self.port}"


@dataclass(frozen=True)
class ListenRule:
    """One ``permitlisten="[host:]port"``: the bind name (glob, ``*`` if absent) and port."""

    host: str
    port: int | None

    @classmethod
    def parse(cls, value: str) -> ListenRule:
        what = f"permitlisten {value!r}"
        host, sep, port = value.rpartition(":")
        host = host.lower() if sep else "*"
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or len(host) > 255 or any(c in host for c in " \t,\"'"):
            raise PolicyError(f"{what} has a bad listen host")
        return cls(host, _port(port, what))

    def allows(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        return self.host == "*" or glob_match(self.host, host.lower())

    def __str__(self) -> str:
        return f"{self.host}:{'*' if self.port is None else self.port}"


@dataclass(frozen=True)
class KeyPolicy:
    """
    The restrictions of one login; the default restricts nothing.

    ``permit_open``/``permit_listen`` are None when no rule was given (anything
    ``access=`` allows), else the rules, any one of which must allow (an empty
    tuple allows nothing).
    """

    expires: float | None = None
    expiry_text: str | None = None
    port_forwarding: bool = True
    pty: bool = True
    permit_open: tuple[OpenRule, ...] | None = None
    permit_listen: tuple[ListenRule, ...] | None = None
    command: str | None = None

    @classmethod
    def from_options(cls, options: Iterable[tuple[str, str | None]]) -> KeyPolicy:
        """Build the policy of an authorized_keys line, in file order; `PolicyError` if
        an option cannot be honoured."""
        expires: float | None = None
        expiry_text: str | None = None
        forwarding = pty = True
        opens: list[OpenRule] | None = None
        listens: list[ListenRule] | None = None
        command: str | None = None
        for name, value in options:
            if name in _NOT_POLICY or name in _NEVER_OFFERED:
                continue
            if name == "restrict":
                forwarding = pty = False
            elif name in ("port-forwarding", "no-port-forwarding"):
                forwarding = name == "port-forwarding"
            elif name in ("pty", "no-pty"):
                pty = name == "pty"
            elif name == "expiry-time" and value is not None:
                if expiry_text is not None:
                    raise PolicyError("expiry-time is given twice")
                expires, expiry_text = parse_expiry(value), value
            elif name == "permitopen" and value is not None:
                opens = [*(opens or []), *_rules(value, OpenRule.parse, "permitopen")]
            elif name == "permitlisten" and value is not None:
                listens = [*(listens or []), *_rules(value, ListenRule.parse, "permitlisten")]
            elif name == "command" and value is not None:
                if command is not None:
                    raise PolicyError("command= is given twice")
                command = check_command(value)
            elif name == "environment":
                raise PolicyError(
                    "environment= cannot be honoured: nuttconch runs no process to set it for"
                )
            elif name == "verify-required":
                raise PolicyError(
                    "verify-required cannot be honoured: nuttconch does not check"
                    " FIDO user verification"
                )
            else:
                raise PolicyError(f"option {name!r} cannot be honoured by nuttconch")
            if len(opens or ()) > MAX_RULES or len(listens or ()) > MAX_RULES:
                raise PolicyError(f"more than {MAX_RULES} permitopen or permitlisten rules")
        return cls(
            expires=expires,
            expiry_text=expiry_text,
            port_forwarding=forwarding,
            pty=pty,
            permit_open=None if opens is None else tuple(dict.fromkeys(opens)),
            permit_listen=None if listens is None else tuple(dict.fromkeys(listens)),
            command=command,
        )

    # -- questions the server asks -------------------------------------------

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def open_refusal(self, target: str, port: int) -> str | None:
        """Why a circuit to ``target:port`` (the name as the client wrote it) is refused."""
        if not self.port_forwarding:
            return "this key may not open circuits (no-port-forwarding or restrict)"
        if self.permit_open is None:
            return None
        name, index = _split_index(target.lower())
        if any(rule.allows(name, index, port) for rule in self.permit_open):
            return None
        return f"this key may not open {target}:{port} (permitopen)"

    def listen_refusal(self, host: str, port: int) -> str | None:
        """Why a ``tcpip-forward`` of ``host:port`` is refused (port 0: any allowed one)."""
        if not self.port_forwarding:
            return "this key may not forward ports (no-port-forwarding or restrict)"
        if self.permit_listen is None or port == 0:
            return None
        if any(rule.allows(host, port) for rule in self.permit_listen):
            return None
        return f"this key may not forward port {port} (permitlisten)"

    def listen_choices(self, host: str) -> tuple[int, ...] | None:
        """The ports ``-R 0`` may get: None for any, else the permitted ports in order."""
        if self.permit_listen is None:
            return None
        if any(r.port is None and r.allows(host, 1) for r in self.permit_listen):
            return None
        return tuple(
            r.port for r in self.permit_listen if r.port is not None and r.allows(host, r.port)
        )

    def describe(self) -> list[str]:
        """The restrictions in force, in words (``whoami`` and ``keys``)."""
        parts = []
        if self.expiry_text is not None:
            parts.append(f"expires {format_time(self.expires)}")
        if not self.port_forwarding:
            parts.append("no port forwarding")
        if not self.pty:
            parts.append("no pty")
        if self.permit_open is not None:
            parts.append("permitopen " + (",".join(map(str, self.permit_open)) or "none"))
        if self.permit_listen is not None:
            parts.append("permitlisten " + (",".join(map(str, self.permit_listen)) or "none"))
        if self.command is not None:
            parts.append(f"command {self.command!r}")
        return parts

    def narrowed(self, other: KeyPolicy) -> KeyPolicy:
        """
        What both policies allow: for a certificate under a ``cert-authority`` line
        (the line's options narrowed by the certificate's). Rule lists are kept only
        where both agree exactly (fail closed); two different commands cannot both be
        honoured and raise `PolicyError`, as sshd refuses such a login.
        """
        if self.command and other.command and self.command != other.command:
            raise PolicyError("the key's command= and the certificate's force-command differ")
        expiries = [p for p in (self, other) if p.expires is not None]
        first = min(expiries, key=lambda p: p.expires or 0.0) if expiries else None
        return KeyPolicy(
            expires=first.expires if first else None,
            expiry_text=first.expiry_text if first else None,
            port_forwarding=self.port_forwarding and other.port_forwarding,
            pty=self.pty and other.pty,
            permit_open=_both(self.permit_open, other.permit_open),
            permit_listen=_both(self.permit_listen, other.permit_listen),
            command=self.command or other.command,
        )


UNRESTRICTED = KeyPolicy()


_Rule = TypeVar("_Rule", OpenRule, ListenRule)


def _both(a: tuple[_Rule, ...] | None, b: tuple[_Rule, ...] | None) -> tuple[_Rule, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(rule for rule in a if rule in b)


def _rules(value: str, parse: Callable[[str], _Rule], what: str) -> list[_Rule]:
    """A value may list several rules separated by commas, as sshd accepts."""
    items = [item.strip() for item in value.split(",")]
    if not all(items):
        raise PolicyError(f"{what} {value!r} has an empty entry")
    if items == ["none"]:
        return []
    return [parse(item) for item in items]


def _split_index(target: str) -> tuple[str, int]:
    m = _INDEX_RE.fullmatch(target)
    if m is not None:
        return m.group("name"), int(m.group("index"))
    return target, 0


#: The commands a ``command=`` may name. Kept here, not read from commands.COMMANDS,
#: because commands imports (through admin and authkeys) this module; a test checks
#: that the two agree.
COMMAND_NAMES = frozenset(
    {
        "ban",
        "circuits",
        "grant",
        "help",
        "keys",
        "kick",
        "list",
        "listeners",
        "revoke",
        "stats",
        "whoami",
    }
)


def check_command(value: str) -> str:
    """A ``command=`` must be a nuttconch command line: it is all the key's sessions run."""
    if len(value) > MAX_COMMAND:
        raise PolicyError(f"command= is longer than {MAX_COMMAND} characters")
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise PolicyError(f"command= cannot be parsed: {exc}") from None
    if not argv:
        raise PolicyError("command= is empty")
    if argv[0] not in COMMAND_NAMES:
        raise PolicyError(
            f"command= runs {argv[0][:40]!r}, which is not a nuttconch command"
            f" (one of {', '.join(sorted(COMMAND_NAMES))})"
        )
    return value


def format_time(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
