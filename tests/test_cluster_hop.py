"""Issue 11.2/11.4/11.6: circuits across nodes through the hop, with the real OpenSSH client.

Two nodes run in this process, each a full server (its own factory, public
listener and relay listener), sharing one name space through a MemoryCluster
(the embedded registry shared by both: a real registry, not a mock).  Node B
holds the initiator (``ssh -R``); clients use node A (``ssh -W``, ``ssh -L``),
so every byte crosses the hop A -> B.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import tempfile
from typing import Any

from twisted.conch.ssh import common, keys
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial import unittest
from zope.interface import implementer

from nuttconch import config as configmod
from nuttconch.circuit import OpenRefused
from nuttconch.cluster import relay
from nuttconch.tap import build
from tests.harness import SSH, SwitchboardTestMixin, _timeout, listen_echo, make_key, missing


class Node:
    """One in-process node: factory, public port, relay port."""

    def __init__(self, name: str, factory: Any, port: Any, relayPort: Any) -> None:
        self.name = name
        self.factory = factory
        self.listening = port
        self.port = port.getHost().port
        self.relayListening = relayPort
        self.relayPort = relayPort.getHost().port


class TwoNodeMixin(SwitchboardTestMixin):
    """Nodes a and b; ``self.port`` (what ``ssh`` dials) is node A's public port."""

    def startServer(self, **overrides: str) -> Any:
        self.cluster = relay.MemoryCluster()
        self.clusterKeyPath, _ = make_key(self.dir, "cluster_key")
        self.clusterKey = keys.Key.fromFile(self.clusterKeyPath)
        self.nodes: dict[str, Node] = {}
        for name in ("a", "b"):
            self.nodes[name] = self.startNode(name)
        self.port = self.nodes["a"].port
        self.factory = self.nodes["a"].factory
        self.registry = self.cluster.core
        self.listening = None
        self.addCleanup(self.stopNodes)
        return None

    def startNode(self, name: str) -> Node:
        cfg = self.config = configmod.load(self.writeConfig())
        factory, _ = build(cfg)
        view = self.cluster.node(name)
        factory.registry = view
        view.observers.append(factory._registryEvent)
        relayFactory = relay.make_relay_factory(factory, [self.clusterKey])
        relayPort = reactor.listenTCP(0, relayFactory, interface="127.0.0.1")
        self.cluster.relays[name] = f"127.0.0.1:{relayPort.getHost().port}"
        factory.hops = relay.HopPool(
            name, view, self.clusterKey, factory.privateKeys.values(), cfg, budget=factory.budget
        )
        factory.relay = relayFactory
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return Node(name, factory, port, relayPort)

    @defer.inlineCallbacks
    def stopNodes(self) -> Any:
        for proc in list(self.processes):
            yield proc.kill()
        for node in self.nodes.values():
            node.factory.hops.closeAll()
            yield node.listening.stopListening()
            yield node.relayListening.stopListening()
            yield node.factory.disconnectAll()
            yield node.factory.relay.disconnectAll()
        yield task.deferLater(reactor, 0.05, lambda: None)

    def stopServer(self) -> Any:  # the mixin's cleanup: nodes are stopped by stopNodes
        return None

    def onNode(self, name: str, key: str | None, user: str, *extra: str, **kw: Any) -> Any:
        """Spawn ssh against node ``name``'s public port."""
        saved = self.port
        self.port = self.nodes[name].port
        try:
            return self.spawn(key, user, *extra, **kw)
        finally:
            self.port = saved

    @defer.inlineCallbacks
    def initiatorOnB(self, fwd: str = "8080:127.0.0.1:{echo}", user: str = "dev") -> Any:
        echo = listen_echo(self)
        key = self.key(user)
        proc = self.onNode("b", key, user, "-N", "-R", fwd.format(echo=echo), stdin=None)
        listener = yield self.waitPort(8080)
        self.assertEqual(listener.node, "b")
        return proc, listener

    def clientBytesIn(self) -> int:
        total = 0
        for transport in self.nodes["a"].factory.transports:
            service = getattr(transport, "service", None)
            for circuit in getattr(service, "circuits", ()):
                total += circuit.bytes_up
        return total

    def queuedOnNodes(self) -> int:
        total = 0
        for node in self.nodes.values():
            transports = list(node.factory.transports) + list(node.factory.relay.transports)
            peer = node.factory.hops.peers.get("b")
            if peer is not None and peer.transport is not None:
                transports.append(peer.transport)
            for transport in transports:
                service = getattr(transport, "service", None)
                for chan in getattr(service, "channels", {}).values():
                    total += len(getattr(chan, "buf", b""))
                tcp = transport.transport
                if tcp is not None:
                    total += len(getattr(tcp, "dataBuffer", b"")) + getattr(tcp, "_tempDataLen", 0)
        return total

    def _canConnect(self, port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def hopCount(self, name: str = "b") -> int:
        """Authenticated hop connections node ``name``'s relay port holds."""
        return sum(1 for t in self.nodes[name].factory.relay.transports if hasattr(t, "avatar"))


class CrossNodeCircuitTests(TwoNodeMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_w_checksums_both_ways(self) -> Any:
        """4 MiB through ssh -W on node A to an initiator on node B come back intact."""
        _, listener = yield self.initiatorOnB()
        payload = os.urandom(4 << 20)
        client = self.key("client")
        out, err, code = yield self.ssh(
            client, "client", "-W", f"{listener.connect_name}:8080", stdin=payload, timeout=60
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(hashlib.sha256(out).hexdigest(), hashlib.sha256(payload).hexdigest())
        self.assertEqual(self.hopCount(), 1)
        # The hop ran nuttconch's own packet layer with strict KEX on both sides.
        hop = self.nodes["a"].factory.hops.peers["b"].transport
        self.assertTrue(hop.strictKex)
        self.assertIn(hop.currentEncryptions.outCipType, self.config.ciphers)
        self.assertTrue(hop.currentEncryptions.outCipType.endswith(b"-gcm@openssh.com"))
        (far,) = [t for t in self.nodes["b"].factory.relay.transports if hasattr(t, "avatar")]
        self.assertTrue(far.strictKex)
        self.assertEqual(far.avatar.identity.username, "a")

    @defer.inlineCallbacks
    def test_hop_connection_reused(self) -> Any:
        """Several circuits, one after another and at once, share one hop connection."""
        _, listener = yield self.initiatorOnB()
        client = self.key("client")
        target = f"{listener.connect_name}:8080"
        first = yield self.ssh(client, "client", "-W", target, stdin=b"one")
        self.assertEqual(first[0], b"one", first[1])
        results = yield defer.gatherResults(
            [self.ssh(client, "client", "-W", target, stdin=b"x%d" % i) for i in range(4)]
        )
        self.assertEqual(sorted(r[0] for r in results), [b"x0", b"x1", b"x2", b"x3"])
        self.assertEqual(self.hopCount(), 1)

    @defer.inlineCallbacks
    def test_l_forward_half_close(self) -> Any:
        """ssh -L through node A: the device sees EOF, then its echo and EOF come back."""
        _, listener = yield self.initiatorOnB()
        client = self.key("client")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            local = s.getsockname()[1]
        self.onNode(
            "a", client, "client", "-N", "-L", f"{local}:{listener.connect_name}:8080", stdin=None
        )
        payload = os.urandom(3 << 20)
        got = yield self.waitFor(lambda: self._canConnect(local), 15, "ssh -L to listen")
        self.assertTrue(got)
        received = yield self.halfCloseExchange(local, payload)
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(payload).digest())

    def halfCloseExchange(self, port: int, payload: bytes) -> defer.Deferred[bytes]:
        """Send payload, shut down writing, read until the far side's EOF."""
        done: defer.Deferred[bytes] = defer.Deferred()

        class Client(protocol.Protocol):
            def connectionMade(self) -> None:
                self.data = bytearray()
                self.transport.write(payload)
                self.transport.loseWriteConnection()

            def dataReceived(self, data: bytes) -> None:
                self.data += data

            def connectionLost(self, reason: Any) -> None:
                done.callback(bytes(self.data))

        protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", port)
        return _timeout(done, 60, "the echo and EOF through -L")

    @defer.inlineCallbacks
    def test_name_unknown_and_stale_id(self) -> Any:
        """A name nobody holds is refused on A; a listener id B does not hold (a stale
        replica entry) is refused by B, and the client is told so as an open failure."""
        yield self.initiatorOnB()
        out, err, code = yield self.ssh(self.key("client"), "client", "-W", "nobody:8080")
        self.assertNotEqual(code, 0)
        self.assertIn(b"no such listener: nobody", err)
        pending = self.nodes["a"].factory.hops.open("b", "b/999", 8080, ("127.0.0.1", 1))
        failure = yield self.assertFailure(pending.opened, OpenRefused)
        self.assertIn("b/999 port 8080 is not held on node b", failure.message)

    @defer.inlineCallbacks
    def test_initiator_leaves_circuit_open_fails(self) -> Any:
        """The initiator's connection ends between resolve and open: B refuses the hop
        and the client sees why (no hang, no traceback)."""
        proc, listener = yield self.initiatorOnB()
        listenerId = listener.id
        yield proc.kill()
        yield self.waitFor(lambda: not listener.ports, 10, "the initiator to leave")
        pending = self.nodes["a"].factory.hops.open("b", listenerId, 8080, ("127.0.0.1", 1))
        failure = yield self.assertFailure(pending.opened, OpenRefused)
        self.assertIn("not held on node b", failure.message)


class HopAccessTests(TwoNodeMixin, unittest.TestCase):
    """The hop is refused on the public port, for non-cluster keys and for foreign host keys."""

    @defer.inlineCallbacks
    def openVia(self, address: str, **changes: Any) -> Any:
        pool = self.nodes["a"].factory.hops
        for attr, value in changes.items():
            setattr(pool, attr, value)
        self.cluster.relays["b"] = address
        _, listener = yield self.initiatorOnB()
        pending = pool.open("b", listener.id, 8080, ("127.0.0.1", 1))
        failure = yield self.assertFailure(pending.opened, OpenRefused)
        return failure.message

    @defer.inlineCallbacks
    def test_hop_refused_on_public_port(self) -> Any:
        """A hop channel on the public SSH port (the cluster key logs in there as any
        key would) is refused as an unknown channel type."""
        message = yield self.openVia(f"127.0.0.1:{self.nodes['b'].port}")
        self.assertIn("unknown channel type hop@nuttconch", message)

    @defer.inlineCallbacks
    def test_non_cluster_key_refused(self) -> Any:
        """A node dialling with a key that is not the cluster key is refused at login, by name."""
        other = keys.Key.fromFile(make_key(self.dir, "other")[0])
        message = yield self.openVia(self.cluster.relays["b"], key=other)
        self.assertIn("the relay port accepts only the cluster key", message)

    @defer.inlineCallbacks
    def test_foreign_host_key_refused(self) -> Any:
        """A relay presenting a host key that is not one of the cluster's is dropped
        before login."""
        stranger = keys.Key.fromFile(make_key(self.dir, "stranger")[0])
        message = yield self.openVia(self.cluster.relays["b"], hostKeyBlobs=[stranger.blob()])
        self.assertIn("host key", message)
        self.assertEqual(self.hopCount(), 0)

    @defer.inlineCallbacks
    def test_openssh_with_user_key_refused_on_relay_port(self) -> Any:
        """A user's key (even one authorized on the public port) cannot log in on the
        relay port; the refusal is shown to the OpenSSH client."""
        key = self.key("user", options="")
        saved = self.port
        self.port = self.nodes["b"].relayPort
        try:
            out, err, code = yield self.ssh(key, "user", "-N")
        finally:
            self.port = saved
        self.assertEqual(code, 255)
        self.assertIn(b"the relay port accepts only the cluster key", err)


class HopUnitTests(unittest.TestCase):
    """Table-driven checks of the hop's parsing and configuration."""

    def test_unpack_hop_table(self) -> None:
        """Malformed hop requests (short, long, empty or oversized id, port 0 or out of
        range, bad UTF-8) raise; a good one round-trips."""
        good = relay.pack_hop("b/7", 8080, ("10.0.0.1", 5555))
        self.assertEqual(relay.unpack_hop(good), ("b/7", 8080, ("10.0.0.1", 5555)))
        bad = [
            b"",
            good[:-1],
            good + b"x",
            relay.pack_hop("", 8080, ("h", 1)),
            relay.pack_hop("x" * 256, 8080, ("h", 1)),
            relay.pack_hop("b/1", 0, ("h", 1)),
            struct.pack(">L", 3) + b"b/1" + struct.pack(">LL", 70000, 0) + b"\0" * 4,
            struct.pack(">L", 2) + b"\xff\xfe" + struct.pack(">L", 1) + b"\0\0\0\0" + b"\0" * 4,
        ]  # fmt: skip
        for data in bad:
            with self.subTest(data=data[:40]):
                self.assertRaises(
                    (ValueError, struct.error, UnicodeDecodeError), relay.unpack_hop, data
                )

    def test_config_table(self) -> None:
        """[cluster] keys the hop uses: good values parse, bad ones stop start-up naming the key."""
        cases = [
            ("node_name", "node-1", "node-1"),
            ("node_name", "node-1.eu", None),
            ("node_name", "bad name", None),
            ("node_name", "n" * 65, None),
            ("relay_listen", "2223", "tcp:2223:interface=127.0.0.1"),
            ("relay_listen", "tcp:2223:interface=10.0.0.2", "tcp:2223:interface=10.0.0.2"),
            ("relay_listen", "nonsense", None),
            ("relay_address", "10.0.0.2:2223", "tcp:10.0.0.2:2223"),
            ("relay_address", "tcp:10.0.0.2:2223", "tcp:10.0.0.2:2223"),
            ("relay_address", "tcp6:\\:\\:1:2223", "tcp6:\\:\\:1:2223"),
            ("relay_address", "[::1]:2223", "tcp:\\:\\:1:2223"),
            ("cluster_key_file", " /etc/nuttconch/cluster_key ", "/etc/nuttconch/cluster_key"),
            ("relay_address", "tcp:host=10.0.0.2:port=2223", "tcp:host=10.0.0.2:port=2223"),
            ("relay_address", "10.0.0.2", None),
            ("relay_address", "host:99999", None),
        ]
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "nuttssh.ini")
        for key, raw, expected in cases:
            with self.subTest(key=key, raw=raw):
                with open(path, "w") as handle:
                    handle.write(f"[cluster]\n{key} = {raw}\n")
                if expected is None:
                    with self.assertRaises(configmod.ConfigError) as caught:
                        configmod.load(path)
                    self.assertIn(f"[cluster] {key}", str(caught.exception))
                else:
                    self.assertEqual(getattr(configmod.load(path), key), expected)

    def test_cluster_key_file_errors(self) -> None:
        """A missing file, a non-ed25519 key or a public key is refused with the file's name."""
        directory = self.mktemp()
        os.makedirs(directory)
        ed, _ = make_key(directory, "ed")
        ec, _ = make_key(directory, "ec", "ecdsa")
        self.assertEqual(relay.load_cluster_key(ed).type(), "Ed25519")
        for path, words in [
            (os.path.join(directory, "missing"), "No such file"),
            (ec, "expected an unencrypted ed25519 private key"),
            (ed + ".pub", "expected an unencrypted ed25519 private key"),
        ]:
            with self.subTest(path=path):
                with self.assertRaises(ValueError) as caught:
                    relay.load_cluster_key(path)
                self.assertIn(path, str(caught.exception))
                self.assertIn(words, str(caught.exception))

    def test_client_endpoint_table(self) -> None:
        """relay_address forms map to the endpoint the pool dials."""
        from twisted.internet import endpoints

        for address, kind in [
            ("127.0.0.1:2223", endpoints.HostnameEndpoint),
            ("[::1]:2223", endpoints.HostnameEndpoint),
            ("tcp:host=127.0.0.1:port=2223", endpoints.TCP4ClientEndpoint),
            ("tcp:127.0.0.1:2223", endpoints.TCP4ClientEndpoint),
            ("unix:path=/tmp/x.sock", endpoints.UNIXClientEndpoint),
        ]:
            with self.subTest(address=address):
                self.assertIsInstance(relay.client_endpoint(reactor, address), kind)


class CuttableProxy(protocol.Factory):
    """A TCP proxy in front of node B's relay port whose connections a test can cut."""

    def __init__(self, port: int) -> None:
        from twisted.protocols import portforward

        self.inner = portforward.ProxyFactory("127.0.0.1", port)
        self.live: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        proto = self.inner.buildProtocol(addr)
        self.live.append(proto)
        return proto

    def cut(self) -> int:
        count = 0
        for proto in self.live:
            if proto.transport is not None and proto.transport.connected:
                proto.transport.abortConnection()
                count += 1
        return count


@implementer(IHalfCloseableProtocol)
class StalledDevice(protocol.Protocol):
    """A device that never reads: the slow reader at the initiator's side."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.factory.devices.append(self)

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        pass


class HopFaultTests(TwoNodeMixin, unittest.TestCase):
    """11.4: a hop dropped mid-circuit ends only its circuits; a killed node's hop
    circuits close; memory stays bounded with a slow reader behind the hop."""

    @defer.inlineCallbacks
    def twoCircuits(self) -> Any:
        """One circuit crossing the hop (to dev on B), one local to node A (to loc on A)."""
        _, remote = yield self.initiatorOnB()
        echo = listen_echo(self)
        self.onNode("a", self.key("loc"), "loc", "-N", "-R", f"8081:127.0.0.1:{echo}", stdin=None)
        local = yield self.waitPort(8081)
        self.assertEqual(local.node, "a")
        client = self.key("client")
        crossing = self.spawn(client, "client", "-W", f"{remote.connect_name}:8080", stdin=None)
        staying = self.spawn(client, "client", "-W", f"{local.connect_name}:8081", stdin=None)
        for proc, word in ((crossing, b"cross-1"), (staying, b"stay-1")):
            proc.transport.write(word)
            yield proc.waitOutput(word, 20)
        return crossing, staying, remote

    @defer.inlineCallbacks
    def test_hop_dropped_mid_circuit_ends_only_its_circuits(self) -> Any:
        """A proxy in front of B's relay port cuts the hop: the crossing circuit ends,
        node A's local circuit goes on, and the next crossing circuit dials again."""
        proxy = CuttableProxy(self.nodes["b"].relayPort)
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.cluster.relays["b"] = f"127.0.0.1:{port.getHost().port}"
        crossing, staying, remote = yield self.twoCircuits()
        self.assertEqual(proxy.cut(), 1)
        out, err, code = yield _timeout(crossing.ended, 20, "the crossing circuit to end")
        self.assertIn(b"cross-1", out)
        # The local circuit, the initiators and node A's public connections go on.
        staying.transport.write(b"stay-2")
        yield staying.waitOutput(b"stay-2", 20)
        self.assertIsNone(staying.code)
        # The next crossing circuit makes a new hop connection and works.
        out, err, code = yield self.ssh(
            self.key("client2"), "client2", "-W", f"{remote.connect_name}:8080", stdin=b"again"
        )
        self.assertEqual((out, code), (b"again", 0), err)
        self.assertEqual(len(proxy.live), 2)

    @defer.inlineCallbacks
    def test_node_killed_its_hop_circuits_close(self) -> Any:
        """Every socket of node B reset at once (as SIGKILL does): the circuit through
        it ends for the client on A, A's own circuit goes on, and B's names are gone."""
        crossing, staying, remote = yield self.twoCircuits()
        b = self.nodes["b"]
        yield b.listening.stopListening()
        yield b.relayListening.stopListening()
        for transport in list(b.factory.transports) + list(b.factory.relay.transports):
            transport.transport.abortConnection()
        out, err, code = yield _timeout(crossing.ended, 20, "the crossing circuit to end")
        self.assertIn(b"cross-1", out)
        staying.transport.write(b"stay-2")
        yield staying.waitOutput(b"stay-2", 20)
        yield self.waitFor(
            lambda: not any(li.node == "b" for li in self.registry.listeners()), 10, "b's names"
        )
        name = remote.connect_name
        out, err, code = yield self.ssh(self.key("c3"), "c3", "-W", f"{name}:8080", stdin=b"x")
        self.assertNotEqual(code, 0)
        self.assertIn(f"no such listener: {name}".encode(), err)

    @defer.inlineCallbacks
    def test_slow_reader_behind_hop_bounded(self) -> Any:
        """The device on B never reads; the client on A keeps sending 64 MiB. What the two
        nodes queue stays within a few channel windows, and the client is held back."""
        devices: list[StalledDevice] = []
        factory = protocol.Factory.forProtocol(StalledDevice)
        factory.devices = devices  # type: ignore[attr-defined]
        dev = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(dev.stopListening)
        key = self.key("dev")
        self.onNode("b", key, "dev", "-N", "-R", f"8080:127.0.0.1:{dev.getHost().port}", stdin=None)
        listener = yield self.waitPort(8080)
        sent = 64 << 20
        proc = self.spawn(
            self.key("client"), "client", "-W", f"{listener.connect_name}:8080", stdin=None
        )
        proc.transport.write(b"\0" * sent)
        history: list[int] = []

        def stalled() -> bool:
            history.append(self.clientBytesIn())
            return len(history) > 25 and history[-1] == history[-25] and history[-1] > 0

        yield self.waitFor(stalled, 60, "the client to be held back")
        window = self.config.channel_window
        accepted = self.clientBytesIn()
        queued = self.queuedOnNodes()
        # Bytes the nodes took from the client and have not passed on to the device's
        # socket, at most: one window per circuit end on the way (A: client end and hop
        # end, B: hop end and initiator end), plus what sits in socket buffers.
        self.assertLess(queued, 4 * window, f"queued {queued} with window {window}")
        self.assertLess(accepted, sent // 4, f"nodes accepted {accepted} of {sent}")
        print(
            f"\nslow reader behind the hop: accepted {accepted}, queued {queued}, window {window}"
        )
        yield proc.kill()


class HopOpenFailureTests(TwoNodeMixin, unittest.TestCase):
    """A refusal or a timeout on node B reaches the client on node A as an open failure."""

    settings = {"channel_open_timeout": "1"}

    @defer.inlineCallbacks
    def test_initiator_refusal_reaches_client(self) -> Any:
        """The initiator's own refusal text crosses the hop to the client unchanged."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]  # nothing listens here once the socket is closed
        self.onNode("b", self.key("dev"), "dev", "-N", "-R", f"8080:127.0.0.1:{closed}", stdin=None)
        listener = yield self.waitPort(8080)
        out, err, code = yield self.ssh(
            self.key("client"), "client", "-W", f"{listener.connect_name}:8080"
        )
        self.assertEqual(code, 255)
        self.assertIn(b"open failed: connect failed: initiator refused: Connection refused", err)
        self.assertEqual(self.hopCount(), 1)  # the hop connection stays for the next circuit

    @defer.inlineCallbacks
    def test_hung_initiator_times_out_as_open_failure(self) -> Any:
        """An initiator on B that never answers: the client on A gets the open
        timeout as an open failure, and neither node keeps the pending open."""
        from tests.rawssh import connect_client

        key = self.key("hung", options='access="initiate"')
        hung = yield connect_client(self.nodes["b"].port, key=key, user=b"hung")
        self.addCleanup(hung.close)
        num, _ = yield hung.conn.globalRequest(
            b"tcpip-forward", common.NS(b"") + struct.pack(">L", 80)
        )
        self.assertEqual(num, 81)
        (listener,) = self.registry.listeners()
        self.assertEqual(listener.node, "b")
        started = reactor.seconds()
        out, err, code = yield self.ssh(
            self.key("client"), "client", "-W", f"{listener.connect_name}:80"
        )
        self.assertEqual(code, 255)
        self.assertIn(b"initiator did not answer in time", err)
        self.assertLess(reactor.seconds() - started, 10)

        def settled() -> bool:
            """No open is left waiting on either node (B's own timer ends its side)."""
            return not any(
                getattr(t.service, "pendingOpens", None)
                for node in self.nodes.values()
                for t in list(node.factory.transports) + list(node.factory.relay.transports)
            )

        yield self.waitFor(settled, 10, "both nodes to drop the pending open")
        self.assertEqual(self.hopCount(), 1)


class FloodDevice(protocol.Protocol):
    """A device that writes ``factory.size`` bytes as fast as its socket takes them."""

    def connectionMade(self) -> None:
        self.sent = 0
        self.factory.devices.append(self)
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sent >= self.factory.size:
            self.transport.unregisterProducer()
            return
        self.transport.write(b"\1" * 65536)
        self.sent += 65536

    def stopProducing(self) -> None:
        pass


class StalledClient(protocol.Protocol):
    """The client behind ``ssh -L`` that never reads."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()


class HopSlowClientTests(TwoNodeMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_slow_client_on_a_bounded(self) -> Any:
        """The device on B floods, the client on A (through ssh -L) never reads: what
        the nodes queue stays within a few windows and the device is held back."""
        devices: list[FloodDevice] = []
        factory = protocol.Factory.forProtocol(FloodDevice)
        factory.devices = devices  # type: ignore[attr-defined]
        factory.size = 64 << 20  # type: ignore[attr-defined]
        dev = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(dev.stopListening)
        self.onNode(
            "b", self.key("dev"), "dev", "-N", "-R", f"8080:127.0.0.1:{dev.getHost().port}",
            stdin=None,
        )  # fmt: skip
        listener = yield self.waitPort(8080)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            local = s.getsockname()[1]
        self.onNode(
            "a", self.key("client"), "client", "-N", "-L", f"{local}:{listener.connect_name}:8080",
            stdin=None,
        )  # fmt: skip
        yield self.waitFor(lambda: self._canConnect(local), 15, "-L")
        yield protocol.ClientCreator(reactor, StalledClient).connectTCP("127.0.0.1", local)
        # (the probe connection above opened and closed one circuit; the stalled one is next)
        history: list[int] = []

        def stalled() -> bool:
            history.append(sum(d.sent for d in devices))
            return len(history) > 25 and history[-1] == history[-25] and history[-1] > 0

        yield self.waitFor(stalled, 60, "the device to be held back")
        window = self.config.channel_window
        queued = self.queuedOnNodes()
        sent = history[-1]
        print(f"\nslow client behind the hop: device sent {sent}, queued {queued}, window {window}")
        self.assertLess(queued, 4 * window, f"queued {queued} with window {window}")
        # What the device got rid of also sits in kernel socket buffers and in the two ssh
        # clients (autotuned loopback buffers reach several MiB each on a busy machine):
        # held back means well short of the whole 64 MiB, which the nodes' queue bounds.
        self.assertLess(sent, factory.size // 2)  # type: ignore[attr-defined]


class InstallTests(unittest.TestCase):
    """The relay is wired only where it can work, and says why not in words."""

    def makeFactory(self, registry: Any, **cluster: str) -> Any:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        from tests.harness import host_key_dir

        lines = "\n".join(f"{k} = {v}" for k, v in cluster.items())
        path = os.path.join(directory, "nuttssh.ini")
        with open(path, "w") as handle:
            handle.write(
                f"[server]\nlisten_port = 0\n[keys]\nhost_key_dir = {host_key_dir()}\n"
                f"authorized_keys_file = {directory}/ak\n[cluster]\n{lines}\n"
            )
        cfg = configmod.load(path)
        factory, _ = build(cfg)
        if registry is not None:
            factory.registry = registry
        return factory, cfg, directory

    def test_install_table(self) -> None:
        """No relay_listen or no cluster registry: nothing installed; a missing or bad
        key: a one-line error; otherwise the relay listener and the pool."""
        from twisted.application.service import MultiService

        cluster = relay.MemoryCluster()
        keydir = os.path.abspath(self.mktemp())
        os.makedirs(keydir)
        listen = {"relay_listen": "tcp:0:interface=127.0.0.1"}
        for registry, settings, expect in [
            (None, {}, None),
            (None, listen, None),
            (cluster.node("a"), listen, "needs cluster_key_file"),
            (cluster.node("b"), {**listen, "cluster_key_file": "/nonexistent"}, "/nonexistent"),
            (cluster.node("c"), {**listen, "cluster_key_file": "KEY"}, "pool"),
        ]:  # fmt: skip
            with self.subTest(settings=settings):
                key, _ = make_key(keydir, "ck")
                settings = {k: v.replace("KEY", key) for k, v in settings.items()}
                factory, cfg, directory = self.makeFactory(registry, **settings)
                parent = MultiService()
                if expect is None:
                    self.assertIsNone(relay.install(factory, cfg, parent))
                    self.assertIsNone(getattr(factory, "hops", None))
                elif expect == "pool":
                    pool = relay.install(factory, cfg, parent)
                    self.assertIs(factory.hops, pool)
                    self.assertEqual(pool.node, "c")
                    self.assertIsNotNone(parent.getServiceNamed("relay"))
                else:
                    with self.assertRaises(ValueError) as caught:
                        relay.install(factory, cfg, parent)
                    self.assertIn(expect, str(caught.exception))


class HttpDevice(protocol.Protocol):
    """A device answering any request with ``factory.body`` over HTTP/1.0."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and not getattr(self, "answered", False):
            self.answered = True
            body = self.factory.body
            self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.transport.write(body)
            self.transport.loseConnection()


class HopSocksTests(TwoNodeMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_d_socks_through_a_to_b(self) -> Any:
        """ssh -D on node A, curl through it by name: 4 MiB from a device behind node B
        arrive intact (the name goes to the server as given: socks5-hostname)."""
        from twisted.internet import utils
        from twisted.python.procutils import which

        curl = which("curl")
        if not curl:
            missing("curl", "apt-get install curl")
        factory = protocol.Factory.forProtocol(HttpDevice)
        factory.body = os.urandom(4 << 20)  # type: ignore[attr-defined]
        dev = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(dev.stopListening)
        self.onNode(
            "b", self.key("dev"), "dev", "-N", "-R", f"80:127.0.0.1:{dev.getHost().port}",
            stdin=None,
        )  # fmt: skip
        listener = yield self.waitPort(80)
        socks = self.freePort()
        self.onNode("a", self.key("client"), "client", "-N", "-D", str(socks), stdin=None)
        yield self.waitFor(lambda: self._canConnect(socks), 15, "ssh -D to listen")
        out = yield utils.getProcessOutput(
            curl[0],
            ["-s", "--max-time", "30", "--socks5-hostname", f"127.0.0.1:{socks}",
             f"http://{listener.connect_name}/"],
            errortoo=False,
        )  # fmt: skip
        self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(factory.body).digest())  # type: ignore[attr-defined]
        self.assertEqual(self.hopCount(), 1)

    def freePort(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


class RegistryContractTests(TwoNodeMixin, unittest.TestCase):
    """What the hop asks of a shared registry, in the forms a store-backed one gives."""

    @defer.inlineCallbacks
    def test_address_from_a_round_trip(self) -> Any:
        """relay_address answering with a Deferred: the first circuit waits for it,
        later ones reuse the hop; an unknown node fails the open with its name."""
        self.cluster.asyncAddresses = True
        _, listener = yield self.initiatorOnB()
        client = self.key("client")
        results = yield defer.gatherResults(
            [
                self.ssh(client, "client", "-W", f"{listener.connect_name}:8080", stdin=b"p%d" % i)
                for i in range(3)
            ]
        )
        self.assertEqual(sorted(r[0] for r in results), [b"p0", b"p1", b"p2"])
        self.assertEqual(self.hopCount(), 1)
        pending = self.nodes["a"].factory.hops.open("c", "c/1", 80, ("127.0.0.1", 1))
        failure = yield self.assertFailure(pending.opened, OpenRefused)
        self.assertEqual(failure.message, "node c has no relay address")

    def test_local_listener_table(self) -> None:
        """A registry without local_listener is searched through local_listeners()."""

        class Scanning:
            def __init__(self, listeners: list[Any]) -> None:
                self._listeners = listeners

            def local_listeners(self) -> list[Any]:
                return self._listeners

        from nuttconch.registry import Listener

        held, idle = Listener("h", ("h",)), Listener("i", ("i",))
        held.id, idle.id = "b/1", "b/2"
        held.ports[80] = "localhost"
        registry = Scanning([held, idle])
        for listenerId, expected in [("b/1", held), ("b/2", None), ("b/3", None), ("", None)]:
            with self.subTest(listenerId=listenerId):
                self.assertIs(relay.local_listener(registry, listenerId), expected)


class HopJumpAndOrderTests(TwoNodeMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_jump_to_sshd_behind_initiator_on_b(self) -> Any:
        """ssh -J through node A to a real OpenSSH sshd behind an initiator on node B."""
        from tests.test_flows import JumpHostTests

        inner = self.key("inner")
        sshdPort = yield JumpHostTests.startSshd(self, inner + ".pub")  # type: ignore[arg-type]
        key = self.key("box")
        self.onNode("b", key, "box", "-N", "-R", f"22:127.0.0.1:{sshdPort}", stdin=None)
        listener = yield self.waitPort(22)
        cfg = os.path.join(self.dir, "jump_config")
        with open(cfg, "w") as handle:
            handle.write(
                f"Host switch\n    HostName 127.0.0.1\n    Port {self.nodes['a'].port}\n"
                f"    User client\n    IdentityFile {self.key('client')}\n"
                f"    UserKnownHostsFile {os.path.join(self.dir, 'known_hosts')}\n"
                "Host *\n    BatchMode yes\n    IdentitiesOnly yes\n    IdentityAgent none\n"
                "    StrictHostKeyChecking accept-new\n"
                f"    UserKnownHostsFile {os.path.join(self.dir, 'known_hosts_inner')}\n"
                "    ControlMaster no\n    ConnectTimeout 5\n"
            )
        argv = [SSH or "ssh", "-F", cfg, "-J", "switch", "-i", inner, "-l", "root"]
        proc = self.spawn(None, "", argv=[*argv, listener.connect_name, "echo", "jumped"])
        out, err, code = yield _timeout(proc.ended, 30, "ssh -J to finish")
        self.assertEqual((out, code), (b"jumped\n", 0), err)
        self.assertEqual(self.hopCount(), 1)

    @defer.inlineCallbacks
    def test_index_means_the_same_on_both_nodes(self) -> Any:
        """One alias held on A (older) and on B (newer): from either node ``shared~0`` is
        B's device and ``shared~1`` A's, crossing the hop whichever way is needed."""
        older = self.key("ka", options='access="initiate",alias="shared"')
        newer = self.key("kb", options='access="initiate",alias="shared"')
        self.onNode("a", older, "alpha", "-N", "-R", f"4000:127.0.0.1:{listen_echo(self, b'A:')}",
                    stdin=None)  # fmt: skip
        yield self.waitFor(lambda: len(self.registry.listeners()) == 1, 10, "alpha")
        self.onNode("b", newer, "beta", "-N", "-R", f"4000:127.0.0.1:{listen_echo(self, b'B:')}",
                    stdin=None)  # fmt: skip
        yield self.waitFor(lambda: len(self.registry.listeners()) == 2, 10, "beta")
        client = self.key("kc")
        for node in ("a", "b"):
            for target, expected in (("shared~0", b"B:hi"), ("shared~1", b"A:hi")):
                proc = self.onNode(node, client, "user2", "-W", f"{target}:4000", stdin=b"hi")
                out, err, code = yield _timeout(proc.ended, 20, f"{target} via {node}")
                self.assertEqual((out, code), (expected, 0), f"{target} via {node}: {err!r}")
        self.assertEqual(self.hopCount("b"), 1)  # A -> B for shared~0
        self.assertEqual(self.hopCount("a"), 1)  # B -> A for shared~1


class HopUnixSocketTests(TwoNodeMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_hop_over_unix_socket(self) -> Any:
        """Nodes on one machine may take hops on a Unix socket (still SSH, still the
        cluster key): relay_address ``unix:path=...``; 2 MiB cross intact."""
        sockdir = tempfile.mkdtemp(prefix="nc-hop-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, sockdir, True)
        path = os.path.join(sockdir, "relay-b.sock")
        port = reactor.listenUNIX(path, self.nodes["b"].factory.relay)
        self.addCleanup(port.stopListening)
        self.cluster.relays["b"] = f"unix:path={path}"
        _, listener = yield self.initiatorOnB()
        payload = os.urandom(2 << 20)
        out, err, code = yield self.ssh(
            self.key("client"), "client", "-W", f"{listener.connect_name}:8080", stdin=payload
        )
        self.assertEqual(
            (hashlib.sha256(out).digest(), code), (hashlib.sha256(payload).digest(), 0), err
        )
        self.assertEqual(self.hopCount(), 1)
