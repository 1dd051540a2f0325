# -*- test-case-name: tests.test_units -*-
"""Log output: human-readable or JSON lines, at a chosen level, Conch's chatter muted.

Conch logs every channel open and close at info and every packet detail
at debug; a switchboard relaying thousands of circuits would drown its own
one-line-per-event records in that, so Conch's namespaces are held at
``warn`` unless the operator asks for ``debug``.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
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


def make_observer(level: str = "info", fmt: str = "text", out: IO[str] | None = None) -> Any:
    """An observer for twistd: text or JSON on ``out`` (stdout), filtered by level."""
    stream = out or sys.stdout
    base: ILogObserver = (
        jsonFileLogObserver(stream) if fmt == "json" else textFileLogObserver(stream)
    )
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    if level != "debug":
        for namespace in QUIET_NAMESPACES:
            predicate.setLogLevelForNamespace(namespace, LogLevel.warn)
    return FilteringLogObserver(base, [predicate])
