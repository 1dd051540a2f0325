"""Issue 11.7: cross-node vs same-node circuits (setup latency, bulk throughput).

Two nodes, A and B, run in this one process with a shared in-memory registry
(nuttconch.cluster.relay.MemoryCluster) and the real hop between them over
loopback TCP; the clients and initiators are the real OpenSSH ``ssh``.

- setup: one ``ssh -N -L`` client on node A; N TCP connections to its local
  port, one after another, each a new circuit; the figure is the server's own
  circuit-open latency (from the client's open to the far end's confirmation,
  the ``circuit.open`` event), with the hop already up (warm).
- bulk: SIZE bytes sent through ``-L`` to a device that discards them and says
  ``done`` after EOF; the time from the first byte to ``done``.

Same-node: the initiator is on A.  Cross-node: the initiator is on B, so every
byte crosses A -> hop -> B.  Runs alternate (same, cross, same, cross, ...).

What limits the figures: both nodes share this process and so one core (in a
real cluster each node has its own process), the ssh clients, the initiator
and the device take the other core; on loopback there is no network latency.

    /work/venv/bin/python bench/cluster_hop.py [--circuits 200] [--size 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.conch.ssh import keys  # noqa: E402
from twisted.internet import defer, protocol, reactor, task  # noqa: E402

from nuttconch import config as configmod  # noqa: E402
from nuttconch.cluster import relay  # noqa: E402
from nuttconch.tap import build  # noqa: E402
from tests.harness import host_key_dir, make_key  # noqa: E402

SSH = shutil.which("ssh") or "ssh"


class Sink(protocol.Protocol):
    """The device: discards what it gets; after EOF says ``done`` and closes."""

    def connectionMade(self) -> None:
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from zope.interface import directlyProvides

        directlyProvides(self, IHalfCloseableProtocol)
        self.got = 0

    def dataReceived(self, data: bytes) -> None:
        self.got += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(b"done")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Sender(protocol.Protocol):
    """Sends ``size`` bytes, half-closes, waits for ``done``."""

    def __init__(self, size: int, done: defer.Deferred[float]) -> None:
        self.size = size
        self.done = done
        self.reply = b""

    def connectionMade(self) -> None:
        self.started = time.perf_counter()
        self.left = self.size
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()
            return
        chunk = min(self.left, 1 << 20)
        self.transport.write(b"\0" * chunk)
        self.left -= chunk

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.reply += data
        if self.reply.endswith(b"done") and not self.done.called:
            self.done.callback(time.perf_counter() - self.started)

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.errback(RuntimeError(f"closed before done: {reason.getErrorMessage()}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bench:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.keydir = os.path.join(tmp, "keys")
        shutil.copytree(host_key_dir(), self.keydir)
        self.cluster = relay.MemoryCluster()
        self.clusterKey = keys.Key.fromFile(make_key(tmp, "cluster")[0])
        self.nodes: dict[str, Any] = {}
        self.latencies: dict[str, list[float]] = {}
        self.procs: list[Any] = []
        self.phase = "warmup"

    def startNode(self, name: str) -> None:
        path = os.path.join(self.tmp, "nuttssh.ini")
        with open(path, "w") as handle:
            handle.write(
                "[server]\nlisten_host = 127.0.0.1\nlisten_port = 0\nserver_fqdn = bench\n"
                "per_source_penalty_exempt_list = 127.0.0.1\n"
                f"[keys]\nhost_key_dir = {self.keydir}\n"
                "[log]\nlevel = warn\n"
            )
        cfg = configmod.load(path)
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
        factory.observers.append(self._event)
        self.nodes[name] = (factory, port.getHost().port)

    def _event(self, event: str, fields: dict[str, Any]) -> None:
        if event == "circuit.open":
            self.latencies.setdefault(self.phase, []).append(fields["latency"])

    def ssh(self, node: str, user: str, *args: str) -> Any:
        key = make_key(self.tmp, user)[0]
        argv = [
            SSH, "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.tmp}/kh", "-o", "StrictHostKeyChecking=no",
            "-o", "LogLevel=error", "-o", "ExitOnForwardFailure=yes",
            "-p", str(self.nodes[node][1]), "-i", key, "-N", *args, "-l", user, "127.0.0.1",
        ]  # fmt: skip
        proc = reactor.spawnProcess(protocol.ProcessProtocol(), SSH, argv, env=dict(os.environ))
        self.procs.append(proc)
        return proc

    @defer.inlineCallbacks
    def waitFor(self, predicate: Any, what: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def setup(self) -> Any:
        self.startNode("a")
        self.startNode("b")
        sink = protocol.Factory.forProtocol(Sink)
        dev = reactor.listenTCP(0, sink, interface="127.0.0.1").getHost().port
        self.ssh("a", "deva", "-R", f"9000:127.0.0.1:{dev}")
        self.ssh("b", "devb", "-R", f"9000:127.0.0.1:{dev}")
        yield self.waitFor(lambda: len(self.cluster.core.listeners()) == 2, "both initiators")
        self.local: dict[str, int] = {}
        for listener in self.cluster.core.listeners():
            kind = "same" if listener.node == "a" else "cross"
            self.local[kind] = free_port()
            self.ssh("a", "client", "-L", f"{self.local[kind]}:{listener.connect_name}:9000")
        for kind, port in self.local.items():
            yield self.waitFor(lambda p=port: self.canConnect(p), f"-L for {kind}")

    def canConnect(self, port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    @defer.inlineCallbacks
    def transfer(self, kind: str, size: int) -> Any:
        done: defer.Deferred[float] = defer.Deferred()
        yield protocol.ClientCreator(reactor, Sender, size, done).connectTCP(
            "127.0.0.1", self.local[kind]
        )
        seconds = yield done
        return seconds

    @defer.inlineCallbacks
    def run(self, circuits: int, size: int, runs: int) -> Any:
        yield self.setup()
        self.phase = "warmup"
        for kind in ("same", "cross"):
            yield self.transfer(kind, 1024)
        for kind in ("same", "cross") * runs:
            self.phase = kind
            for _ in range(circuits // runs):
                yield self.transfer(kind, 16)
        rates: dict[str, list[float]] = {"same": [], "cross": []}
        self.phase = "bulk"
        for kind in ("same", "cross") * runs:
            seconds = yield self.transfer(kind, size)
            rates[kind].append(size / seconds / (1 << 20))
        hops = sum(1 for t in self.nodes["b"][0].relay.transports if hasattr(t, "avatar"))
        print(f"hop connections A->B: {hops}")
        print(f"{'row':42} {'median':>10} {'min-max':>20}")
        for kind in ("same", "cross"):
            ms = [x * 1000 for x in self.latencies[kind]]
            print(
                f"{kind + '-node circuit setup, ms (n=' + str(len(ms)) + ')':42}"
                f" {statistics.median(ms):10.3f} {min(ms):9.3f}-{max(ms):9.3f}"
            )
        for kind in ("same", "cross"):
            r = rates[kind]
            print(
                f"{kind + '-node bulk, MiB/s (' + str(size >> 20) + ' MiB x' + str(runs) + ')':42}"
                f" {statistics.median(r):10.1f} {min(r):9.1f}-{max(r):9.1f}"
            )
        ratio = statistics.median(rates["cross"]) / statistics.median(rates["same"])
        print(f"{'cross/same bulk ratio':42} {ratio:10.2f}")

    def stop(self) -> None:
        for proc in self.procs:
            try:
                proc.signalProcess("TERM")
            except Exception:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--circuits", type=int, default=200, help="setup samples per kind")
    parser.add_argument("--size", type=int, default=256, help="MiB per bulk transfer")
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="nuttconch-hop-bench-")
    bench = Bench(tmp)

    @defer.inlineCallbacks
    def go(_: Any) -> Any:
        try:
            yield bench.run(args.circuits, args.size << 20, args.runs)
        finally:
            bench.stop()
            yield task.deferLater(reactor, 0.2, lambda: None)

    try:
        task.react(go)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
