# -*- test-case-name: tests.test_cluster_registry -*-
"""authorized_keys changes made on one node, applied by every node to its own file.

Each node keeps its own authorized_keys (nothing replaces it wholesale), and
the cluster agrees key by key: the unit is the set of lines of one public
key.  When a node's file changes (a first-use append, ``grant``, ``revoke``,
``ban``, an edit by hand) the node publishes the new lines of each key that
changed, or an empty value for a key that left, to a Redis hash and the
registry's log; the other nodes rewrite just those lines in their file.
Comments and lines that name no key are never touched, and an apply is
followed at once by the reload that drops the connections of a banned or
revoked key, so they go within the 2 s the cluster promises.

At join, keys the cluster already has win (their values are applied here);
keys only this node has are published.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python import threadable

from .. import authkeys

log = Logger()

#: How often this node looks for changes of its own file.
POLL_SECONDS = 0.25

KEYPUT = """
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'op', 'key', 'node', ARGV[1],
           'key', ARGV[2], 'val', ARGV[3])
return 1
"""


def _token_of(line: str) -> str | None:
    try:
        entry = authkeys.parse_line(line)
    except (authkeys.AuthorizedKeyError, ValueError):
        return None
    if entry is None:
        return None
    return base64.b64encode(entry.blob).decode("ascii")


def key_lines(lines: list[str]) -> dict[str, str]:
    """Key token -> that key's lines (newline-joined, in file order)."""
    found: dict[str, list[str]] = {}
    for line in lines:
        token = _token_of(line)
        if token is not None:
            found.setdefault(token, []).append(line.rstrip("\r"))
    return {token: "\n".join(group) for token, group in found.items()}


class KeySync:
    """Publishes this node's authorized_keys changes and applies the others'."""

    def __init__(self, registry: Any, keys_file: authkeys.AuthorizedKeysFile, factory: Any) -> None:
        self.registry = registry
        self.keys_file = keys_file
        self.factory = factory
        self.known: dict[str, str] = self._read()
        #: Changes made here that Redis did not take (it was down): they win at the next join.
        self.unpublished: set[str] = set()
        keys_file.add_listener(self._changedAnyThread)
        registry.log_handlers["key"] = self._remote
        registry.join_hooks.append(self._join)
        registry.periodic.append((POLL_SECONDS, self._poll))

    def _read(self) -> dict[str, str]:
        try:
            with open(self.keys_file.path, encoding="utf-8", errors="surrogateescape") as handle:
                return key_lines(handle.read().lstrip("\ufeff").split("\n"))
        except OSError:
            return dict(self.known) if hasattr(self, "known") else {}

    # -- this node's changes -------------------------------------------------------

    def _poll(self) -> None:
        """A stat a quarter second: a ban here reaches the other nodes well within 2 s,
        where the server's own reload poll (2 s) alone would use up the whole budget."""
        if self.keys_file.reload_cost() > 0:
            self.factory.checkKeys()

    def _changedAnyThread(self) -> None:
        from twisted.internet import reactor

        if threadable.isInIOThread():
            self._changed()
        else:
            reactor.callFromThread(self._changed)  # type: ignore[attr-defined]

    def _changed(self) -> None:
        current = self._read()
        changed = {t: v for t, v in current.items() if self.known.get(t) != v}
        changed.update({t: "" for t in self.known if t not in current})
        self.known = current
        for token, value in changed.items():
            self._publish(token, value)

    def _publish(self, token: str, value: str) -> defer.Deferred[Any]:
        registry = self.registry
        d = registry.redis.eval(
            KEYPUT,
            [registry._k("keys"), registry._k("log")],
            [registry.node, token, value, 100000],
        )

        def failed(failure: Any) -> None:
            # Published again at the next join, where it wins over the cluster's value.
            self.unpublished.add(token)
            log.warn("cluster: authorized_keys change not published: {why}", why=failure.value)

        d.addErrback(failed)
        return d

    # -- the other nodes' changes -------------------------------------------------------

    def _remote(self, fields: dict[str, str]) -> None:
        if fields.get("node") == self.registry.node:
            return
        self._apply({fields["key"]: fields.get("val", "")})

    def _apply(self, values: dict[str, str]) -> None:
        values = {t: v for t, v in values.items() if self.known.get(t, "") != v}
        if not values:
            return

        def transform(lines: list[str]) -> list[str]:
            kept = [line for line in lines if _token_of(line) not in values]
            for value in values.values():
                if value:
                    kept.extend(value.split("\n"))
            return kept

        for token, value in values.items():
            if value:
                self.known[token] = value
            else:
                self.known.pop(token, None)
        try:
            self.keys_file.rewrite(transform)
        except OSError as exc:
            log.error("cluster: could not apply an authorized_keys change: {why}", why=exc)
            return
        log.info("cluster: applied {n} authorized_keys change(s) from other nodes", n=len(values))
        # Reload now: a banned or revoked key's connections here go at once, not at the poll.
        self.factory.checkKeys()

    @defer.inlineCallbacks
    def _join(self) -> Any:
        """Changes made here while cut off win; otherwise the cluster's values win for keys
        it has, and keys only this node has are published."""
        registry = self.registry
        self.known = yield threads.deferToThread(self._read)
        mine, self.unpublished = self.unpublished, set()
        for token in sorted(mine):
            yield self._publish(token, self.known.get(token, ""))
        flat = yield registry.redis.command("HGETALL", registry._k("keys"))
        theirs = {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat or []), 2)}
        self._apply(theirs)
        for token, value in self.known.items():
            if token not in theirs:
                yield self._publish(token, value)
