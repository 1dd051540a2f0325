"""The shared registry on a real redis-server: replication, order, leases, faults.

Several nodes run in this process as separate RedisRegistry services (each
with its own Redis connections), and one as a subprocess where a real
SIGKILL is needed.  Every wait is on a replica's state, never a fixed sleep.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet import defer, reactor
from twisted.protocols import portforward
from twisted.trial import unittest

from nuttconch import config as configmod
from nuttconch.cluster.keysync import key_lines
from nuttconch.cluster.redisclient import RedisClient, RedisUnavailable
from nuttconch.cluster.registry import RedisRegistry, identity_of
from nuttconch.registry import Listener, NotFound
from nuttconch.tap import KEYS_POLL_SECONDS, build

from .harness import SwitchboardTestMixin
from .redisserver import RedisServer, wait_until
from .test_admin import key_fingerprint
from .test_registry import RegistryContract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEASE = 2.0


def listener(hostname: str, *aliases: str) -> Listener:
    return Listener(hostname, (f"{hostname}-abcdefg", *aliases), peer="192.0.2.1")


def holder(registry: RedisRegistry, target: str, port: int = 22) -> str:
    """The hostname ``target`` resolves to on ``registry``'s node."""
    return registry.find(target).hostname


def order_of(registry: RedisRegistry, name: str) -> list[str]:
    return [x.hostname for x in registry.listeners() if name in x.aliases]


class ClusterCase(unittest.TestCase):
    """A redis-server and helpers to start nodes against it."""

    persistent = False
    timeout = 120

    def setUp(self) -> None:
        self.redis = RedisServer(os.path.abspath(self.mktemp()), persistent=self.persistent)
        self.redis.start()
        self.addCleanup(self.redis.kill)
        self.nodes: list[RedisRegistry] = []

    def node(self, name: str, url: str | None = None, lease: float = LEASE) -> RedisRegistry:
        registry = RedisRegistry(url or self.redis.url, name, lease=lease, timeout=1.0)
        registry.startService()
        self.nodes.append(registry)
        self.addCleanup(self._stop, registry)
        return registry

    def _stop(self, registry: RedisRegistry) -> Any:
        if registry.running:
            return registry.stopService()
        return None

    def synced(self, *nodes: RedisRegistry) -> defer.Deferred[Any]:
        """Every node healthy and holding every node's listeners with their final order."""

        def check() -> bool:
            if not all(n.healthy for n in nodes):
                return False

            def rows(entries: list[Listener]) -> list[tuple[str, int, list[int]]]:
                return sorted((x.id, x.order, sorted(x.ports)) for x in entries)

            want = rows([x for n in nodes for x in n.local_listeners()])
            if any(getattr(x, "seq", 0) != x.order for n in nodes for x in n.local_listeners()):
                return False
            return all(rows(n.listeners()) == want for n in nodes)

        def explain() -> str:
            return "; ".join(
                f"{n.node}: healthy={n.healthy} cause={n.cause!r}"
                f" local={[(x.hostname, x.order, x.seq) for x in n.local_listeners()]}"
                f" all={[(x.hostname, x.order) for x in n.listeners()]}"
                for n in nodes
            )

        return wait_until(check, 10, "the replicas to agree", explain)


class ConfigTests(unittest.TestCase):
    """[cluster] keys: accepted values and the one-line errors for bad ones."""

    GOOD = [
        ("redis_url", "", ""),
        ("redis_url", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis_url", "redis://:s3cret@redis.internal", "redis://:s3cret@redis.internal"),
        ("redis_url", "unix:/run/redis/redis.sock?db=2", "unix:/run/redis/redis.sock?db=2"),
        ("node_name", "", ""),
        ("node_name", "edge-1_a", "edge-1_a"),
        ("lease_time", "5", 5.0),
        ("lease_time", "1m", 60.0),
        ("redis_timeout", "0.5", 0.5),
        ("relay_listen", "7000", "tcp:7000:interface=127.0.0.1"),
        ("relay_address", "10.0.0.2:7000", "tcp:10.0.0.2:7000"),
        ("relay_address", "unix:/run/nuttconch/relay.sock", "unix:/run/nuttconch/relay.sock"),
    ]
    BAD = [
        ("redis_url", "http://x", "expected redis://host:port/db or unix:/path/to/redis.sock"),
        ("redis_url", "redis://", "redis:// needs a host"),
        ("redis_url", "redis://h/db", "the database after the host is a number"),
        ("redis_url", "unix:relative.sock", "unix: needs an absolute socket path"),
        ("node_name", "a b", "expected up to 63 letters, digits, - or _"),
        ("node_name", "x" * 64, "expected up to 63 letters, digits, - or _"),
        ("lease_time", "0.5", "expected a time from 1 to 60 seconds"),
        ("lease_time", "2h", "expected a time from 1 to 60 seconds"),
        ("redis_timeout", "soon", "expected a time such as 30"),
        ("relay_address", "nowhere", "expected host:port or a Twisted client endpoint"),
        ("relay_address", "h:70000", "expected a port from 1 to 65535"),
    ]

    def load(self, key: str, value: str) -> configmod.Config:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(f"[cluster]\n{key} = {value}\n")
        return configmod.load(path)

    def test_good_values(self) -> None:
        """Each accepted spelling loads to the value the registry is built with."""
        for key, text, want in self.GOOD:
            self.assertEqual(self.load(key, text).values[key], want, (key, text))

    def test_bad_values(self) -> None:
        """Each bad value stops start-up with one line naming the key and the problem."""
        for key, text, message in self.BAD:
            exc = self.assertRaises(configmod.ConfigError, self.load, key, text)
            self.assertIn(f"[cluster] {key} = ", str(exc), (key, text))
            self.assertIn(message, str(exc), (key, text))
            self.assertNotIn("\n", str(exc))

    def test_empty_url_keeps_the_in_memory_registry(self) -> None:
        """Without redis_url nothing changes: a single node with the embedded registry."""
        from nuttconch.registry import InMemoryRegistry
        from nuttconch.tap import make_registry

        self.assertIsInstance(make_registry(self.load("node_name", "a")), InMemoryRegistry)
        made = make_registry(self.load("redis_url", "redis://127.0.0.1:1/0"))
        self.assertIsInstance(made, RedisRegistry)


class RedisRegistryContractTests(RegistryContract, ClusterCase):
    """The registry contract suite, run against a RedisRegistry on a real redis-server."""

    node = "contract"

    def makeRegistry(self, rng: Any = None) -> Any:
        registry = RedisRegistry(self.redis.url, self.node, lease=LEASE, timeout=1.0, rng=rng)
        registry.startService()
        self.addCleanup(self._stop, registry)
        return registry

    def setUp(self) -> Any:  # type: ignore[override]
        ClusterCase.setUp(self)
        RegistryContract.setUp(self)
        # After each test Redis holds what the registry holds (cleanups run last first).
        self.addCleanup(lambda: self.synced(self.registry))
        # Messages are those of a current replica: wait for it, then run the suite.
        return wait_until(lambda: self.registry.healthy, 10, "the registry to join")


class ReplicationTests(ClusterCase):
    @defer.inlineCallbacks
    def test_registration_reaches_other_nodes(self) -> Any:
        """A port added on one node resolves on another; removing it removes it there."""
        a, b = self.node("a"), self.node("b")
        yield self.synced(a, b)
        seen_by_b: list[str] = []
        b.observers.append(lambda event, who, port: seen_by_b.append(event))
        one = listener("one", "web")
        started = time.perf_counter()
        a.add_port(one, "localhost", 22)
        seen = yield wait_until(lambda: b.listeners(), 5, "b to see one")
        lag_ms = (time.perf_counter() - started) * 1000
        self.assertEqual([x.hostname for x in seen], ["one"])
        route = b.resolve("web", 22)
        self.assertEqual((route.listener_id, route.node, route.name, route.bind_host),
                         (one.id, "a", "one-abcdefg", "localhost"))  # fmt: skip
        self.assertEqual(b.find("web").peer, "192.0.2.1")
        # Only the owner tells its observers (webhooks, gauges): once per event in the cluster.
        a.add_port(one, "localhost", 80)
        yield wait_until(lambda: b.resolve("web", 80), 5, "port 80 on b")
        a.remove_listener(one)
        yield wait_until(lambda: not b.listeners(), 5, "b to drop one")
        self.assertRaises(NotFound, b.resolve, "web", 22)
        # Webhooks and gauges observe the registry: only the owner saw these events.
        self.assertEqual(seen_by_b, [])
        print(f"\nreplication to another node: {lag_ms:.2f} ms")

    @defer.inlineCallbacks
    def test_newest_holder_across_three_nodes(self) -> Any:
        """name~N is the same holder on every node: the global order is taken in Redis."""
        nodes = [self.node(n) for n in ("a", "b", "c")]
        yield self.synced(*nodes)
        for i, n in enumerate([0, 1, 2, 0, 1]):
            nodes[n].add_port(listener(f"h{i}", "web"), "", 22)
            yield self.synced(*nodes)
        for registry in nodes:
            self.assertEqual([holder(registry, f"web~{k}") for k in range(5)],
                             ["h4", "h3", "h2", "h1", "h0"])  # fmt: skip
            exc = self.assertRaises(NotFound, registry.resolve, "web~5", 22)
            self.assertEqual(str(exc), "no such listener: web~5 (5 hold web)")

    @defer.inlineCallbacks
    def test_one_order_value_per_registration(self) -> Any:
        """Quick port changes while a write is in flight keep one order value, last state wins."""
        a, b = self.node("a"), self.node("b")
        yield self.synced(a, b)
        one = listener("one", "web")
        for port in range(1000, 1010):
            a.add_port(one, "", port)
        a.remove_port(one, 1000)
        yield self.synced(a, b)
        self.assertEqual(sorted(b.find("web").ports), list(range(1001, 1010)))
        self.assertEqual(int(self.redis.cli("GET", "nuttconch:seq")), 1)

    @defer.inlineCallbacks
    def test_readded_while_writing_gets_a_new_order(self) -> Any:
        """A listener removed and added again while its first write is in flight is the
        newest holder everywhere afterwards, not back in the place of its first write."""
        a, b = self.node("a"), self.node("b")
        yield self.synced(a, b)
        x, y = listener("x", "web"), listener("y", "web")
        a.add_port(x, "", 22)  # its write is in flight: it will get the older order value
        a.add_port(y, "", 22)
        a.remove_listener(x)
        a.add_port(x, "", 22)  # a new registration: newer than y
        self.assertEqual(order_of(a, "web"), ["x", "y"])
        yield self.synced(a, b)
        self.assertEqual(order_of(a, "web"), ["x", "y"])
        self.assertEqual(order_of(b, "web"), ["x", "y"])

    @defer.inlineCallbacks
    def test_replica_behind_the_trim_takes_a_new_snapshot(self) -> Any:
        """A replica that fell further behind than the log keeps notices the trim and takes
        a new snapshot, instead of missing the trimmed changes for good."""
        from nuttconch.cluster import registry as registrymod

        self.patch(registrymod, "LOG_MAXLEN", 5)
        self.redis.cli("CONFIG", "SET", "stream-node-max-entries", "1")  # exact-ish trims
        a, b = self.node("a"), self.node("b")
        yield self.synced(a, b)
        # b's log reader stalls (a long GC pause, a saturated core) ...
        stalled: defer.Deferred[Any] = defer.Deferred()
        real = b.redis.blocking
        calls = []

        def blocking(*args: Any) -> Any:
            calls.append(args)
            return stalled if len(calls) == 1 else real(*args)

        self.patch(b.redis, "blocking", blocking)
        yield wait_until(lambda: calls, 5, "b's reader to wait on the stalled read")
        # ... while a registers more than the log keeps.
        for i in range(20):
            a.add_port(listener(f"h{i}", "web"), "", 22)
        yield wait_until(lambda: all(x.seq for x in a.local_listeners()), 5, "a's writes")
        self.assertLessEqual(int(self.redis.cli("XLEN", "nuttconch:log")), 10)
        stalled.callback(None)  # the read ends empty, as a BLOCK that timed out does
        yield self.synced(a, b)
        self.assertEqual(len(order_of(b, "web")), 20)

    @defer.inlineCallbacks
    def test_graceful_stop_removes_at_once(self) -> Any:
        """A node that stops leaves: the others drop its names without waiting for the lease."""
        a, b = self.node("a", lease=30), self.node("b", lease=30)
        yield self.synced(a, b)
        a.add_port(listener("one", "web"), "", 22)
        yield self.synced(a, b)
        started = time.perf_counter()
        yield a.stopService()
        yield wait_until(lambda: not b.listeners(), 2, "b to drop a's names")
        took_ms = (time.perf_counter() - started) * 1000
        print(f"\ngraceful stop to names gone elsewhere: {took_ms:.1f} ms")


class IdentityTests(ClusterCase):
    """Nodes must share the alias secret and host keys; a node that differs stays out."""

    SECRET = b"s" * 32

    def keys(self) -> dict[bytes, Any]:
        from twisted.conch.ssh.keys import Key

        from tests.harness import host_key_dir

        with open(os.path.join(host_key_dir(), "ssh_host_ed25519_key"), "rb") as handle:
            key = Key.fromString(handle.read())
        return {key.sshType(): key}

    def identified(self, name: str, secret: bytes, host_keys: dict[bytes, Any]) -> RedisRegistry:
        registry = RedisRegistry(self.redis.url, name, lease=LEASE, timeout=1.0)
        registry.identity = identity_of(secret, host_keys)
        registry.startService()
        self.addCleanup(self._stop, registry)
        return registry

    @defer.inlineCallbacks
    def test_mismatch_refused_without_the_secret_in_redis(self) -> Any:
        """A node with another alias secret or host keys does not join, and says why."""
        keys = self.keys()
        a = self.identified("a", self.SECRET, keys)
        yield self.synced(a)
        a.add_port(listener("one", "web"), "", 22)
        cases = [
            ("b", b"t" * 32, keys, ["alias secret"]),
            ("c", self.SECRET, {}, ["host keys"]),
            ("d", b"t" * 32, {}, ["alias secret", "host keys"]),
        ]
        for name, secret, host_keys, differ in cases:
            other = self.identified(name, secret, host_keys)
            yield wait_until(lambda other=other: other.refused, 10, f"{name} to refuse")
            for what in differ:
                self.assertIn(what, other.refused)
            self.assertIn("not joining", other.cause)
            self.assertFalse(other.healthy)
            mine = listener(f"on-{name}", "web")
            other.add_port(mine, "", 22)
            # It serves its own, and the cluster never sees it.
            self.assertIs(other.find("web"), mine)
            yield self.synced(a)
            self.assertEqual(order_of(a, "web"), ["one"])
            self.assertNotIn(name, self.redis.cli("ZRANGE", "nuttconch:nodes", "0", "-1"))
        stored = self.redis.cli("HGETALL", "nuttconch:identity")
        self.assertNotIn(self.SECRET.decode(), stored)
        self.assertNotIn(self.SECRET.hex(), stored)
        # Same files: joins.
        e = self.identified("e", self.SECRET, keys)
        yield self.synced(a, e)
        self.assertEqual(e.refused, "")


class SameNameTests(ClusterCase):
    @defer.inlineCallbacks
    def test_second_process_with_the_same_node_name_stays_out(self) -> Any:
        """Two processes named alike would overwrite each other's names: the second waits
        for the first's lease, saying why, and joins once the first has left."""
        first = self.node("a")
        mine = listener("one", "web")
        first.add_port(mine, "", 22)
        yield self.synced(first)
        second = self.node("a")
        yield wait_until(lambda: "another process holds the lease" in second.cause, 10, "refusal")
        self.assertFalse(second.healthy)
        self.assertTrue(first.healthy)
        b = self.node("b")
        yield self.synced(first, b)
        self.assertEqual(order_of(b, "web"), ["one"])
        yield first.stopService()
        yield self.synced(second, b)
        self.assertEqual(order_of(b, "web"), [])


NODE_SCRIPT = """
import sys
from twisted.internet import reactor, task
from nuttconch.cluster.registry import RedisRegistry, identity_of
from nuttconch.registry import Listener
registry = RedisRegistry(sys.argv[1], "doomed", lease=float(sys.argv[2]), timeout=1.0)
registry.startService()
mine = Listener("victim", ("victim-abcdefg", "web"))
registry.add_port(mine, "", 22)
def ready():
    if getattr(mine, "seq", 0):
        print("ready", flush=True)
        return
    reactor.callLater(0.01, ready)
ready()
reactor.run()
"""


class FaultTests(ClusterCase):
    @defer.inlineCallbacks
    def test_sigkilled_node_names_gone_within_10s(self) -> Any:
        """A node killed with SIGKILL has its names dropped on the others within 10 s."""
        b = self.node("b")
        yield self.synced(b)
        proc = subprocess.Popen(
            [sys.executable, "-c", NODE_SCRIPT, self.redis.url, "5"],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        yield wait_until(lambda: "victim" in order_of(b, "web"), 20, "the subprocess node")
        proc.kill()  # SIGKILL by pid: no LEAVE, no DEL
        proc.wait()
        started = time.perf_counter()
        yield wait_until(lambda: not b.listeners(), 10, "the dead node's names to go")
        gone = time.perf_counter() - started
        self.assertRaises(NotFound, b.resolve, "web", 22)
        print(f"\nSIGKILLed node (lease 5 s): names gone elsewhere after {gone:.2f} s")
        self.assertLess(gone, 10)

    @defer.inlineCallbacks
    def test_redis_down_then_back(self) -> Any:
        """Redis down: own names resolve, others fail naming the cause; back: same order."""
        a, b = self.node("a"), self.node("b")
        yield self.synced(a, b)
        for i, registry in enumerate([a, b, a, b]):
            registry.add_port(listener(f"h{i}", "web"), "", 22)
        yield self.synced(a, b)
        before = order_of(a, "web")
        self.redis.kill()
        yield wait_until(lambda: not a.healthy and not b.healthy, 10, "both nodes to notice")
        self.assertIn(f"Redis at 127.0.0.1:{self.redis.port}", a.cause)
        # Local circuits go on: a's own listeners still resolve, newest first.
        self.assertEqual([holder(a, f"web~{k}") for k in range(2)], ["h2", "h0"])
        self.assertEqual(a.resolve("web", 22).node, "a")
        exc = self.assertRaises(NotFound, a.resolve, "h1-abcdefg", 22)
        self.assertIn(
            "no such listener: h1-abcdefg on this node (cluster registry unavailable:", str(exc)
        )
        self.assertIn(f"127.0.0.1:{self.redis.port}", str(exc))
        # A registration made while Redis is down is newer than everything before it.
        a.add_port(listener("h4", "web"), "", 22)
        self.redis.start()  # empty: no persistence in this case
        started = time.perf_counter()
        yield self.synced(a, b)
        took = time.perf_counter() - started
        self.assertEqual(order_of(a, "web"), ["h4", *before])
        self.assertEqual(order_of(b, "web"), ["h4", *before])
        print(f"\nRedis back (empty): nodes converged in {took:.2f} s with the original order")
        self.assertLess(took, 5)

    @defer.inlineCallbacks
    def test_start_while_redis_down(self) -> Any:
        """A node started while Redis is down starts degraded, serves its own, joins later."""
        self.redis.kill()
        a = self.node("a")
        one = listener("one", "web")
        a.add_port(one, "", 22)
        self.assertFalse(a.healthy)
        self.assertIs(a.find("web"), one)
        self.redis.start()
        b = self.node("b")
        yield self.synced(a, b)
        self.assertEqual(holder(b, "web"), "one")


class PersistentRedisTests(ClusterCase):
    persistent = True

    @defer.inlineCallbacks
    def test_redis_restart_keeps_order(self) -> Any:
        """Redis restarted with its data: nodes reconnect and agree again, order unchanged."""
        a, b = self.node("a"), self.node("b")
        yield self.synced(a, b)
        for i, registry in enumerate([b, a, b]):
            registry.add_port(listener(f"h{i}", "web"), "", 22)
        yield self.synced(a, b)
        before = order_of(b, "web")
        self.redis.restart()
        started = time.perf_counter()
        # A registration after the restart proves both nodes write and follow again.
        a.add_port(listener("h3", "web"), "", 22)
        yield self.synced(a, b)
        print(f"\nRedis restarted (appendonly): converged in {time.perf_counter() - started:.2f} s")
        self.assertEqual(order_of(a, "web"), ["h3", *before])
        self.assertEqual(order_of(b, "web"), ["h3", *before])


class CutOffTests(ClusterCase):
    @defer.inlineCallbacks
    def test_node_cut_off_from_redis(self) -> Any:
        """A node cut off from Redis serves its own; the others drop its names; it rejoins."""
        proxies: list[Any] = []

        class Proxy(portforward.ProxyFactory):
            def buildProtocol(self, addr: Any) -> Any:
                p = super().buildProtocol(addr)
                proxies.append(p)
                return p

        port = reactor.listenTCP(0, Proxy("127.0.0.1", self.redis.port), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        via = f"redis://127.0.0.1:{port.getHost().port}/0"
        a, b = self.node("a", url=via), self.node("b")
        yield self.synced(a, b)
        mine = listener("mine", "web")
        a.add_port(mine, "", 22)
        b.add_port(listener("theirs", "web"), "", 22)
        yield self.synced(a, b)
        before = order_of(b, "web")
        # Cut: no new connections through the proxy, the open ones dropped.
        number = port.getHost().port
        yield port.stopListening()
        for p in proxies:
            p.transport.abortConnection()
        started = time.perf_counter()
        yield wait_until(lambda: order_of(b, "web") == ["theirs"], 10, "b to drop a's names")
        print(
            f"\ncut-off node's names dropped elsewhere after {time.perf_counter() - started:.2f} s"
        )
        self.assertFalse(a.healthy)
        self.assertIs(a.find("web"), mine)
        # Reconnect on the same port: a takes its lease again and re-asserts, order kept.
        port = reactor.listenTCP(number, Proxy("127.0.0.1", self.redis.port), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        started = time.perf_counter()
        yield self.synced(a, b)
        print(f"cut-off node back: converged in {time.perf_counter() - started:.2f} s")
        self.assertEqual(order_of(b, "web"), before)
        self.assertEqual(order_of(a, "web"), before)


class AdapterTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_command_while_down_fails_in_time(self) -> Any:
        """A command to a Redis that is not there fails after the deadline, naming it."""
        client = RedisClient(reactor, "redis://127.0.0.1:1/0", 0.3)
        self.addCleanup(client.close)
        started = time.perf_counter()
        failure = yield self.assertFailure(client.command("PING"), RedisUnavailable)
        took = time.perf_counter() - started
        self.assertIn("Redis at 127.0.0.1:1 did not answer PING within 0.3 s", str(failure))
        self.assertLess(took, 2)

    @defer.inlineCallbacks
    def test_reconnects_after_refused_password(self) -> Any:
        """A refused AUTH does not end reconnecting for good (txredisapi alone would stop)."""
        redis = RedisServer(os.path.abspath(self.mktemp()))
        redis.start()
        self.addCleanup(redis.kill)
        redis.cli("CONFIG", "SET", "requirepass", "right")
        client = RedisClient(reactor, f"redis://:wrong@127.0.0.1:{redis.port}/0", 0.3)
        self.addCleanup(client.close)
        yield self.assertFailure(client.command("PING"), RedisUnavailable)
        redis.cli("-a", "right", "--no-auth-warning", "CONFIG", "SET", "requirepass", "wrong")

        @defer.inlineCallbacks
        def ping() -> Any:
            try:
                reply = yield client.command("PING")
            except RedisUnavailable:
                return False
            return reply == "PONG"

        yield wait_until_deferred(ping, 10)


@defer.inlineCallbacks
def wait_until_deferred(attempt: Any, timeout: float) -> Any:
    """Try an asynchronous check until it is true (each try has its own deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        if (yield attempt()):
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        yield wait_until(lambda: True, 1)


class ClusterSSHTests(SwitchboardTestMixin, unittest.TestCase):
    """Two nodes built as twistd builds them, driven by the real OpenSSH client."""

    timeout = 120

    def setUp(self) -> Any:
        self.redis = RedisServer(os.path.abspath(self.mktemp()))
        self.redis.start()
        self.addCleanup(self.redis.kill)
        self.node_name = "a"
        result = super().setUp()
        self.registry.startService()
        self.addCleanup(self._stopRegistry, self.registry)
        self.root = self.key("root", options='access="admin",access="list",access="listen"')
        # Node b: the same keys directory (host keys, alias secret, authorized_keys),
        # as two nodes on one machine would have; its own port and registry.
        self.node_name = "b"
        cfg_b = configmod.load(self.writeConfig())
        self.factory_b, self.registry_b = build(cfg_b)
        self.registry_b.startService()
        self.addCleanup(self._stopRegistry, self.registry_b)
        self.listening_b = reactor.listenTCP(0, self.factory_b, interface="127.0.0.1")
        # authorized_keys is polled as twistd polls it (tap.KEYS_POLL_SECONDS).
        for factory in (self.factory, self.factory_b):
            poll = TimerService(KEYS_POLL_SECONDS, factory.checkKeys)
            poll.startService()
            self.addCleanup(poll.stopService)
        self.addCleanup(self.factory_b.disconnectAll)
        self.addCleanup(self.listening_b.stopListening)
        return result

    def _stopRegistry(self, registry: Any) -> Any:
        return registry.stopService() if registry.running else None

    def writeConfig(self, **overrides: str) -> str:
        path = super().writeConfig(**overrides)
        with open(path, "a") as handle:
            handle.write(
                f"[cluster]\nredis_url = {self.redis.url}\nnode_name = {self.node_name}\n"
                "lease_time = 2\nredis_timeout = 1\n"
            )
        return path

    def scrape(self, factory: Any) -> dict[str, float]:
        """The node's metrics as /metrics would serve them, unlabelled series only."""
        from prometheus_client import generate_latest

        from nuttconch.metrics import Metrics

        text = generate_latest(Metrics(factory).registry).decode()
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line
        }

    def on_b(self, *argv: str, extra: tuple[str, ...] = ()) -> Any:
        """Run ssh against node b with the admin key."""
        port, self.port = self.port, self.listening_b.getHost().port
        try:
            return self.ssh(self.root, "root", *extra, command=argv)
        finally:
            self.port = port

    @defer.inlineCallbacks
    def test_listeners_and_kick_across_nodes(self) -> Any:
        """An initiator on a is listed on b with its node, name~N works there, kick from b
        drops it on a, and a circuit through b names where the listener is."""
        yield wait_until(lambda: self.registry.healthy and self.registry_b.healthy, 10, "join")
        proc = yield self.initiator(self.key("dev"), "dev", "80:localhost:80")
        entries = yield wait_until(self.registry_b.listeners, 10, "b to see dev")
        self.assertEqual([(x.hostname, x.node) for x in entries], [("dev", "a")])
        name = entries[0].connect_name
        self.assertEqual(self.registry_b.find(f"{name}~0").node, "a")
        out, err, code = yield self.on_b("listeners")
        self.assertEqual(code, 0, err)
        header, row = out.decode().splitlines()[:2]
        self.assertEqual(header.split(), ["NAME", "ADDRESS", "ALIASES", "PORTS", "NODE"])
        self.assertEqual((row.split()[0], row.split()[-1]), (name, "a"))
        out, err, code = yield self.on_b("stats")
        self.assertIn("cluster: node b, ok", out.decode())
        self.assertIn("peers a,", out.decode())
        # A circuit asked of b: refused (the hop is not here), saying where the name is.
        _, err, code = yield self.on_b(extra=("-W", f"{name}:80"))
        self.assertNotEqual(code, 0)
        self.assertIn(b"held on node a", err)
        started = time.perf_counter()
        out, err, code = yield self.on_b("kick", name)
        self.assertEqual(code, 0, err)
        self.assertIn(f"kicked {name}", out.decode())
        _, err, _ = yield proc.ended
        print(f"\nkick from b to the initiator's exit on a: {time.perf_counter() - started:.3f} s")
        self.assertIn(b"kicked by an administrator", err)
        yield wait_until(lambda: not self.registry_b.listeners(), 10, "b to drop dev")

    @defer.inlineCallbacks
    def test_redis_down_seen_by_ssh_users(self) -> Any:
        """With Redis down a's own initiator still resolves; another name fails naming the
        cause; stats says degraded."""
        yield wait_until(lambda: self.registry.healthy and self.registry_b.healthy, 10, "join")
        yield self.initiator(self.key("dev"), "dev", "80:localhost:80")
        name = self.registry.local_listeners()[0].connect_name
        yield wait_until(self.registry_b.listeners, 10, "b to see dev")
        # Metrics: each node counts its own initiators; the cluster gauges show the rest.
        on_b = self.scrape(self.factory_b)
        self.assertEqual(on_b["nuttconch_initiators"], 0)
        self.assertEqual(on_b["nuttconch_cluster_initiators"], 1)
        self.assertEqual(on_b["nuttconch_cluster_peers"], 1)
        self.assertEqual(on_b["nuttconch_cluster_healthy"], 1)
        self.assertEqual(on_b["nuttconch_cluster_redis_up"], 1)
        self.assertEqual(self.scrape(self.factory)["nuttconch_initiators"], 1)
        self.redis.kill()
        yield wait_until(lambda: not self.registry.healthy, 10, "a to notice")
        on_a = self.scrape(self.factory)
        self.assertEqual((on_a["nuttconch_cluster_healthy"], on_a["nuttconch_cluster_redis_up"]),
                         (0, 0))  # fmt: skip
        self.assertEqual(self.registry.find(name).hostname, "dev")  # still there: local
        _, err, code = yield self.ssh(self.root, "root", "-W", "elsewhere:80")
        self.assertNotEqual(code, 0)
        self.assertIn(
            b"no such listener: elsewhere on this node (cluster registry unavailable:", err
        )
        self.assertIn(f"127.0.0.1:{self.redis.port}".encode(), err)
        out, err, code = yield self.ssh(self.root, "root", command=("stats",))
        self.assertIn("cluster: node a, degraded (", out.decode())


class ClusterKeysTests(ClusterSSHTests):
    """Nodes with authorized_keys files of their own: changes on one apply on all."""

    def setUp(self) -> Any:
        self.separate = os.path.join(os.path.abspath(self.mktemp()), "keys")
        return super().setUp()

    def writeConfig(self, **overrides: str) -> str:
        if self.node_name == "b":
            # b's own copy of keys/: the same host keys and alias secret, its own file.
            if not os.path.exists(self.separate):
                shutil.copytree(self.keydir, self.separate)
            keydir, self.keydir = self.keydir, self.separate
            try:
                return super().writeConfig(**overrides)
            finally:
                self.keydir = keydir
        return super().writeConfig(**overrides)

    def tokens(self, path: str) -> dict[str, str]:
        with open(path) as handle:
            return key_lines(handle.read().split("\n"))

    @defer.inlineCallbacks
    def test_first_use_then_ban_applies_everywhere(self) -> Any:
        """A key trusted on first use on b is known on a; banned on a, its connection on b
        drops within 2 s; nothing else in either file changes."""
        b_file = os.path.join(self.separate, "authorized_keys")
        with open(b_file, "a") as handle:
            handle.write("# b's own comment\n")
        yield wait_until(lambda: self.registry.healthy and self.registry_b.healthy, 10, "join")
        port, self.port = self.port, self.listening_b.getHost().port
        try:
            dev = self.key("dev")
            proc = yield self.initiator(dev, "dev", "80:localhost:80")
        finally:
            self.port = port
        with open(dev + ".pub") as handle:
            token = handle.read().split()[1]
        line = yield wait_until(lambda: self.tokens(self.akfile).get(token), 10, "a to learn dev")
        self.assertIn('access="initiate"', line)
        fp = key_fingerprint(dev)
        started = time.perf_counter()
        out, err, code = yield self.ssh(self.root, "root", command=("ban", fp))
        self.assertEqual(code, 0, err)
        _, err, _ = yield proc.ended
        took = time.perf_counter() - started
        print(f"\nban on a to the banned key's connection on b closed: {took:.2f} s")
        self.assertLess(took, 2)
        self.assertIn(b"access changed: key denied in authorized_keys", err)
        self.assertIn('access="denied"', self.tokens(b_file)[token])
        # Nothing lost: b's comment and every other key are still there, and both files
        # hold the same keys.
        with open(b_file) as handle:
            self.assertIn("# b's own comment\n", handle.read())
        yield wait_until(lambda: self.tokens(b_file) == self.tokens(self.akfile), 10, "agree")
