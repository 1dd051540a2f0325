# -*- test-case-name: tests.test_ops -*-
"""Webhooks: POST a JSON body for initiator up/down and circuit open/close, with treq.

The factory's event observer only appends to a bounded queue and schedules
a send on the next reactor turn, so a slow or dead receiver never delays a
circuit: when the queue is full, new events are dropped and counted. One
request is in flight at a time, so the receiver sees events in order; a
failed request (connection error, timeout, HTTP 5xx or 429) is retried with
exponential backoff, up to ``[events] retries`` times, then dropped. Other
4xx answers are not retried.

Body: ``{"event": "...", "time": "<UTC ISO 8601>", "seq": N, "server": "<server_fqdn>",
...the event's fields}``.
"""

from __future__ import annotations

import collections
import itertools
import json
import time
from typing import Any
from urllib.parse import urlsplit

import treq
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet import reactor as default_reactor
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

log = Logger()

EVENTS = frozenset({"initiator.up", "initiator.down", "circuit.open", "circuit.close"})
# Event fields for the server's own observers (metrics), not part of the webhook body.
INTERNAL_FIELDS = frozenset({"listener_id"})
MAX_BACKOFF = 300.0
USER_AGENT = b"nuttconch-webhooks/0.1"


def safe_url(url: str) -> str:
    """The URL without credentials, path or query (which may hold a token), for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..."


class Webhooks(Service):
    """A bounded, ordered, retrying webhook sender; subscribe `observe` to the factory."""

    name = "webhooks"

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = 1000,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: float = 1.0,
        server: str = "",
        reactor: Any = None,
        client: Any = None,
    ) -> None:
        self.url = url
        self.queue_size = queue_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.server = server
        self.reactor = reactor or default_reactor
        self._pool: HTTPConnectionPool | None = None
        if client is None:
            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._pool.maxPersistentPerHost = 1
            client = treq.client.HTTPClient(Agent(self.reactor, pool=self._pool))
        self.client = client
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self._seq = itertools.count(1)
        self._busy = False
        self._wakeup: Any = None
        self._attempt = 0
        self._inflight: defer.Deferred[Any] | None = None
        self.counts = {"sent": 0, "dropped": 0, "failed": 0, "retried": 0}
        self._warnedFull = False

    # the observer: cheap, never raises into the protocol

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        if event not in EVENTS:
            return
        if len(self.queue) >= self.queue_size:
            self.counts["dropped"] += 1
            if not self._warnedFull:
                self._warnedFull = True
                log.warn(
                    "webhook queue full ({size} events) for {url}; dropping new events",
                    size=self.queue_size,
                    url=safe_url(self.url),
                )
            return
        self._warnedFull = False
        body = {
            "event": event,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seq": next(self._seq),
            "server": self.server,
        }
        for key, value in fields.items():
            if key not in INTERNAL_FIELDS:
                body.setdefault(key, value)
        self.queue.append(body)
        self._schedule(0)

    def stats(self) -> dict[str, int]:
        return {**self.counts, "queued": len(self.queue)}

    # the sender

    def _schedule(self, delay: float) -> None:
        if self._busy or self._wakeup is not None or not self.running:
            return
        self._wakeup = self.reactor.callLater(delay, self._send)

    def _send(self) -> None:
        self._wakeup = None
        if self._busy or not self.queue or not self.running:
            return
        self._busy = True
        body = json.dumps(self.queue[0], default=str, sort_keys=True).encode("utf-8")
        d = self.client.post(
            self.url,
            data=body,
            headers={b"content-type": [b"application/json"], b"user-agent": [USER_AGENT]},
            timeout=self.timeout,
        )
        d.addCallback(self._answered)
        self._inflight = d
        d.addCallbacks(self._succeeded, self._failed)
        d.addErrback(lambda f: log.failure("webhook sender failed", failure=f))

    @defer.inlineCallbacks
    def _answered(self, response: Any) -> Any:
        yield treq.content(response)  # read the body so the connection can be reused
        code = response.code
        if 200 <= code < 300:
            return True
        if code == 429 or code >= 500:
            raise RuntimeError(f"HTTP {code}")
        return code  # a permanent refusal: do not retry

    def _succeeded(self, outcome: Any) -> None:
        self._inflight = None
        self._busy = False
        event = self.queue.popleft() if self.queue else {}
        self._attempt = 0
        if outcome is True:
            self.counts["sent"] += 1
        else:
            self.counts["failed"] += 1
            log.warn(
                "webhook {event} refused by {url} with HTTP {code}; not retried",
                event=event.get("event"),
                url=safe_url(self.url),
                code=outcome,
            )
        self._schedule(0)

    def _failed(self, failure: Any) -> None:
        self._inflight = None
        self._busy = False
        if not self.running:
            return
        self._attempt += 1
        why = failure.getErrorMessage() or type(failure.value).__name__
        if self._attempt > self.retries:
            event = self.queue.popleft() if self.queue else {}
            self._attempt = 0
            self.counts["failed"] += 1
            log.warn(
                "webhook {event} to {url} failed ({why}); dropped after {n} retries",
                event=event.get("event"),
                url=safe_url(self.url),
                why=why,
                n=self.retries,
            )
            self._schedule(0)
            return
        self.counts["retried"] += 1
        delay = min(MAX_BACKOFF, self.backoff * 2 ** (self._attempt - 1))
        log.info(
            "webhook to {url} failed ({why}); retry {n} in {delay}s",
            url=safe_url(self.url),
            why=why,
            n=self._attempt,
            delay=delay,
        )
        self._schedule(delay)

    # service

    def startService(self) -> None:
        super().startService()
        log.info("webhooks: posting events to {url}", url=safe_url(self.url))
        self._schedule(0)

    def stopService(self) -> Any:
        super().stopService()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        if self._inflight is not None:
            self._inflight.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None
