"""The registry contract: one suite that every IRegistry implementation runs.

It checks the interface with ``verifyObject`` and behaviour only, through the
public methods and the records they return, never a private field; a second
registry (the cluster's) subclasses ``RegistryContract`` with its own
``makeRegistry`` and must pass the same tests.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from nuttconch.registry import (
    EPHEMERAL_PORTS,
    InMemoryRegistry,
    IRegistry,
    Listener,
    NotFound,
    PortInUse,
    Route,
)


class _FirstRng(random.Random):
    """A deterministic stand-in for SystemRandom: samples in population order."""

    def sample(self, population: Any, k: int, *, counts: Any = None) -> list[Any]:
        return list(population)[:k]


class RegistryContract:
    """Mixed into a TestCase; ``makeRegistry`` builds the implementation under test."""

    node = "local"

    def makeRegistry(self, rng: random.Random | None = None) -> Any:
        raise NotImplementedError

    # the helpers every test uses

    def setUp(self) -> None:
        self.registry = self.makeRegistry()
        self.events: list[tuple[str, str, int | None]] = []
        self.registry.observers.append(
            lambda event, listener, port: self.events.append((event, listener.hostname, port))
        )

    def listener(self, hostname: str, *aliases: str) -> Listener:
        return Listener(
            hostname, (f"{hostname}-abcdefg", *aliases), peer="192.0.2.1", opener=hostname
        )

    def assertEmpty(self) -> None:
        self.assertEqual(self.registry.listeners(), [])
        for name in ("one", "one-abcdefg", "two-abcdefg", "web", "db"):
            self.assertRaises(NotFound, self.registry.find, name)

    # the tests

    def test_provides(self) -> None:
        """The implementation provides IRegistry, with its node name."""
        verifyObject(IRegistry, self.registry)
        self.assertEqual(self.registry.node, self.node)

    def test_add_resolve_remove(self) -> None:
        """A port added under a listener's aliases resolves, case-insensitively, to a
        route holding what a circuit needs, until the port is removed."""
        one = self.listener("one", "web")
        self.assertEqual(self.registry.add_port(one, "localhost", 80), 80)
        expected = Route(one.id, self.node, "one-abcdefg", "one", "localhost")
        self.assertEqual(self.registry.resolve("web", 80), expected)
        self.assertEqual(self.registry.resolve("one-abcdefg", 80), expected)
        self.assertEqual(self.registry.resolve("WEB", 80), expected)
        self.assertTrue(self.registry.remove_port(one, 80))
        self.assertFalse(self.registry.remove_port(one, 80))
        self.assertRaises(NotFound, self.registry.resolve, "web", 80)
        self.assertEmpty()

    def test_listener_record(self) -> None:
        """The first port gives a listener an id, this node's name and an order; the id
        stays for the listener's lifetime, ids differ between listeners, and each new
        registration gets a higher order than the last."""
        one = self.listener("one", "web")
        two = self.listener("two", "web")
        self.registry.add_port(one, "", 80)
        first_id, first_order = one.id, one.order
        self.registry.add_port(two, "", 80)
        self.assertTrue(first_id)
        self.assertNotEqual(one.id, two.id)
        self.assertEqual((one.node, two.node), (self.node, self.node))
        self.assertGreater(two.order, one.order)
        self.registry.add_port(one, "", 81)
        self.assertEqual((one.id, one.order), (first_id, first_order))
        self.registry.remove_listener(one)
        self.registry.add_port(one, "", 82)
        self.assertEqual(one.id, first_id)
        self.assertGreater(one.order, two.order)
        self.assertEqual(self.registry.listeners(), [one, two])

    def test_hostname_alone_does_not_route(self) -> None:
        """The bare hostname is not a route unless it is also an alias."""
        one = self.listener("one")
        self.registry.add_port(one, "", 80)
        self.assertRaises(NotFound, self.registry.resolve, "one", 80)
        self.assertRaises(NotFound, self.registry.find, "one")

    def test_newest_first(self) -> None:
        """name and name~0 reach the newest holder, name~1 the one before; leaving moves
        them up."""
        old = self.listener("old", "web")
        new = self.listener("new", "web")
        self.registry.add_port(old, "", 80)
        self.registry.add_port(new, "", 80)
        self.assertEqual(self.registry.resolve("web", 80).listener_id, new.id)
        self.assertEqual(self.registry.resolve("web~0", 80).listener_id, new.id)
        self.assertEqual(self.registry.resolve("web~1", 80).listener_id, old.id)
        self.assertIs(self.registry.find("web~1"), old)
        self.assertEqual(self.registry.listeners(), [new, old])
        self.registry.remove_listener(new)
        self.assertEqual(self.registry.resolve("web", 80).listener_id, old.id)
        self.assertRaises(NotFound, self.registry.resolve, "web~1", 80)

    def test_not_found_messages(self) -> None:
        """Unknown names, indexes and ports each say what was not found, escaped."""
        one = self.listener("one", "web")
        two = self.listener("two", "web")
        self.registry.add_port(one, "", 80)
        self.registry.add_port(two, "", 80)
        exc = self.assertRaises(NotFound, self.registry.resolve, "nosuch", 80)
        self.assertEqual(str(exc), "no such listener: nosuch")
        exc = self.assertRaises(NotFound, self.registry.resolve, "web~2", 80)
        self.assertEqual(str(exc), "no such listener: web~2 (2 hold web)")
        exc = self.assertRaises(NotFound, self.registry.resolve, "web", 81)
        self.assertEqual(str(exc), "no such port: web has no port 81")
        exc = self.assertRaises(NotFound, self.registry.find, "web~2")
        self.assertEqual(str(exc), "no such listener: web~2 (2 hold web)")
        exc = self.assertRaises(NotFound, self.registry.resolve, "\x1b[2J", 80)
        self.assertNotIn("\x1b", str(exc))

    def test_port_zero_allocates(self) -> None:
        """Port 0 gets a free ephemeral port that the listener does not already hold."""
        one = self.listener("one", "web")
        seen = set()
        for _ in range(20):
            port = self.registry.add_port(one, "", 0)
            self.assertIn(port, EPHEMERAL_PORTS)
            self.assertNotIn(port, seen)
            seen.add(port)
        self.assertEqual(set(one.ports), seen)

    def test_port_zero_skips_held_ports(self) -> None:
        """Port 0 still finds a free port when the first candidates are all held."""
        registry = self.makeRegistry(rng=_FirstRng())
        one = self.listener("one", "web")
        for port in range(49152, 49152 + 64):
            registry.add_port(one, "", port)
        port = registry.add_port(one, "", 0)
        self.assertIn(port, EPHEMERAL_PORTS)
        self.assertEqual(len(one.ports), 65)

    def test_duplicate_port(self) -> None:
        """One listener asking twice for a port gets PortInUse; another may share it."""
        one = self.listener("one", "web")
        two = self.listener("two", "web")
        self.registry.add_port(one, "", 80)
        exc = self.assertRaises(PortInUse, self.registry.add_port, one, "", 80)
        self.assertEqual(str(exc), "port 80 is already forwarded on this connection")
        self.assertEqual(self.registry.add_port(two, "", 80), 80)

    def test_limit(self) -> None:
        """With a limit, a listener holding that many ports is refused another (port 0
        included), while a port it already holds is still refused as a duplicate."""
        one = self.listener("one", "web")
        self.registry.add_port(one, "", 80, limit=2)
        self.registry.add_port(one, "", 81, limit=2)
        exc = self.assertRaises(PortInUse, self.registry.add_port, one, "", 82, limit=2)
        self.assertEqual(str(exc), "more than 2 forwards")
        self.assertRaises(PortInUse, self.registry.add_port, one, "", 0, limit=2)
        exc = self.assertRaises(PortInUse, self.registry.add_port, one, "", 80, limit=2)
        self.assertEqual(str(exc), "port 80 is already forwarded on this connection")
        self.assertEqual(sorted(one.ports), [80, 81])

    def test_no_ports_not_resolvable(self) -> None:
        """A listener that holds no port has no registered name."""
        one = self.listener("one", "web")
        self.assertRaises(NotFound, self.registry.resolve, "web", 80)
        self.registry.add_port(one, "", 80)
        self.registry.remove_port(one, 80)
        self.assertRaises(NotFound, self.registry.resolve, "web", 80)
        self.assertEmpty()

    def test_observer_events(self) -> None:
        """Observers see up, port-added, port-removed and down, in that order."""
        one = self.listener("one", "web")
        self.registry.add_port(one, "", 80)
        self.registry.add_port(one, "", 81)
        self.registry.remove_port(one, 80)
        self.registry.remove_listener(one)
        self.assertEqual(
            self.events,
            [
                ("up", "one", None),
                ("port-added", "one", 80),
                ("port-added", "one", 81),
                ("port-removed", "one", 80),
                ("port-removed", "one", 81),
                ("down", "one", None),
            ],
        )

    def test_remove_listener_leaves_nothing(self) -> None:
        """After remove_listener no name, port or entry of it remains, and removing it
        again tells nobody."""
        one = self.listener("one", "web", "db")
        two = self.listener("two", "web")
        for port in (80, 81, 82):
            self.registry.add_port(one, "", port)
        self.registry.add_port(two, "", 80)
        self.registry.remove_listener(one)
        self.assertEqual(one.ports, {})
        self.assertRaises(NotFound, self.registry.find, "db")
        self.assertRaises(NotFound, self.registry.find, "one-abcdefg")
        self.assertIs(self.registry.find("web"), two)
        self.registry.remove_listener(two)
        self.assertEmpty()
        self.registry.remove_listener(two)
        self.assertEqual(
            [e for e in self.events if e[0] == "down"],
            [("down", "one", None), ("down", "two", None)],
        )


class InMemoryRegistryTests(RegistryContract, unittest.TestCase):
    """The contract, run against the embedded single-node registry."""

    def makeRegistry(self, rng: random.Random | None = None) -> Any:
        return InMemoryRegistry(rng=rng)


class NamedNodeRegistryTests(RegistryContract, unittest.TestCase):
    """The contract again with a node name given: records carry it."""

    node = "node-b"

    def makeRegistry(self, rng: random.Random | None = None) -> Any:
        return InMemoryRegistry(rng=rng, node=self.node)


class ListenerBytesTests(unittest.TestCase):
    """Per-listener totals follow the listener id a circuit keeps, not its name."""

    def test_closed_circuit_bytes_by_listener_id(self) -> None:
        """Bytes of a closed circuit count toward the listener whose id the circuit
        carried, even after a newer listener took over the same name."""
        from nuttconch import metrics

        registry = InMemoryRegistry()

        class Factory:
            transports: set[Any] = set()

        factory = Factory()
        factory.registry = registry  # type: ignore[attr-defined]
        m = metrics.Metrics(factory)
        factory.metrics = m  # type: ignore[attr-defined]
        old = Listener("old", ("old-abcdefg", "web"))
        registry.add_port(old, "", 80)
        route = registry.resolve("web", 80)
        m.observe(
            "circuit.open", {"circuit_id": 1, "target": "web:80", "listener_id": route.listener_id}
        )
        new = Listener("new", ("new-abcdefg", "web"))
        registry.add_port(new, "", 80)
        m.observe(
            "circuit.close", {"circuit_id": 1, "target": "web:80", "bytes_up": 3, "bytes_down": 4}
        )
        rows = {row["name"]: row for row in metrics.listener_rows(factory)}
        self.assertEqual(
            (rows["old-abcdefg"]["bytes_up"], rows["old-abcdefg"]["bytes_down"]), (3, 4)
        )
        self.assertEqual(
            (rows["new-abcdefg"]["bytes_up"], rows["new-abcdefg"]["bytes_down"]), (0, 0)
        )
