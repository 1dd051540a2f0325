"""A cluster as an operator runs it: a real redis-server and node PROCESSES.

Each node is ``python -m nuttconch --config ...`` with its own config, SSH port and
relay port, and the same host keys, alias secret, authorized_keys and cluster key
(one keys directory, as nodes on one machine share it).  Clients are the real
OpenSSH ``ssh`` (and curl, and a real sshd for ``-J``).  Every wait polls state
(a node's log, ``listeners`` over ssh, a process ending) up to a bound; nothing
sleeps a fixed time.  Nodes are stopped by pid.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import sys
import time
from typing import Any

from twisted.conch.ssh import keys
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from nuttconch import config as configmod
from nuttconch.circuit import OpenRefused
from nuttconch.cluster import relay
from nuttconch.cluster.registry import RedisRegistry
from nuttconch.registry import Listener

from .harness import (
    SSH,
    SSHProcess,
    _timeout,
    host_key_dir,
    listen_echo,
    make_key,
    require_ssh,
)
from .redisserver import RedisServer, free_port, wait_until
from .test_flows import CURL, ENV, SSH_KEYGEN, SSHD, is_listening, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class NodeProcess:
    """One node as a child process; its log is collected for the waits."""

    def __init__(self, name: str, ini: str, port: int, relay_port: int) -> None:
        self.name = name
        self.ini = ini
        self.port = port
        self.relay_port = relay_port
        self.proc = SSHProcess(None)
        self.extra: list[str] = []

    def start(self) -> None:
        env = {**ENV, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "nuttconch", "--config", self.ini, *self.extra]
        reactor.spawnProcess(self.proc, argv[0], argv, env=env, path=os.path.dirname(self.ini))

    @property
    def log(self) -> str:
        return (bytes(self.proc.out) + bytes(self.proc.err)).decode(errors="replace")

    def signal(self, name: str) -> None:
        if self.proc.code is None:
            self.proc.transport.signalProcess(name)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """SIGTERM by pid, then SIGKILL if it has not ended within 15 s."""
        if self.proc.code is not None:
            return
        self.signal("TERM")
        try:
            yield _timeout(self._ended(), 15, f"node {self.name} to stop")
        except AssertionError:
            self.signal("KILL")
            yield self._ended()

    def _ended(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        if self.proc.code is not None:
            d.callback(None)
        else:
            self.proc.ended.addBoth(lambda result: (d.callback(None), result)[1])
        return d


@implementer(IHalfCloseableProtocol)
class Exchange(protocol.Protocol):
    """Sends a payload, half-closes, and collects everything until the peer closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.got = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.got))


def exchange(port: int, payload: bytes, timeout: float = 60) -> defer.Deferred[bytes]:
    """Non-blocking TCP exchange with a local port (the reactor also runs the device)."""
    proto = Exchange(payload)
    d = protocol.ClientCreator(reactor, lambda: proto).connectTCP("127.0.0.1", port)
    d.addCallback(lambda _: proto.done)
    return _timeout(d, timeout, f"exchange with port {port}")


class Files(resource.Resource):
    """The device behind -D: GET serves a blob; POST answers the body's sha256."""

    isLeaf = True

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def render_GET(self, request: Any) -> bytes:
        return self.data

    def render_POST(self, request: Any) -> bytes:
        return sha(request.content.read()).encode()


class ClusterProcessMixin:
    """A redis-server and node processes sharing one keys directory and cluster key."""

    timeout = 180
    lease = "5"

    def setUp(self) -> Any:  # type: ignore[override]
        require_ssh()
        self.dir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.dir)
        self.redis = RedisServer(os.path.join(self.dir, "redis"))
        self.redis.start()
        self.addCleanup(self.redis.kill)  # type: ignore[attr-defined]
        self.keydir = os.path.join(self.dir, "keys")
        shutil.copytree(host_key_dir(), self.keydir)
        self.cluster_key = make_key(self.keydir, "cluster_key")[0]
        self.akfile = os.path.join(self.keydir, "authorized_keys")
        self.root = self.key("root", 'access="admin",access="list",access="listen"')
        self.nodes: dict[str, NodeProcess] = {}
        self.processes: list[SSHProcess] = []
        self.addCleanup(self._stopAll)  # type: ignore[attr-defined]

    def key(self, name: str, options: str | None = None) -> str:
        path, public = make_key(self.dir, name)
        if options is not None:
            with open(self.akfile, "a") as handle:
                handle.write(f"{options} {public} {name}\n")
        return path

    @defer.inlineCallbacks
    def _stopAll(self) -> Any:
        for proc in self.processes:
            if proc.code is None:
                yield proc.kill()
        for node in self.nodes.values():
            yield node.stop()

    def writeNode(self, name: str, port: int = 0, server: str = "", **cluster: str) -> NodeProcess:
        port, relay_port = port or free_port(), free_port()
        values = {
            "redis_url": self.redis.url,
            "node_name": name,
            "lease_time": self.lease,
            "relay_listen": str(relay_port),
            "relay_address": f"127.0.0.1:{relay_port}",
            "cluster_key_file": self.cluster_key,
            **cluster,
        }
        ini = os.path.join(self.dir, f"{name}.ini")
        with open(ini, "w") as handle:
            handle.write(
                "[server]\nlisten_host = 127.0.0.1\n"
                f"listen_port = {port}\nserver_fqdn = switchboard\n"
                "per_source_penalty_exempt_list = 127.0.0.1\n"
                + server
                + f"[keys]\nhost_key_dir = {self.keydir}\n[cluster]\n"
                + "".join(f"{k} = {v}\n" for k, v in values.items())
            )
        node = self.nodes[name] = NodeProcess(name, ini, port, relay_port)
        return node

    @defer.inlineCallbacks
    def startNodes(self, *names: str, **settings: Any) -> Any:
        """Start the nodes and wait until each says its replica is current."""
        for name in names:
            self.writeNode(name, **settings).start()
        for name in names:
            node = self.nodes[name]
            yield node.proc.waitOutput(b"is current", timeout=30)

    def sshArgs(self, node: str, key: str | None, user: str, *extra: str) -> list[str]:
        args = [
            SSH or "ssh",
            "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={os.path.join(self.dir, 'known_hosts')}",
            # One host key for the whole cluster: one known_hosts entry serves every node.
            "-o", "HostKeyAlias=nuttconch-cluster",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", "ControlMaster=no",
            "-o", "ConnectTimeout=10",
            "-o", "ExitOnForwardFailure=yes",
            "-p", str(self.nodes[node].port),
        ]  # fmt: skip
        if key:
            args += ["-i", key]
        return [*args, "-l", user, *extra]

    def spawn(self, argv: list[str], stdin: bytes | None = b"") -> SSHProcess:
        proc = SSHProcess(stdin)
        reactor.spawnProcess(proc, argv[0], argv, env=ENV)
        self.processes.append(proc)
        return proc

    def ssh(
        self, node: str, key: str | None, user: str, *extra: str, stdin: bytes = b"",
        timeout: float = 60,
    ) -> defer.Deferred[tuple[bytes, bytes, int]]:  # fmt: skip
        proc = self.spawn(self.sshArgs(node, key, user, *extra), stdin)
        return _timeout(proc.ended, timeout, f"ssh via node {node} to exit")

    @defer.inlineCallbacks
    def listeners(self, node: str) -> Any:
        """``listeners`` over ssh on ``node``: [(name, node column, ports)]."""
        out, err, code = yield self.ssh(node, self.root, "root", "127.0.0.1", "listeners")
        if code != 0:
            raise AssertionError(f"listeners on {node}: {err!r}")
        rows = [line.split() for line in out.decode().splitlines()[1:] if line.strip()]
        return [(row[0], row[-1], row[-2]) for row in rows]

    @defer.inlineCallbacks
    def waitListed(self, node: str, predicate: Any, timeout: float = 20, what: str = "") -> Any:
        """Poll ``listeners`` over ssh on ``node`` until ``predicate(rows)`` is true."""
        deadline = time.monotonic() + timeout
        rows: Any = None
        while True:
            rows = yield self.listeners(node)
            if predicate(rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s on {node}: {what}; {rows}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def initiator(self, node: str, user: str, key: str, *forwards: str) -> Any:
        """``ssh -N -R`` on ``node``; fires (process, connect name) once the node lists it."""
        argv = self.sshArgs(node, key, user, "-N")
        for fwd in forwards:
            argv += ["-R", fwd]
        proc = self.spawn([*argv, "127.0.0.1"], None)
        rows = yield self.waitListed(
            node, lambda rows: any(r[0].startswith(f"{user}-") for r in rows), 20, f"{user} up"
        )
        return proc, [r[0] for r in rows if r[0].startswith(f"{user}-")][0]

    @defer.inlineCallbacks
    def onePerWorker(self, node: str, count: int) -> Any:
        """Initiators on the shared port until ``count`` workers each hold one (new source
        ports; a second one on a worker that has one is dropped): {name: node column}."""
        holders: dict[str, str] = {}
        for attempt in range(40):
            user = f"dev{attempt}"
            key = self.key(user, 'access="initiate"')
            tag = f"{user}:".encode()
            proc, name = yield self.initiator(
                node, user, key, f"80:127.0.0.1:{listen_echo(self, tag)}"
            )
            rows = yield self.waitListed(node, lambda rows, n=name: n in [r[0] for r in rows])
            holder = [r[1] for r in rows if r[0] == name][0]
            if holder in holders.values():
                yield proc.kill()
                yield self.waitListed(
                    node, lambda rows, n=name: n not in [r[0] for r in rows], 10, "gone"
                )
                continue
            holders[name] = holder
            if len(holders) == count:
                break
        return holders

    @defer.inlineCallbacks
    def reachEach(self, node: str, holders: dict[str, str]) -> Any:
        """Four clients on the shared port reach each initiator (some land on each worker)."""
        me = self.key("me", 'access="listen"')
        for name in holders:
            user = name.split("-")[0]
            for _ in range(4):
                out, err, code = yield self.ssh(
                    node, me, "me", "-W", f"{name}:80", "127.0.0.1", stdin=b"ping"
                )
                self.assertEqual((out, code), (f"{user}:ping".encode(), 0), err)  # type: ignore[attr-defined]


class CrossNodeFlowTests(ClusterProcessMixin, unittest.TestCase):
    """-R on node b; -W, -L, -J and -D through node a, across the hop, bytes intact."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        yield self.startNodes("a", "b")

    @defer.inlineCallbacks
    def deviceOnB(self, target_port: int, user: str = "dev", port: int = 80) -> Any:
        key = self.key(user, 'access="initiate"')
        proc, name = yield self.initiator("b", user, key, f"{port}:127.0.0.1:{target_port}")
        # The name is in a's replica: a's own listeners view says it is held on b.
        yield self.waitListed("a", lambda rows: (name, "b", str(port)) in rows, 10, "a sees it")
        return proc, name

    @defer.inlineCallbacks
    def test_w_and_l_cross_the_hop_intact(self) -> Any:
        """-W (4 MiB each way) and -L (3 MiB each way, half-closed) via node a reach an
        echo device behind node b; sha256 equal; node a logs hop circuits."""
        _, name = yield self.deviceOnB(listen_echo(self))
        me = self.key("me", 'access="listen"')
        payload = blob(4 * MiB, 1)
        out, err, code = yield self.ssh(
            "a", me, "me", "-W", f"{name}:80", "127.0.0.1", stdin=payload
        )
        self.assertEqual((code, sha(out), len(out)), (0, sha(payload), len(payload)), err)
        local = free_port()
        fwd = self.spawn(
            self.sshArgs("a", me, "me", "-N", "-L", f"{local}:{name}:80", "127.0.0.1"), None
        )
        yield wait_until(lambda: is_listening(local), 15, "-L port")
        payload = blob(3 * MiB, 2)
        got = yield exchange(local, payload)
        self.assertEqual((sha(got), len(got)), (sha(payload), len(payload)))
        yield fwd.kill()
        # Both circuits were relayed by node b for node a ("ORIGIN via node a").
        self.assertGreaterEqual(self.nodes["b"].log.count("via node a"), 2, self.nodes["b"].log)

    @defer.inlineCallbacks
    def test_socks_through_a_to_device_on_b(self) -> Any:
        """ssh -D on node a, curl --socks5-hostname by name: 4 MiB down and 4 MiB up."""
        curl = require(CURL, "curl")
        data = blob(4 * MiB, 3)
        site = reactor.listenTCP(0, server.Site(Files(data)), interface="127.0.0.1")
        self.addCleanup(site.stopListening)
        _, name = yield self.deviceOnB(site.getHost().port, port=8080)
        me = self.key("me", 'access="listen"')
        socks = free_port()
        self.spawn(self.sshArgs("a", me, "me", "-N", "-D", f"127.0.0.1:{socks}", "127.0.0.1"), None)
        yield wait_until(lambda: is_listening(socks), 15, "-D port")
        down = os.path.join(self.dir, "down")
        up = os.path.join(self.dir, "up")
        with open(up, "wb") as handle:
            handle.write(blob(4 * MiB, 4))
        base = [curl, "-sS", "--max-time", "60", "--socks5-hostname", f"127.0.0.1:{socks}"]
        proc = self.spawn([*base, "-o", down, f"http://{name}:8080/"], None)
        _, err, code = yield _timeout(proc.ended, 90, "curl GET")
        self.assertEqual(code, 0, err)
        with open(down, "rb") as handle:
            self.assertEqual(sha(handle.read()), sha(data))
        proc = self.spawn([*base, "--data-binary", f"@{up}", f"http://{name}:8080/"], None)
        out, err, code = yield _timeout(proc.ended, 90, "curl POST")
        with open(up, "rb") as handle:
            self.assertEqual((code, out.decode()), (0, sha(handle.read())), err)

    @defer.inlineCallbacks
    def test_jump_through_a_to_sshd_behind_b(self) -> Any:
        """ssh -J node-a root@NAME runs a command on a real sshd behind an initiator on b."""
        inner = self.key("inner")
        sshd_port = yield self.startSshd(inner + ".pub")
        _, name = yield self.deviceOnB(sshd_port, user="box", port=22)
        jumper = self.key("jumper", 'access="listen"')
        cfg = os.path.join(self.dir, "jump_config")
        with open(cfg, "w") as handle:
            handle.write(
                "Host switch\n    HostName 127.0.0.1\n"
                f"    Port {self.nodes['a'].port}\n    User jumper\n"
                f"    IdentityFile {jumper}\n    HostKeyAlias nuttconch-cluster\n"
                f"    UserKnownHostsFile {os.path.join(self.dir, 'known_hosts')}\n"
                "Host *\n    BatchMode yes\n    IdentitiesOnly yes\n    IdentityAgent none\n"
                "    StrictHostKeyChecking accept-new\n"
                f"    UserKnownHostsFile {os.path.join(self.dir, 'known_hosts_inner')}\n"
                "    ControlMaster no\n    ConnectTimeout 10\n"
            )
        argv = [SSH or "ssh", "-F", cfg, "-J", "switch", "-i", inner, "-l", "root", name]
        proc = self.spawn([*argv, "echo", "jumped"], b"")
        out, err, code = yield _timeout(proc.ended, 60, "ssh -J")
        self.assertEqual((out, code), (b"jumped\n", 0), err)

    @defer.inlineCallbacks
    def startSshd(self, user_key_pub: str) -> Any:
        sshd = require(SSHD, "openssh-server (/usr/sbin/sshd)")
        keygen = require(SSH_KEYGEN, "ssh-keygen")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        home = os.path.join(self.dir, "sshd")
        os.makedirs(home)
        hostkey = os.path.join(home, "ssh_host_ed25519_key")
        proc = self.spawn([keygen, "-q", "-t", "ed25519", "-N", "", "-f", hostkey], None)
        yield _timeout(proc.ended, 30, "ssh-keygen")
        authorized = os.path.join(home, "authorized_keys")
        shutil.copy(user_key_pub, authorized)
        port = free_port()
        cfg = os.path.join(home, "sshd_config")
        with open(cfg, "w") as handle:
            handle.write(
                f"ListenAddress 127.0.0.1:{port}\nHostKey {hostkey}\n"
                f"AuthorizedKeysFile {authorized}\nPidFile none\nUsePAM no\nStrictModes no\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUseDNS no\n"
            )
        proc = self.spawn([sshd, "-D", "-e", "-f", cfg], None)
        yield proc.waitOutput(b"Server listening on", timeout=15)
        return port


class CrossNodeOrderTests(ClusterProcessMixin, unittest.TestCase):
    """One alias held on three nodes: name~N is the same holder from every node."""

    @defer.inlineCallbacks
    def test_index_across_three_nodes(self) -> Any:
        """Holders join on a, then b, then c; from each node shared~0 is c's device,
        shared~1 b's and shared~2 a's (newest first), each reached over its own hop or
        locally; the figures are the devices' tags read through the circuit."""
        yield self.startNodes("a", "b", "c")
        for node in ("a", "b", "c"):
            key = self.key(f"k{node}", 'access="initiate",alias="shared"')
            device = listen_echo(self, f"device-{node}:".encode())
            yield self.initiator(node, f"h{node}", key, f"80:127.0.0.1:{device}")
            # Wait for every node to list it before the next joins: that fixes the order.
            for other in ("a", "b", "c"):
                yield self.waitListed(
                    other,
                    lambda rows, n=node: any(r[0].startswith(f"h{n}-") for r in rows),
                    10,
                    f"h{node} listed",
                )
        me = self.key("me", 'access="listen"')
        seen = {}
        for via in ("a", "b", "c"):
            for index, holder in enumerate(("c", "b", "a")):
                out, err, code = yield self.ssh(
                    via, me, "me", "-W", f"shared~{index}:80", "127.0.0.1", stdin=b"ping"
                )
                seen[(via, index)] = out
                self.assertEqual((out, code), (f"device-{holder}:ping".encode(), 0), err)
        self.assertEqual(len(seen), 9)


class NodeDeathTests(ClusterProcessMixin, unittest.TestCase):
    """A node that dies or stops: its names go everywhere, its hop circuits end, and the
    other node's own circuits go on."""

    @defer.inlineCallbacks
    def stopB(self, signal: str, bound: float) -> Any:
        """A client on a has a circuit through the hop to a device on b, and one to a
        device on a; b gets ``signal`` by pid. Fires (circuit end, names gone) in seconds."""
        yield self.startNodes("a", "b")
        key = self.key("dev", 'access="initiate"')
        _, name = yield self.initiator("b", "dev", key, f"80:127.0.0.1:{listen_echo(self)}")
        yield self.waitListed("a", lambda rows: (name, "b", "80") in rows, 10, "a sees dev")
        local_key = self.key("loc", 'access="initiate"')
        local_fwd = f"81:127.0.0.1:{listen_echo(self)}"
        _, local_name = yield self.initiator("a", "loc", local_key, local_fwd)
        me = self.key("me", 'access="listen"')
        crossing = self.spawn(self.sshArgs("a", me, "me", "-W", f"{name}:80", "127.0.0.1"), None)
        crossing.transport.write(b"before\n")
        yield crossing.waitOutput(b"before\n", timeout=15)
        own = self.spawn(self.sshArgs("a", me, "me", "-W", f"{local_name}:81", "127.0.0.1"), None)
        own.transport.write(b"own\n")
        yield own.waitOutput(b"own\n", timeout=15)
        stopped_at = time.monotonic()
        self.nodes["b"].signal(signal)
        yield _timeout(crossing.ended, 15, "the crossing ssh -W to end")
        circuit_end = time.monotonic() - stopped_at
        rows = yield self.waitListed(
            "a", lambda rows: all(r[1] != "b" for r in rows), bound, "b's names gone"
        )
        names_gone = time.monotonic() - stopped_at
        self.assertEqual([r[0] for r in rows], [local_name])
        self.assertLess(names_gone, bound)
        own.transport.write(b"still\n")
        yield own.waitOutput(b"still\n", timeout=15)
        self.assertIsNone(own.code)
        # A new open to b's name is refused by name, not hung.
        out, err, code = yield self.ssh("a", me, "me", "-W", f"{name}:80", "127.0.0.1")
        self.assertEqual(code, 255)
        self.assertIn(b"no such listener", err)
        print(f"\nSIG{signal} of node b: hop circuit ended after {circuit_end:.2f} s;"
              f" names gone on a after {names_gone:.2f} s (lease {self.lease} s)")  # fmt: skip
        return circuit_end, names_gone

    def test_sigkilled_node_names_gone_and_hop_circuit_closed(self) -> Any:
        """SIGKILL: the crossing ssh -W ends, b's names leave a's listeners within 10 s
        (the default 5 s lease), a's own circuit goes on."""
        return self.stopB("KILL", 10)

    def test_stopped_node_names_gone_at_once(self) -> Any:
        """SIGTERM (a graceful stop): b leaves Redis and closes its hops, so its names
        leave a within 2 s, well before its 5 s lease could lapse."""
        return self.stopB("TERM", 2)


class ReusePortWorkersTests(ClusterProcessMixin, unittest.TestCase):
    """Two node processes on one SSH port ([server] reuse_port), one cluster."""

    @defer.inlineCallbacks
    def test_two_reuse_port_workers_in_one_cluster(self) -> Any:
        """Both workers accept connections on the shared port (the kernel spreads them),
        and an initiator registered with either is reached from a client on the shared
        port, whichever worker that client lands on (through the hop or not)."""
        port = free_port()
        yield self.startNodes("w1", "w2", port=port, server="reuse_port = true\n")
        self.nodes["shared"] = self.nodes["w1"]  # ssh to the shared port
        holders = yield self.onePerWorker("shared", 2)
        self.assertEqual(sorted(holders.values()), ["w1", "w2"], "both workers accept")
        for worker in ("w1", "w2"):
            self.assertIn("authenticated", self.nodes[worker].log)
        yield self.reachEach("shared", holders)


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free on 127.0.0.1 (bounded tries)."""
    for _ in range(50):
        first = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first
    raise AssertionError("no two consecutive free ports")


class WorkersCommandTests(ClusterProcessMixin, unittest.TestCase):
    """``nuttconch --workers 2`` with a [cluster] config: one node per worker."""

    @defer.inlineCallbacks
    def test_workers_command_makes_one_node_per_worker(self) -> Any:
        """Each worker joins as NAME-wN with its own relay port (the configured one plus
        N - 1), so neither waits on the other's lease; an initiator registered with either
        worker is reached by clients on the shared port."""
        port, relay = free_port(), free_port_pair()
        node = self.writeNode(
            "fleet",
            port=port,
            server="reuse_port = true\n",
            relay_listen=str(relay),
            relay_address=f"127.0.0.1:{relay}",
        )
        node.extra = ["--workers", "2"]
        node.start()
        deadline = time.monotonic() + 60
        while node.log.count("is current") < 2:
            self.assertLess(time.monotonic(), deadline, f"two workers joined: {node.log[-2000:]}")
            yield task.deferLater(reactor, 0.1, lambda: None)
        holders = yield self.onePerWorker("fleet", 2)
        self.assertEqual(sorted(holders.values()), ["fleet-w1", "fleet-w2"])
        yield self.reachEach("fleet", holders)


class HopAccessProcessTests(ClusterProcessMixin, unittest.TestCase):
    """The hop is refused on a node's public port, and the relay port refuses other keys."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        yield self.startNodes("a")

    def pool(self, address: str, key_path: str) -> relay.HopPool:
        """A hop pool as another node would have, dialling ``address``."""

        class Addresses:
            def relay_address(self, node: str) -> str:
                return address

        cfg = configmod.load(self.nodes["a"].ini)
        host_keys = [
            keys.Key.fromFile(os.path.join(self.keydir, name))
            for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key", "ssh_host_ecdsa_key")
        ]
        pool = relay.HopPool("x", Addresses(), keys.Key.fromFile(key_path), host_keys, cfg)
        self.addCleanup(pool.closeAll)
        return pool

    @defer.inlineCallbacks
    def test_hop_refused_on_public_port_and_for_other_keys(self) -> Any:
        """Table: (where, key) -> the refusal the dialling node gets."""
        other = make_key(self.dir, "other")[0]
        public, relay_port = (
            f"127.0.0.1:{self.nodes['a'].port}",
            f"127.0.0.1:{self.nodes['a'].relay_port}",
        )
        only = "the relay port accepts only the cluster key"
        table = [
            (public, self.cluster_key, "unknown channel type hop@nuttconch"),
            (relay_port, other, only),
            (relay_port, self.root, only),  # authorized on the public port, not here
            (relay_port, self.cluster_key, "not held on node a"),  # the control: it logs in
        ]
        for address, key_path, expected in table:
            pending = self.pool(address, key_path).open("a", "a/none.1", 80, ("127.0.0.1", 1))
            failure = yield _timeout(
                self.assertFailure(pending.opened, OpenRefused), 20, f"hop via {address}"
            )
            self.assertIn(expected, failure.message, (address, key_path))

    @defer.inlineCallbacks
    def test_openssh_user_key_refused_on_relay_port(self) -> Any:
        """An authorized user key cannot log in on the relay port; ssh shows the reason."""
        args = self.sshArgs("a", self.root, "root", "-N", "127.0.0.1")
        args[args.index("-p") + 1] = str(self.nodes["a"].relay_port)
        proc = self.spawn(args, b"")
        out, err, code = yield _timeout(proc.ended, 30, "ssh to the relay port")
        self.assertEqual(code, 255)
        self.assertIn(b"the relay port accepts only the cluster key", err)


class RedisRegistryHopContractTests(unittest.TestCase):
    """RedisRegistry provides what the hop needs (relay.IClusterRegistry), in-process."""

    timeout = 60

    def setUp(self) -> Any:
        self.redis = RedisServer(os.path.abspath(self.mktemp()))
        self.redis.start()
        self.addCleanup(self.redis.kill)
        self.regs = []
        for node, address in (("a", "tcp:127.0.0.1:7001"), ("b", "")):
            registry = RedisRegistry(
                self.redis.url, node, lease=2, timeout=1, info={"relay": address}
            )
            registry.startService()
            self.addCleanup(lambda r=registry: r.stopService() if r.running else None)
            self.regs.append(registry)
        return wait_until(lambda: all(r.healthy for r in self.regs), 10, "join")

    def test_provides_icluster_registry(self) -> None:
        """relay.install() wires the hop only for a registry that declares it."""
        self.assertTrue(relay.IClusterRegistry.providedBy(self.regs[0]))

    @defer.inlineCallbacks
    def test_relay_address_table(self) -> Any:
        """node -> the relay address its lease carries (None: no relay, or no such node)."""
        a, b = self.regs
        for node, expected in (("a", "tcp:127.0.0.1:7001"), ("b", None), ("zz", None)):
            for registry in (a, b):
                got = yield registry.relay_address(node)
                self.assertEqual(got, expected, (registry.node, node))
        yield b.stopService()
        got = yield a.relay_address("b")
        self.assertIsNone(got)

    @defer.inlineCallbacks
    def test_local_listener_and_remote_opener(self) -> Any:
        """local_listener finds only this node's live listeners; with a hop pool
        installed, another node's listener opens through the hop and kicks via Redis."""
        a, b = self.regs
        listener = Listener("dev", ("dev-1",))
        b.add_port(listener, "localhost", 80)
        yield wait_until(lambda: a.listeners(), 10, "a sees b's listener")
        pool = relay.HopPool("a", a, _ed25519(), [], None)
        a.remote_opener = lambda _registry, remote: relay.RemoteOpener(
            pool, remote.node, remote.id, a.kick_remote
        )
        yield a._snapshot()  # the replica again, with the hop's openers
        table = [
            (b, listener.id, listener),
            (a, listener.id, None),
            (b, "b/none.1", None),
        ]
        for registry, regid, expected in table:
            self.assertIs(registry.local_listener(regid), expected, (registry.node, regid))
        remote = a.find("dev-1")
        self.assertIsInstance(remote.opener, relay.RemoteOpener)
        self.assertEqual((remote.opener.node, remote.opener.listenerId), ("b", listener.id))
        self.assertTrue(remote.opener.disconnect("test"))  # published for b to apply


def _ed25519() -> keys.Key:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return keys.Key(ed25519.Ed25519PrivateKey.generate())
