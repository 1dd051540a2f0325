# -*- test-case-name: tests.test_fleet -*-
"""Bounded views for fleets: ``listeners``, ``circuits`` and their JSON pages.

With 100,000 initiators a full ``listeners`` is about 10 MiB of text built in one
reactor turn (every other connection waits meanwhile) and more than any terminal
or browser shows. So every list view returns at most ``DEFAULT_LIMIT`` rows unless
asked for more (up to ``MAX_LIMIT``), in the order it always had, from ``--offset``
on; what was left out is said on standard error (the HTTP API: ``X-Total-Count``),
so scripts reading standard output see the same shape as before. ``stats`` and
``/metrics`` are counts already and stay whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_LIMIT = 1000
MAX_LIMIT = 100000


class PageError(ValueError):
    """A bad --limit/--offset; str() is the message shown."""


@dataclass(frozen=True)
class Page:
    offset: int = 0
    limit: int = DEFAULT_LIMIT

    def slice(self, rows: list[Any]) -> list[Any]:
        return rows[self.offset : self.offset + self.limit]

    def note(self, shown: int, total: int, command: str) -> str:
        """The line saying what was left out (empty when nothing was)."""
        if self.offset == 0 and shown >= total:
            return ""
        first = self.offset + 1 if shown else self.offset
        text = f"showing {first}-{self.offset + shown} of {total}"
        if self.offset + shown < total:
            text += f"; next: {command} --offset {self.offset + shown}"
            if self.limit != DEFAULT_LIMIT:
                text += f" --limit {self.limit}"
        return text + "\n"


def _number(text: str, what: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise PageError(f"{what} expects a number from {low} to {high}")
    return int(text)


def parse(args: list[str]) -> tuple[Page, list[str]]:
    """Take ``--limit N`` and ``--offset K`` out of ``args``; the rest is returned."""
    offset, limit, rest = 0, DEFAULT_LIMIT, []
    items = iter(args)
    for arg in items:
        if arg in ("--limit", "--offset"):
            value = next(items, "")
            if arg == "--limit":
                limit = _number(value, "--limit", 1, MAX_LIMIT)
            else:
                offset = _number(value, "--offset", 0, 10**9)
        else:
            rest.append(arg)
    return Page(offset, limit), rest


def from_query(args: dict[bytes, list[bytes]]) -> Page:
    """The same from an HTTP query string (``?limit=&offset=``)."""
    words: list[str] = []
    for name in (b"limit", b"offset"):
        if name in args:
            words += [f"--{name.decode()}", args[name][0].decode("ascii", "replace")]
    page, _ = parse(words)
    return page
