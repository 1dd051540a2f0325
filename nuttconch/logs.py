# -*- test-case-name: tests.test_units -*-
"""Log output: human-readable or JSON lines, at a chosen level, Conch's chatter muted.

Conch logs every channel open and close at info and every packet detail
at debug; a switchboard relaying thousands of circuits would drown its own
one-line-per-event records in that, so Conch's namespaces are held at
``warn`` unless the operator asks for ``debug``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)

LEVELS = {name: LogLevel.levelWithName(name) for name in ("debug", "info", "warn", "error")}
# Conch's own records: its modules, and its ``_log`` as seen through our subclasses.
QUIET_NAMESPACES = (
    "twisted.conch",
    "nuttconch.transport.SwitchboardTransport",
    "nuttconch.auth.SwitchboardUserAuth",
    "nuttconch.connection.SwitchboardConnection",
    "nuttconch.server.SwitchboardFactory",
    "nuttconch.circuit.CircuitEnd",
    "nuttconch.circuit.ClientEnd",
    "nuttconch.circuit.InitiatorEnd",
    "nuttconch.session.SwitchboardSession",
)


class ConchLogger(Logger):
    """Stands in for Conch's class-level ``_log`` on nuttconch's subclasses.

    Conch records every window adjust, EOF and channel close at debug or info; even when a
    filter discards them, building each event costs time on the packet path (a window
    adjust every few packets). Below ``warn`` they are dropped here unless the server's
    own config says ``level = debug``; warnings, errors and failures pass as usual.

    The choice is read from the object that logs (through its factory's config), not
    from a process-wide flag: two servers in one process (tests) may differ, and
    building a log observer changes nothing else.
    """

    _quiet = frozenset({LogLevel.debug, LogLevel.info})

    def __get__(self, instance: object, owner: type | None = None) -> Logger:
        if instance is None or not debug_wanted(instance):
            return self
        # A plain Logger bound to the instance: Conch's records all pass.
        return Logger(self.namespace, instance, observer=self.observer)

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level in self._quiet:
            return
        super().emit(level, format, **kwargs)


def debug_wanted(obj: object) -> bool:
    """Whether the config that ``obj`` (a factory, transport, service or channel) runs
    under asks for ``level = debug``; found through its factory, transport or conn."""
    for _ in range(4):
        config = getattr(obj, "config", None)
        if config is not None:
            return getattr(config, "level", "info") == "debug"
        nxt = getattr(obj, "factory", None) or getattr(obj, "transport", None)
        obj = nxt if nxt is not None else getattr(obj, "conn", None)
        if obj is None:
            return False
    return False


def conch_logger(owner: str) -> ConchLogger:
    return ConchLogger(namespace=owner)


def _cached_format_time() -> Callable[[float | None], str]:
    """Twisted's formatTime, computed once per second instead of once per line.

    Building a time-zone-aware datetime for every line was the largest single cost of
    the per-circuit log lines in the setup benchmark; the format has second resolution,
    so the text is the same.
    """
    last_second: list[int | None] = [None]
    last_text = ["-"]

    def format_time(when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != last_second[0]:
            last_second[0] = second
            last_text[0] = formatTime(second)
        return last_text[0]

    return format_time


def text_observer(stream: IO[str]) -> FileLogObserver:
    """Like twisted.logger.textFileLogObserver, with the cached timestamp."""
    format_time = _cached_format_time()
    return FileLogObserver(
        stream,
        lambda event: formatEventAsClassicLogText(event, formatTime=lambda when: format_time(when)),
    )


def make_observer(level: str = "info", fmt: str = "text", out: IO[str] | None = None) -> Any:
    """An observer for twistd: text or JSON on ``out`` (stdout), filtered by level."""
    stream = out or sys.stdout
    base: ILogObserver = jsonFileLogObserver(stream) if fmt == "json" else text_observer(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    if level != "debug":
        for namespace in QUIET_NAMESPACES:
            predicate.setLogLevelForNamespace(namespace, LogLevel.warn)
    return FilteringLogObserver(base, [predicate])
