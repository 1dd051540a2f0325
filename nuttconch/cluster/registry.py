# -*- test-case-name: tests.test_cluster_registry -*-
"""The shared registry: every node's listeners in Redis, resolved from a local replica.

``resolve`` must stay synchronous (Conch answers a global request at once,
and commands, metrics and the page read ``listeners()`` in one go), so each
node keeps a replica of every registration: a snapshot taken in one Lua
call, then kept current by following a Redis Stream on its own connection.

Every change is one Lua script, so it is atomic and ordered in the log:

- ``PUT`` takes the global order value (``INCR seq``) for a new registration,
  or reuses the one it had, raising ``seq`` to at least that value: after
  Redis lost its data, re-asserted registrations keep their old order and
  ``name~0`` stays the newest holder across all nodes.
- ``BEAT`` renews this node's lease and returns the store's epoch (a random
  token written once per store lifetime); a missing lease or a new epoch
  means Redis lost what this node holds, and the node re-asserts it.
- ``REAP`` (any node, every second) drops the registrations of nodes whose
  lease lapsed.  ``LEAVE`` drops a node's own at a graceful stop.

Only this node's listeners are reported to observers, so webhooks and
gauges fire once per event in the cluster, on the node that owns it.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from ..circuit import IOpener, OpenRefused
from ..names import escape
from ..registry import Listener, RegistryBase, claim_port, pick_holder
from .redisclient import RedisClient, RedisUnavailable
from .relay import IClusterRegistry

log = Logger()

#: Stream entries kept; a replica further behind than this takes a new snapshot.
LOG_MAXLEN = 100000
#: How long one XREAD blocks, in ms: short, because a BLOCK outlives a cancelled call.
BLOCK_MS = 1000

#: Lua: entries ever added to the log, and how many of them were trimmed away since.
STREAM_COUNTS = """
local function stream_counts(key)
  if redis.call('EXISTS', key) == 0 then return 0, 0 end
  local info = redis.call('XINFO', 'STREAM', key)
  local length, added = 0, 0
  for i = 1, #info, 2 do
    if info[i] == 'length' then length = info[i + 1] end
    if info[i] == 'entries-added' then added = info[i + 1] end
  end
  return added, added - length
end
"""

PUT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('NOLEASE lease lapsed') end
local seq = tonumber(ARGV[4])
if seq > 0 then
  local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
  if cur < seq then redis.call('SET', KEYS[1], seq) end
else
  seq = redis.call('INCR', KEYS[1])
end
local val = seq .. ' ' .. ARGV[3]
redis.call('HSET', KEYS[3], ARGV[2], val)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*',
           'op', 'put', 'node', ARGV[1], 'reg', ARGV[2], 'val', val)
return seq
"""

DEL = """
if redis.call('HDEL', KEYS[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'op', 'del', 'node', ARGV[1],
             'reg', ARGV[2])
end
return 1
"""

BEAT = (
    STREAM_COUNTS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  redis.call('SET', KEYS[3], ARGV[4])
  epoch = ARGV[4]
end
-- Every node carries the highest order value it has seen: after Redis lost its data a
-- new registration must not take a value that another node is about to re-assert.
local floor = tonumber(ARGV[7])
if tonumber(redis.call('GET', KEYS[6]) or '0') < floor then redis.call('SET', KEYS[6], floor) end
local had = redis.call('EXISTS', KEYS[1])
-- The lease names the process that holds it: another process with this node name (or
-- this node's previous life, killed less than a lease ago) keeps this one out.
if had == 1 then
  local cur = redis.call('GET', KEYS[1])
  if string.sub(cur, 1, #ARGV[8] + 1) ~= ARGV[8] .. ' ' then return {2, epoch} end
end
if had == 0 and ARGV[5] == '0' then return {0, epoch} end
if had == 0 then
  redis.call('DEL', KEYS[5])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'op', 'down', 'node', ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[8] .. ' ' .. ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
local _, trimmed = stream_counts(KEYS[4])
return {1, epoch, trimmed}
"""
)

REAP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = {}
for _, node in ipairs(dead) do
  if redis.call('EXISTS', ARGV[1] .. 'node:' .. node) == 0 then
    redis.call('DEL', ARGV[1] .. 'reg:' .. node)
    redis.call('ZREM', KEYS[1], node)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'op', 'down', 'node', node)
    table.insert(gone, node)
  end
end
return gone
"""

LEAVE = """
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'op', 'down', 'node', ARGV[1])
return 1
"""

IDENTITY = """
local out = {}
for i = 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  table.insert(out, redis.call('HGET', KEYS[1], ARGV[i]))
end
return out
"""

#: What every node must share, as a description for the refusal message.
IDENTITY_WHAT = {
    "alias": "alias secret (keys/alias_secret: generated aliases would differ between nodes)",
    "hostkeys": "host keys (clients would see a different host key on each node)",
}


def identity_of(secret: bytes, host_keys: dict[bytes, Any]) -> dict[str, str]:
    """What a node publishes so that nodes can check they agree, without the secret itself.

    The alias secret appears only as an HMAC under itself of a fixed text:
    equal secrets give equal values, and the value does not let anyone
    compute aliases.  Host keys appear as their public fingerprints.
    """
    import hashlib
    import hmac

    from twisted.conch.ssh.keys import FingerprintFormats

    check = hmac.new(secret, b"nuttconch cluster alias secret check", hashlib.sha256).hexdigest()
    prints = sorted(key.fingerprint(FingerprintFormats.SHA256_BASE64) for key in host_keys.values())
    return {"alias": check, "hostkeys": " ".join(prints)}


SNAPSHOT = (
    STREAM_COUNTS
    + """
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local lastid = '0-0'
if #last > 0 then lastid = last[1][1] end
local added = stream_counts(KEYS[2])
local out = {lastid, redis.call('GET', KEYS[3]) or '', added}
for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  table.insert(out, node)
  table.insert(out, redis.call('HGETALL', ARGV[1] .. 'reg:' .. node))
end
return out
"""
)


def default_node_name() -> str:
    """The host name, cut to what node_name accepts."""
    name = socket.gethostname().split(".")[0]
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "-" for ch in name)
    return cleaned[:63] or "node"


@implementer(IOpener)
class RemoteOpener:
    """A listener held on another node: kicks go through Redis, circuits need the hop.

    The hop (another module) replaces ``RedisRegistry.remote_opener`` with one
    that opens circuits; until then a circuit to another node's listener is
    refused with a message that says where the listener is.
    """

    def __init__(self, registry: RedisRegistry, listener: Listener) -> None:
        self.registry = registry
        self.node = listener.node
        self.listener_id = listener.id

    def openForwarded(self, bindHost: str, port: int, origin: tuple[str, int]) -> Any:
        from twisted.conch.ssh.connection import OPEN_CONNECT_FAILED

        raise OpenRefused(
            OPEN_CONNECT_FAILED, f"held on node {self.node}, which this node has no hop to"
        )

    def disconnect(self, reason: str) -> bool:
        """Ask the owning node, through the log, to drop the listener's connection."""
        return self.registry.kick_remote(self.node, self.listener_id, reason)


def _encode(listener: Listener) -> str:
    return json.dumps(
        {
            "h": listener.hostname,
            "a": list(listener.aliases),
            "p": {str(port): host for port, host in listener.ports.items()},
            "peer": listener.peer,
            "fp": listener.fingerprint,
            "since": listener.connected_since,
        },
        separators=(",", ":"),
    )


def _decode(node: str, regid: str, value: str) -> Listener:
    seq_text, _, body = value.partition(" ")
    data = json.loads(body)
    listener = Listener(
        str(data["h"]),
        tuple(str(a) for a in data["a"]),
        peer=str(data.get("peer", "")),
        fingerprint=str(data.get("fp", "")),
        opener=None,
    )
    listener.ports = {int(port): str(host) for port, host in data["p"].items()}
    listener.connected_since = float(data.get("since", 0))
    listener.order = int(seq_text)
    listener.node = node
    listener.id = regid
    return listener


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@implementer(IClusterRegistry)
class RedisRegistry(RegistryBase, Service):
    """IRegistry over Redis; this node's listeners are live objects, the others' a replica."""

    name = "registry"

    def __init__(
        self,
        url: str,
        node: str = "",
        *,
        lease: float = 5.0,
        timeout: float = 2.0,
        prefix: str = "nuttconch:",
        info: dict[str, Any] | None = None,
        reactor: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.node = node or default_node_name()
        self.lease = lease
        self.prefix = prefix
        self.info = dict(info or {})
        #: Handlers of other log entries ({"op": ...} -> handler(fields)), e.g. key changes.
        self.log_handlers: dict[str, Callable[[dict[str, str]], None]] = {}
        #: (seconds, callable) run periodically while the service runs.
        self.periodic: list[tuple[float, Callable[[], Any]]] = []
        #: Called after this node (re)joined: took its lease afresh or saw a new epoch.
        self.join_hooks: list[Callable[[], Any]] = []
        #: Published and compared at join (see identity_of); empty: no check.
        self.identity: dict[str, str] = {}
        #: Why this node refuses to join ("" while it agrees with the cluster).
        self.refused = ""
        self.redis = RedisClient(reactor, url, timeout)
        self._rng = rng or random.SystemRandom()
        self.observers: list[Callable[[str, Listener, int | None], None]] = []
        #: Callable (registry, listener) -> IOpener for listeners on other nodes (the hop).
        self.remote_opener: Callable[[RedisRegistry, Listener], Any] = RemoteOpener
        self._local: dict[str, Listener] = {}
        # Unique across restarts of this node too: "node/instance.n".
        self.instance = f"{self._rng.getrandbits(32):08x}"
        self._ids = (f"{self.node}/{self.instance}.{n}" for n in itertools.count(1))
        self._remote: dict[str, dict[str, Listener]] = {}
        self._holders: dict[str, list[Listener]] | None = None
        self._max_seq = 0
        self._provisional = 0
        self._syncing: set[str] = set()
        self._dirty: set[str] = set()
        self._unsent: set[str] = set()
        self._epoch = ""
        self._last_id = "0-0"
        self._have_lease = False
        self._replica_ok = False
        self._lease_ok = False
        self.cause = "not connected to Redis yet"
        self.last_event_at = 0.0
        self.lag = 0.0
        self._consumed = 0
        self._loops: list[task.LoopingCall] = []
        self._pause: defer.Deferred[Any] | None = None
        self._stopping = False
        self._current = False

    # -- state seen by operators ------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True while this node holds its lease and its replica follows the log."""
        return self._lease_ok and self._replica_ok

    def cluster_state(self) -> dict[str, Any]:
        """What ``stats`` and metrics show of the cluster, as this node sees it."""
        return {
            "node": self.node,
            "state": "ok" if self.healthy else "degraded",
            "cause": "" if self.healthy else self.cause,
            "redis": self.redis.address,
            "redis_reachable": self.redis.reachable,
            "replication_lag_seconds": round(self.lag, 4),
            "peers": self.peers(),
            "initiators_here": len(self._local),
            "initiators_cluster": len(self.listeners()),
        }

    def peers(self) -> list[str]:
        """Other nodes that hold registrations, as this node's replica sees them."""
        return sorted(node for node, regs in self._remote.items() if regs)

    def _degrade(self, cause: str) -> None:
        if self.healthy or self._current:
            log.warn("cluster: degraded: {cause}", cause=cause)
        self._current = False
        self.cause = cause

    def _recover(self) -> None:
        # Said once per recovery, not on every heartbeat (every lease_time / 3).
        if self.healthy and not self._current:
            self._current = True
            log.info(
                "cluster: registry on Redis at {address} is current", address=self.redis.address
            )

    # -- IRegistry ------------------------------------------------------------------

    def add_port(
        self, listener: Listener, bind_host: str, port: int, limit: int | None = None
    ) -> int:
        port = claim_port(listener, bind_host, port, limit, self._rng)
        if len(listener.ports) == 1:
            if not listener.id:
                listener.id = next(self._ids)
                listener.node = self.node
            regid = listener.id
            listener.seq = 0  # type: ignore[attr-defined]  # a new registration, a new order
            # A reply to a write of its previous registration must not give it the old order.
            listener.gen = getattr(listener, "gen", 0) + 1  # type: ignore[attr-defined]
            # Newest until Redis gives it its place: a local lookup right after the
            # forward is answered must find it as name~0.
            self._provisional = max(self._provisional, self._max_seq) + 1
            listener.order = self._provisional
            self._local[regid] = listener
            self._holders = None
            self._notify("up", listener, None)
        self._notify("port-added", listener, port)
        self._sync(listener.id)
        return port

    def remove_port(self, listener: Listener, port: int) -> bool:
        if listener.ports.pop(port, None) is None:
            return False
        self._notify("port-removed", listener, port)
        if not listener.ports:
            self._unlink(listener)
        else:
            self._sync(listener.id)
        return True

    def _unlink(self, listener: Listener) -> None:
        regid = listener.id
        if not regid or self._local.get(regid) is not listener:
            return
        del self._local[regid]
        self._holders = None
        self._notify("down", listener, None)
        self._sync(regid)

    def _index(self) -> dict[str, list[Listener]]:
        if self._holders is None:
            holders: dict[str, list[Listener]] = {}
            for entry in self.listeners():
                for name in dict.fromkeys(entry.aliases):
                    holders.setdefault(name, []).append(entry)
            self._holders = holders
        return self._holders

    def _holder(self, target: str) -> tuple[Listener, str]:
        # While the replica is not current only this node's own listeners are known:
        # say why a name may be missing instead of claiming it does not exist.
        why = "" if self.healthy else f" on this node (cluster registry unavailable: {self.cause})"
        return pick_holder(self._index(), target, why)

    def listeners(self) -> list[Listener]:
        """This node's listeners and, while the replica is current, the others', newest first."""
        entries = list(self._local.values())
        if self.healthy:
            for regs in self._remote.values():
                entries.extend(regs.values())
        return sorted(entries, key=lambda entry: -entry.order)

    def local_listeners(self) -> list[Listener]:
        """This node's own listeners: what its metrics count."""
        return sorted(self._local.values(), key=lambda entry: -entry.order)

    def local_listener(self, listener_id: str) -> Listener | None:
        """This node's own live listener with that id (the hop's target), or None."""
        listener = self._local.get(listener_id)
        return listener if listener is not None and listener.ports else None

    def relay_address(self, node: str) -> defer.Deferred[str | None]:
        """Where ``node``'s relay listens, read from its lease (one GET, only when this
        node dials that peer afresh): None when its lease lapsed or it has no relay.

        Read from the lease rather than kept in the replica so that a node that is gone
        is never dialled, and a node restarted with another address is dialled there.
        """
        d = self.redis.command("GET", self._k("node", node))

        def parsed(value: Any) -> str | None:
            if not value:
                return None
            _, _, info = _text(value).partition(" ")
            try:
                relay = json.loads(info).get("relay")
            except (ValueError, AttributeError):
                return None
            return str(relay) if relay else None

        d.addCallback(parsed)
        return d

    # -- keys -------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- writing this node's listeners ---------------------------------------------------

    def _sync(self, regid: str) -> None:
        """Bring Redis in line with the listener's current state, one write at a time.

        One write per registration is in flight at most; changes made meanwhile
        are coalesced into the next write, so a registration never takes two
        order values and a late PUT never overtakes a DEL.
        """
        if regid in self._syncing:
            self._dirty.add(regid)
            return
        if not self._have_lease:
            return  # written when the lease is (re)taken
        self._syncing.add(regid)
        d = self._write(regid)

        def done(result: Any) -> None:
            self._syncing.discard(regid)
            if regid in self._dirty:
                self._dirty.discard(regid)
                self._sync(regid)

        d.addBoth(done)

    def _write(self, regid: str) -> defer.Deferred[Any]:
        listener = self._local.get(regid)
        if listener is None:
            d = self.redis.eval(
                DEL, [self._k("reg", self.node), self._k("log")], [self.node, regid, LOG_MAXLEN]
            )
        else:
            d = self.redis.eval(
                PUT,
                [
                    self._k("seq"),
                    self._k("node", self.node),
                    self._k("reg", self.node),
                    self._k("log"),
                ],
                [self.node, regid, _encode(listener), getattr(listener, "seq", 0), LOG_MAXLEN],
            )

            gen = getattr(listener, "gen", 0)

            def placed(seq: Any) -> None:
                seq = int(seq)
                self._max_seq = max(self._max_seq, seq)
                if getattr(listener, "gen", 0) != gen or self._local.get(regid) is not listener:
                    return  # removed (and maybe added again) meanwhile: the next write decides
                listener.seq = seq  # type: ignore[attr-defined]
                if listener.order != seq:
                    listener.order = seq
                    self._holders = None
                self._max_seq = max(self._max_seq, seq)

            d.addCallback(placed)

        def failed(failure: Any) -> None:
            self._unsent.add(regid)
            if "NOLEASE" in failure.getErrorMessage():
                self._have_lease = False
                self._lease_ok = False
                self._degrade("this node's lease lapsed; taking it again")
            else:
                self._degrade(str(failure.value))
            # Written again, in its state by then, after the next heartbeat that succeeds.

        d.addErrback(failed)
        return d

    # -- lease --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _check_identity(self) -> Any:
        """True if this node's identity matches the cluster's (the first node's sets it)."""
        if not self.identity:
            return True
        fields = sorted(self.identity.items())
        reply = yield self.redis.eval(
            IDENTITY, [self._k("identity")], [x for pair in fields for x in pair]
        )
        pairs = zip(fields, reply, strict=True)
        wrong = [name for (name, mine), theirs in pairs if _text(theirs) != mine]
        if not wrong:
            if self.refused:
                log.info("cluster: this node's identity now matches the cluster's")
            self.refused = ""
            return True
        refused = "this node's " + " and ".join(IDENTITY_WHAT.get(n, n) for n in wrong)
        refused += f" differ from the cluster's: not joining (delete {self._k('identity')}"
        refused += " in Redis once every node has the same files)"
        if refused != self.refused:
            log.error("cluster: {why}", why=refused)
        self.refused = refused
        self.cause = refused
        return False

    @defer.inlineCallbacks
    def _beat(self) -> Any:
        if not self._have_lease:
            try:
                ok = yield self._check_identity()
            except Exception as exc:
                self._lease_ok = False
                self._holders = None
                self._degrade(str(exc))
                return None
            if not ok:
                self._lease_ok = False
                self._holders = None
                return None
        result = yield self._beat_once()
        return result

    def _beat_once(self) -> defer.Deferred[Any]:
        info = json.dumps({**self.info, "pid": os.getpid(), "at": time.time()})
        create = "0" if self._have_lease else "1"
        candidate = f"{self._rng.getrandbits(64):016x}"
        d = self.redis.eval(
            BEAT,
            [self._k("node", self.node), self._k("nodes"), self._k("epoch"), self._k("log"),
             self._k("reg", self.node), self._k("seq")],
            [self.node, int(self.lease * 1000), info, candidate, create, LOG_MAXLEN,
             self._max_seq, self.instance],
        )  # fmt: skip

        def answered(reply: Any) -> Any:
            held, epoch = int(reply[0]), _text(reply[1])
            if held == 2:
                self._have_lease = False
                self._lease_ok = False
                self._holders = None
                self._degrade(
                    f"another process holds the lease of node {self.node} (this node's previous"
                    f" run, killed less than {self.lease:g} s ago, or a second node with the"
                    " same node_name); waiting for it to lapse"
                )
                return None
            if not held:
                log.warn(
                    "cluster: node {node}'s lease lapsed in Redis (stalled, cut off, or Redis"
                    " restarted); re-asserting its {n} registrations",
                    node=self.node,
                    n=len(self._local),
                )
                self._have_lease = False
                return self._beat()  # the identity again too: Redis may have lost it
            trimmed = int(reply[2]) if len(reply) > 2 else 0
            if self._replica_ok and trimmed > self._consumed:
                # Entries this replica had not read yet were trimmed away (it fell more
                # than LOG_MAXLEN behind): only a new snapshot is complete again.
                log.warn("cluster: this node's replica fell behind the log's trim; new snapshot")
                self._replica_ok = False
                self._holders = None
            fresh = not self._have_lease
            self._have_lease = True
            self._lease_ok = True
            if epoch != self._epoch:
                if self._epoch:
                    log.warn(
                        "cluster: Redis lost its data (epoch {old} -> {new}); re-asserting",
                        old=self._epoch,
                        new=epoch,
                    )
                self._epoch = epoch
                self._replica_ok = False
                fresh = True
            if fresh:
                self._reassert()
                for hook in list(self.join_hooks):
                    d = defer.maybeDeferred(hook)
                    d.addErrback(
                        lambda f: log.warn("cluster: join step failed: {why}", why=f.value)
                    )
            else:
                unsent, self._unsent = self._unsent, set()
                for regid in sorted(unsent, key=self._order_of):
                    self._sync(regid)
            self._recover()
            return None

        def failed(failure: Any) -> None:
            self._lease_ok = False
            self._holders = None
            self._degrade(str(failure.value))

        d.addCallbacks(answered, failed)
        return d

    def _order_of(self, regid: str) -> int:
        listener = self._local.get(regid)
        return listener.order if listener is not None else 0

    def _reassert(self) -> None:
        """Write every local registration again, oldest first, keeping its order value."""
        self._unsent.clear()
        for listener in sorted(self._local.values(), key=lambda entry: entry.order):
            self._sync(listener.id)

    def _reap(self) -> defer.Deferred[Any]:
        d = self.redis.eval(REAP, [self._k("nodes"), self._k("log")], [self.prefix, LOG_MAXLEN])

        def reaped(gone: Any) -> None:
            for node in gone or []:
                log.info(
                    "cluster: node {node}'s lease lapsed; its names are dropped", node=_text(node)
                )

        d.addCallbacks(reaped, lambda failure: None)
        return d

    # -- replica ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _snapshot(self) -> Any:
        reply = yield self.redis.eval(
            SNAPSHOT, [self._k("nodes"), self._k("log"), self._k("epoch")], [self.prefix]
        )
        last_id, epoch = _text(reply[0]), _text(reply[1])
        # Log entries up to last_id, counted from the log's start: what this replica holds.
        self._consumed = int(reply[2])
        remote: dict[str, dict[str, Listener]] = {}
        for i in range(3, len(reply), 2):
            node = _text(reply[i])
            flat = reply[i + 1] or []
            if node == self.node:
                continue
            regs = remote.setdefault(node, {})
            for j in range(0, len(flat), 2):
                regid = _text(flat[j])
                regs[regid] = self._remote_listener(node, regid, _text(flat[j + 1]))
        self._remote = remote
        self._last_id = last_id
        if epoch and epoch != self._epoch and self._epoch:
            self._have_lease = False  # the heartbeat notices and re-asserts
        self._replica_ok = True
        self._holders = None
        self._recover()

    def _remote_listener(self, node: str, regid: str, value: str) -> Listener:
        listener = _decode(node, regid, value)
        listener.opener = self.remote_opener(self, listener)
        self._max_seq = max(self._max_seq, listener.order)
        return listener

    def kick_remote(self, node: str, listener_id: str, reason: str) -> bool:
        """Publish a kick for another node's listener; its node drops the connection."""
        if not self._replica_ok:
            return False
        d = self.redis.command(
            "XADD", self._k("log"), "MAXLEN", "~", LOG_MAXLEN, "*",
            "op", "kick", "node", node, "reg", listener_id, "why", reason[:200],
        )  # fmt: skip
        d.addErrback(lambda failure: log.warn("cluster: kick not sent: {why}", why=failure.value))
        return True

    def _apply(self, fields: dict[str, str]) -> None:
        op, node = fields.get("op"), fields.get("node", "")
        if op == "kick":
            mine = self._local.get(fields.get("reg", "")) if node == self.node else None
            if mine is not None and mine.opener is not None:
                log.info(
                    "cluster: {name} kicked from another node: {why}",
                    name=mine.connect_name,
                    why=escape(fields.get("why", "")),
                )
                mine.opener.disconnect(fields.get("why", "kicked"))
            return
        handler = self.log_handlers.get(op or "")
        if handler is not None:
            try:
                handler(fields)
            except Exception:
                log.failure("cluster: handling a {op} entry failed", op=op)
            return
        if node == self.node and op != "down":
            return
        if op == "put":
            regid = fields["reg"]
            self._remote.setdefault(node, {})[regid] = self._remote_listener(
                node, regid, fields["val"]
            )
        elif op == "del":
            self._remote.get(node, {}).pop(fields["reg"], None)
        elif op == "down":
            if node == self.node:
                return  # our own restart marker, or our lease lapsed: the heartbeat handles it
            self._remote.pop(node, None)
        self._holders = None
        self.last_event_at = time.time()

    @defer.inlineCallbacks
    def _follow(self) -> Any:
        """Snapshot, then read the log until stopped; snapshot again after any gap."""
        while not self._stopping:
            try:
                if not self._replica_ok:
                    yield self._snapshot()
                reply = yield self.redis.blocking(
                    "follow",
                    BLOCK_MS,
                    "XREAD", "COUNT", 1000, "BLOCK", BLOCK_MS,
                    "STREAMS", self._k("log"), self._last_id,
                )  # fmt: skip
            except Exception as exc:
                if self._stopping:
                    return
                self._replica_ok = False
                self._holders = None
                self._degrade(str(exc) if isinstance(exc, RedisUnavailable) else f"Redis: {exc}")
                self._pause = task.deferLater(self.reactor, 0.1, lambda: None)
                try:
                    yield self._pause
                except defer.CancelledError:
                    return
                continue
            for _stream, entries in reply or []:
                for entry_id, flat in entries:
                    fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
                    self._apply(fields)
                    self._last_id = _text(entry_id)
                    self._consumed += 1
                # The entry id is Redis's clock in ms when it was written: how far behind
                # this replica is (same-host clocks; across hosts it includes their skew).
                if entries:
                    written = int(self._last_id.split("-")[0]) / 1000
                    self.lag = max(0.0, time.time() - written)

    # -- service --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        log.info(
            "cluster: node {node} on Redis at {address}", node=self.node, address=self.redis.address
        )
        beat = task.LoopingCall(self._beat)
        beat.clock = self.reactor
        beat.start(max(0.2, self.lease / 3), now=True)
        reap = task.LoopingCall(self._reap)
        reap.clock = self.reactor
        reap.start(1.0, now=False)
        self._loops = [beat, reap]
        for seconds, call in self.periodic:
            loop = task.LoopingCall(call)
            loop.clock = self.reactor
            loop.start(seconds, now=False)
            self._loops.append(loop)
        self._follow()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Leave at once: the other nodes drop this node's names now, not after its lease."""
        self._stopping = True
        if self._pause is not None and not self._pause.called:
            self._pause.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._have_lease:
            try:
                yield self.redis.eval(
                    LEAVE,
                    [self._k("node", self.node), self._k("nodes"), self._k("reg", self.node),
                     self._k("log")],
                    [self.node, LOG_MAXLEN],
                )  # fmt: skip
            except Exception as exc:
                log.warn(
                    "cluster: could not leave cleanly ({cause}); the lease will lapse", cause=exc
                )
        self._have_lease = False
        self._lease_ok = False
        yield self.redis.close()
        yield super().stopService()
