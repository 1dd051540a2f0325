# -*- test-case-name: tests.test_ops -*-
"""Prometheus metrics and live snapshots of initiators and circuits.

Counters (outcomes, authentications, latency) are fed by the factory's
event observers; gauges and byte totals are read from the live server
state when scraped, so a running circuit's bytes move between scrapes.
Everything is registered in a per-server ``CollectorRegistry`` (never the
process-global one), so several servers in one process stay apart.

The same snapshots (`listener_rows`, `circuit_rows`) feed the status page,
its JSON API and the ``listeners --json`` / ``circuits --json`` commands.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.logger import Logger

from .access import authenticated

log = Logger()

OUTCOMES = ("ok", "no_such_name", "refused", "initiator_refused", "timeout")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def live_circuits(factory: Any) -> Iterator[Any]:
    """Every open circuit, from the client connections that hold them."""
    for transport in list(factory.transports):
        conn = getattr(transport, "service", None)
        yield from list(getattr(conn, "circuits", ()))


def _circuit_listener(circuit: Any) -> str:
    """The registry id of the listener a circuit reaches ("" if unknown)."""
    return str(getattr(circuit, "listener_id", "") or "")


def _circuit_client_name(circuit: Any) -> str:
    end = getattr(circuit, "client", None)
    avatar = getattr(end, "avatar", None)
    identity = getattr(avatar, "identity", None)
    return getattr(identity, "hostname", "") or ""


def connection_states(factory: Any) -> dict[str, int]:
    """Connections by state: still authenticating, or authenticated."""
    states = {"unauthenticated": 0, "authenticated": 0}
    for transport in list(factory.transports):
        states["authenticated" if authenticated(transport) else "unauthenticated"] += 1
    return states


def penalties_in_force(factory: Any) -> int:
    """Sources currently refused for misbehaviour, if the server keeps penalties."""
    for holder in (factory, getattr(factory, "limits", None)):
        penalties = getattr(holder, "penalties", None)
        in_force = getattr(penalties, "in_force", None)
        if callable(in_force):
            try:
                return int(in_force())
            except Exception:
                return 0
    return 0


class Metrics:
    """The server's metrics; attach once per factory with `attach`."""

    def __init__(self, factory: Any, per_name_labels: bool = False) -> None:
        self.factory = factory
        self.per_name = per_name_labels
        self.started = time.time()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.circuits = Counter(
            "nuttconch_circuits_opened",
            "Circuit open attempts by outcome",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.circuits.labels(outcome)
        self.latency = Histogram(
            "nuttconch_circuit_setup_seconds",
            "Time from a client's channel open to the initiator's acceptance",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.auth = Counter(
            "nuttconch_authentications",
            "Authentication results by reason",
            ["result", "reason"],
            registry=r,
        )
        self.auth.labels("ok", "key")
        self.auth.labels("ok", "new_key")
        self.keys_added = Counter(
            "nuttconch_keys_added", "Keys added to authorized_keys on first use", registry=r
        )
        self.penalties = Counter(
            "nuttconch_penalties_imposed", "Penalties that started to apply to a source", registry=r
        )
        self.connections = Counter(
            "nuttconch_connections_accepted", "TCP connections accepted", registry=r
        )
        self.by_name: Counter | None = None
        if per_name_labels:
            self.by_name = Counter(
                "nuttconch_name_circuits_opened",
                "Circuits opened per initiator connect name",
                ["name"],
                registry=r,
            )
        # Bytes of circuits that have closed; live circuits are added at scrape time.
        self.closed_bytes = {"up": 0, "down": 0}
        self.closed_by_name: dict[str, list[int]] = {}
        # Bytes of closed circuits per initiator connection (for the status page).
        # Keyed by the registry's listener id; ids of listeners gone are pruned as it grows.
        self.listener_bytes: dict[str, list[int]] = {}
        # Above this many entries, look for gone listeners (twice the live ones at the
        # last look, plus 64): reading the registry is not done on every circuit close.
        self._pruneAbove = 64
        self._open: dict[int, str] = {}
        r.register(_LiveCollector(self))

    # events

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        handler = getattr(self, "_on_" + event.replace(".", "_"), None)
        if handler is not None:
            handler(fields)
        elif event.startswith("penalty"):
            self.penalties.inc()

    def _on_connection_open(self, fields: dict[str, Any]) -> None:
        self.connections.inc()

    def _on_auth_ok(self, fields: dict[str, Any]) -> None:
        self.auth.labels("ok", "new_key" if fields.get("new_key") else "key").inc()

    def _on_auth_fail(self, fields: dict[str, Any]) -> None:
        self.auth.labels("fail", str(fields.get("reason", "failed"))[:40]).inc()

    def _on_key_added(self, fields: dict[str, Any]) -> None:
        self.keys_added.inc()

    def _on_circuit_open(self, fields: dict[str, Any]) -> None:
        self.circuits.labels("ok").inc()
        self.latency.observe(max(0.0, float(fields.get("latency", 0.0))))
        if self.by_name is not None:
            self.by_name.labels(str(fields.get("target", "")).rpartition(":")[0]).inc()
        # Remember which initiator connection carries it, for per-initiator bytes.
        listener_id = fields.get("listener_id")
        if listener_id:
            self._open[fields.get("circuit_id", 0)] = str(listener_id)

    def _on_circuit_close(self, fields: dict[str, Any]) -> None:
        up, down = int(fields.get("bytes_up", 0)), int(fields.get("bytes_down", 0))
        self.closed_bytes["up"] += up
        self.closed_bytes["down"] += down
        if self.per_name:
            name = str(fields.get("target", "")).rpartition(":")[0]
            totals = self.closed_by_name.setdefault(name, [0, 0])
            totals[0] += up
            totals[1] += down
        listener_id = self._open.pop(fields.get("circuit_id", 0), None)
        if listener_id is not None:
            totals = self.listener_bytes.setdefault(listener_id, [0, 0])
            totals[0] += up
            totals[1] += down
            self._prune()

    def _prune(self) -> None:
        """Forget the totals of listeners that have left, once they outnumber the live."""
        if len(self.listener_bytes) <= self._pruneAbove:
            return
        listeners = self.factory.registry.listeners()
        self._pruneAbove = 2 * len(listeners) + 64
        if len(self.listener_bytes) > self._pruneAbove:
            live = {listener.id for listener in listeners}
            self.listener_bytes = {k: v for k, v in self.listener_bytes.items() if k in live}

    def _on_circuit_fail(self, fields: dict[str, Any]) -> None:
        outcome = fields.get("outcome", "refused")
        self.circuits.labels(outcome if outcome in OUTCOMES else "refused").inc()

    # totals for the stats command

    def counter_value(self, counter: Counter, *labels: str) -> int:
        child = counter.labels(*labels) if labels else counter
        return int(child._value.get())

    def totals(self) -> dict[str, Any]:
        auth: dict[str, int] = {}
        for metric in self.auth.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    key = f"{sample.labels['result']}:{sample.labels['reason']}"
                    auth[key] = int(sample.value)
        up, down = self.closed_bytes["up"], self.closed_bytes["down"]
        for circuit in live_circuits(self.factory):
            up += circuit.bytes_up
            down += circuit.bytes_down
        return {
            "circuits_opened": {o: self.counter_value(self.circuits, o) for o in OUTCOMES},
            "bytes": {"up": up, "down": down},
            "authentications": auth,
            "keys_added": self.counter_value(self.keys_added),
            "connections_accepted": self.counter_value(self.connections),
        }


class _LiveCollector(Collector):
    """Gauges and byte counters read from the live server at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        factory = self.m.factory
        states = GaugeMetricFamily(
            "nuttconch_connections", "Open SSH connections by state", labels=["state"]
        )
        for state, count in connection_states(factory).items():
            states.add_metric([state], count)
        yield states
        registry = factory.registry
        # In a cluster each node counts its own; the cluster's state has gauges of its own.
        local = getattr(registry, "local_listeners", None)
        listeners = local() if local is not None else registry.listeners()
        cluster = getattr(registry, "cluster_state", None)
        if cluster is not None:
            yield from cluster_gauges(cluster())
        yield GaugeMetricFamily(
            "nuttconch_initiators",
            "Authenticated initiators holding at least one virtual port",
            value=len(listeners),
        )
        yield GaugeMetricFamily(
            "nuttconch_virtual_ports",
            "Virtual ports held by all initiators",
            value=sum(len(x.ports) for x in listeners),
        )
        circuits = list(live_circuits(factory))
        yield GaugeMetricFamily("nuttconch_circuits_open", "Open circuits", value=len(circuits))
        up, down = self.m.closed_bytes["up"], self.m.closed_bytes["down"]
        for circuit in circuits:
            up += circuit.bytes_up
            down += circuit.bytes_down
        moved = CounterMetricFamily(
            "nuttconch_circuit_bytes",
            "Bytes relayed by circuits; up is client to initiator",
            labels=["direction"],
        )
        moved.add_metric(["up"], up)
        moved.add_metric(["down"], down)
        yield moved
        yield GaugeMetricFamily(
            "nuttconch_penalties_in_force",
            "Source addresses currently refused for misbehaviour",
            value=penalties_in_force(factory),
        )
        yield GaugeMetricFamily(
            "nuttconch_uptime_seconds", "Seconds since start", value=time.time() - self.m.started
        )
        if self.m.per_name:
            ports = GaugeMetricFamily(
                "nuttconch_name_virtual_ports", "Virtual ports per connect name", labels=["name"]
            )
            for listener in listeners:
                ports.add_metric([listener.connect_name], len(listener.ports))
            yield ports
            by_name: dict[str, list[int]] = {k: list(v) for k, v in self.m.closed_by_name.items()}
            for circuit in circuits:
                name = circuit.target.rpartition(":")[0]
                totals = by_name.setdefault(name, [0, 0])
                totals[0] += circuit.bytes_up
                totals[1] += circuit.bytes_down
            named = CounterMetricFamily(
                "nuttconch_name_circuit_bytes",
                "Bytes relayed per connect name; up is client to initiator",
                labels=["name", "direction"],
            )
            for name, (u, d) in sorted(by_name.items()):
                named.add_metric([name, "up"], u)
                named.add_metric([name, "down"], d)
            yield named


# Snapshots for the status page, the JSON API and the --json commands.


def listener_rows(factory: Any, page: Any = None) -> list[dict[str, Any]]:
    """Connected initiators, newest first, with bytes through their circuits.

    ``page`` (paging.Page) picks the rows before any is built: a fleet's full list
    is too big to build on every request."""
    metrics = getattr(factory, "metrics", None)
    live: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    for circuit in live_circuits(factory):
        listener_id = _circuit_listener(circuit)
        if not listener_id:
            continue
        totals = live.setdefault(listener_id, [0, 0])
        totals[0] += circuit.bytes_up
        totals[1] += circuit.bytes_down
        counts[listener_id] = counts.get(listener_id, 0) + 1
    rows = []
    everyone = factory.registry.listeners()
    for listener in page.slice(everyone) if page is not None else everyone:
        closed = metrics.listener_bytes.get(listener.id, [0, 0]) if metrics else [0, 0]
        now_live = live.get(listener.id, [0, 0])
        rows.append(
            {
                "name": listener.connect_name,
                "node": listener.node,
                "hostname": listener.hostname,
                "aliases": list(listener.aliases[1:]),
                "address": listener.peer,
                "fingerprint": listener.fingerprint,
                "ports": sorted(listener.ports),
                "connected_since": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(listener.connected_since)
                ),
                "connected_seconds": round(time.time() - listener.connected_since, 1),
                "circuits": counts.get(listener.id, 0),
                "bytes_up": closed[0] + now_live[0],
                "bytes_down": closed[1] + now_live[1],
            }
        )
    return rows


def circuit_rows(factory: Any, page: Any = None) -> list[dict[str, Any]]:
    """Open circuits, oldest first (``page``: only those rows)."""
    now = time.monotonic()
    rows = []
    ordered = sorted(live_circuits(factory), key=lambda c: c.started)
    for circuit in page.slice(ordered) if page is not None else ordered:
        rows.append(
            {
                "id": circuit.id,
                "target": circuit.target,
                "client": circuit.client_peer,
                "client_name": _circuit_client_name(circuit),
                "age_seconds": round(now - circuit.started, 1),
                "bytes_up": circuit.bytes_up,
                "bytes_down": circuit.bytes_down,
            }
        )
    return rows


def cluster_gauges(state: dict[str, Any]) -> Iterator[Any]:
    """Redis reachable, this node healthy, replication lag, peers: for alerting on a fleet."""
    yield GaugeMetricFamily(
        "nuttconch_cluster_redis_up",
        "1 while this node reaches the cluster's Redis",
        value=1 if state["redis_reachable"] else 0,
    )
    yield GaugeMetricFamily(
        "nuttconch_cluster_healthy",
        "1 while this node holds its lease and its replica is current; 0: degraded",
        value=1 if state["state"] == "ok" else 0,
    )
    yield GaugeMetricFamily(
        "nuttconch_cluster_replication_lag_seconds",
        "Age of the last registry change when this node's replica applied it",
        value=state["replication_lag_seconds"],
    )
    yield GaugeMetricFamily(
        "nuttconch_cluster_peers",
        "Other nodes holding registrations, as this node's replica sees them",
        value=len(state["peers"]),
    )
    yield GaugeMetricFamily(
        "nuttconch_cluster_initiators",
        "Initiators on every node of the cluster",
        value=state["initiators_cluster"],
    )
