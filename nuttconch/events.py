# -*- test-case-name: tests.test_ops -*-
"""Log lines for server events that protocol code does not log itself.

Connections, authentications, forwards added or cancelled, circuits opened,
closed or refused are logged where they happen; this observer adds the
initiator coming and going (with every name, the address and the key
fingerprint, and the ports it released) and penalties, so that each of
those is one structured event too. Values are the factory's event fields:
no key material or secret is ever among them.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from .names import escape

log = Logger()
# The namespace the factory's "event observer failed" line always had.
busLog = Logger(namespace="nuttconch.server")
# Released ports named in one "initiator down" line; the rest are counted.
MAX_PORTS_LISTED = 64


class EventBus:
    """Server events, for whoever subscribed: metrics, webhooks, log lines, tests.

    Made once by the composition (tap.py) and handed to the factory and to each
    subscriber, so that no subscriber needs the factory to hear of events. An
    observer is ``f(event: str, fields: dict)``; a failing one is logged and never
    reaches the protocol code that emitted the event.
    """

    def __init__(self) -> None:
        self.observers: list[Any] = []

    def subscribe(self, observer: Any) -> None:
        self.observers.append(observer)

    def emit(self, event: str, **fields: Any) -> None:
        for observer in list(self.observers):
            try:
                observer(event, fields)
            except Exception:
                busLog.failure("event observer failed on {event}", event=event)


class EventLog:
    def __init__(self) -> None:
        self.ports: dict[str, set[int]] = {}
        # A set held to MAX_PORTS_LISTED, plus a count: a connection that adds and cancels
        # ports in a loop while it holds another must not grow this by one entry per cycle.
        self.released: dict[str, set[int]] = {}
        self.releasedMore: dict[str, int] = {}

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event == "initiator.up":
            log.info(
                "initiator {name} up from {peer} (key {fingerprint}, names {aliases})",
                event="initiator.up",
                name=fields.get("name"),
                peer=fields.get("peer"),
                fingerprint=fields.get("fingerprint"),
                aliases=",".join(escape(a) for a in fields.get("aliases", ())),
            )
        elif event == "forward.add":
            self.ports.setdefault(str(fields.get("name")), set()).add(fields.get("port", 0))
        elif event == "forward.remove":
            name = str(fields.get("name"))
            self.ports.get(name, set()).discard(fields.get("port", 0))
            released = self.released.setdefault(name, set())
            port = fields.get("port", 0)
            if len(released) < MAX_PORTS_LISTED or port in released:
                released.add(port)
            else:
                self.releasedMore[name] = self.releasedMore.get(name, 0) + 1
        elif event == "initiator.down":
            name = str(fields.get("name"))
            ports = sorted(self.released.pop(name, set()))
            more = self.releasedMore.pop(name, 0)
            if not self.ports.get(name):
                self.ports.pop(name, None)
            log.info(
                "initiator {name} down from {peer} (key {fingerprint}); ports {ports} released",
                event="initiator.down",
                name=name,
                peer=fields.get("peer"),
                fingerprint=fields.get("fingerprint"),
                ports=_port_list(ports, more),
            )


def _port_list(ports: list[int], more: int) -> str:
    """Ports for one log line: at most MAX_PORTS_LISTED, then how many more releases."""
    if not ports:
        return "none"
    text = ",".join(str(p) for p in ports)
    if more:
        text += f" and {more} more"
    return text


def attach(bus: Any) -> EventLog:
    """Log lines for ``bus``'s events (an EventBus, or anything with ``observers``)."""
    observer = EventLog()
    bus.observers.append(observer)
    return observer
