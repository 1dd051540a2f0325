# -*- test-case-name: tests.test_admin -*-
"""Administration commands: look at the switchboard, kick initiators, manage keys.

Each command is a function ``(avatar, args) -> Result`` registered in
`nuttconch.commands.COMMANDS`, so ``ssh host CMD`` and the admin shell run
the same code. Every change to authorized_keys goes through
`AuthorizedKeysFile.rewrite` (the file's ``flock`` shared with first-use
appends, a temporary file, fsync and rename): lines the command does not
touch, comments and lines it cannot parse come back byte for byte.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

from . import access, authkeys, metrics, paging, policy
from .names import escape
from .registry import NotFound
from .result import Result

log = Logger()

DISCONNECT_BY_APPLICATION = 11
GRANTABLE = access.GRANTABLE
_FP_RE = re.compile(r"^(?:SHA256:)?([A-Za-z0-9+/]{43})=?$")


class AdminError(Exception):
    """A refusal with a message for the admin; exit status 1."""


def _usage(text: str) -> Result:
    return Result(2, err=f"usage: {text}\n")


def _json(value: Any) -> Result:
    return Result(0, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return (
        "\n".join(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
        )
        + "\n"
    )


def _flags(args: list[str], allowed: tuple[str, ...], usage: str) -> set[str] | Result:
    flags = set()
    for arg in args:
        if arg not in allowed:
            return _usage(usage)
        flags.add(arg)
    return flags


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


# read-only views


def listeners_json(avatar: Any, page: paging.Page | None = None) -> Result:
    page = page or paging.Page()
    rows = metrics.listener_rows(avatar.factory, page)
    total = len(avatar.factory.registry.listeners())
    result = _json(rows)
    return Result(result.code, result.out, page.note(len(rows), total, "listeners --json"))


def circuits(avatar: Any, args: list[str]) -> Result:
    try:
        page, args = paging.parse(args)
    except paging.PageError as exc:
        return _usage(f"circuits [--json] [--limit N] [--offset K] ({exc})")
    flags = _flags(args, ("--json",), "circuits [--json] [--limit N] [--offset K]")
    if isinstance(flags, Result):
        return flags
    rows = metrics.circuit_rows(avatar.factory, page)
    total = sum(1 for _ in metrics.live_circuits(avatar.factory))
    note = page.note(len(rows), total, "circuits" + (" --json" if "--json" in flags else ""))
    if "--json" in flags:
        result = _json(rows)
        return Result(result.code, result.out, note)
    if not rows:
        return Result(0, "no circuits\n", note)
    table = [("ID", "TARGET", "CLIENT", "FROM", "AGE", "UP", "DOWN")]
    for row in rows:
        table.append(
            (
                str(row["id"]),
                escape(row["target"]),
                escape(row["client_name"] or "-"),
                escape(row["client"]),
                _age(row["age_seconds"]),
                _size(row["bytes_up"]),
                _size(row["bytes_down"]),
            )
        )
    return Result(0, _table(table), note)


def stats_data(factory: Any) -> dict[str, Any]:
    listeners = factory.registry.listeners()
    data: dict[str, Any] = {
        "connections": metrics.connection_states(factory),
        "initiators": len(listeners),
        "virtual_ports": sum(len(x.ports) for x in listeners),
        "circuits_open": sum(1 for _ in metrics.live_circuits(factory)),
        "penalties_in_force": metrics.penalties_in_force(factory),
    }
    m = getattr(factory, "metrics", None)
    if isinstance(m, metrics.Metrics):
        data.update(m.totals())
        data["uptime_seconds"] = round(time.time() - m.started)
    else:
        data["circuits_opened"] = {"ok": getattr(factory, "circuitsOpened", 0)}
    hooks = getattr(factory, "webhooks", None)
    if hooks is not None:
        data["webhooks"] = hooks.stats()
    cluster = getattr(factory.registry, "cluster_state", None)
    if cluster is not None:
        data["cluster"] = cluster()
    return data


def stats(avatar: Any, args: list[str]) -> Result:
    flags = _flags(args, ("--json",), "stats [--json]")
    if isinstance(flags, Result):
        return flags
    data = stats_data(avatar.factory)
    if "--json" in flags:
        return _json(data)
    conns = data["connections"]
    lines = [
        f"connections: {conns['authenticated']} authenticated,"
        f" {conns['unauthenticated']} authenticating",
        f"initiators: {data['initiators']}",
        f"virtual ports: {data['virtual_ports']}",
        f"open circuits: {data['circuits_open']}",
        "circuits opened: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in data["circuits_opened"].items()),
    ]
    if "bytes" in data:
        lines.append(
            f"bytes: {data['bytes']['up']} up (client to initiator), {data['bytes']['down']} down"
        )
    if "authentications" in data:
        auth = data["authentications"]
        lines.append(
            "authentications: " + (", ".join(f"{k} {v}" for k, v in sorted(auth.items())) or "none")
        )
        lines.append(f"keys added on first use: {data['keys_added']}")
    lines.append(f"penalties in force: {data['penalties_in_force']}")
    if "uptime_seconds" in data:
        lines.append(f"uptime: {_age(data['uptime_seconds'])}")
    if "webhooks" in data:
        hooks = data["webhooks"]
        lines.append("webhooks: " + ", ".join(f"{k} {v}" for k, v in hooks.items()))
    if "cluster" in data:
        c = data["cluster"]
        state = c["state"] + (f" ({escape(c['cause'])})" if c["cause"] else "")
        lines.append(
            f"cluster: node {c['node']}, {state}, Redis {escape(c['redis'])},"
            f" peers {', '.join(c['peers']) or 'none'},"
            f" initiators {c['initiators_here']} here of {c['initiators_cluster']},"
            f" replication lag {c['replication_lag_seconds'] * 1000:.1f} ms"
        )
    return Result(0, "\n".join(lines) + "\n")


def _options_text(entry: authkeys.AuthorizedKey) -> str:
    parts = []
    for name, value in entry.options:
        parts.append(name if value is None else f'{name}="{value}"')
    return ",".join(parts)


def _connected(factory: Any, fp: str) -> list[Any]:
    return [a for a in list(factory.avatars) if a.identity.fingerprint == fp]


def key_status(entry: authkeys.AuthorizedKey, now: float) -> str:
    """Whether a line is in force, in the words ``keys`` shows: an administrator must see
    that a line they wrote is not doing what they believe."""
    if entry.denied:
        return "denied"
    if entry.policy_error is not None:
        return f"invalid: {entry.policy_error}"
    if entry.policy.expired(now):
        return f"expired {policy.format_time(entry.policy.expires)}"
    if entry.cert_authority:
        if entry.hostname is not None or entry.aliases:
            return "invalid: a cert-authority line cannot give hostname= or alias="
        return "in force (certificate authority)"
    return "in force"


def keys(avatar: Any, args: list[str]) -> Result:
    flags = _flags(args, ("--json",), "keys [--json]")
    if isinstance(flags, Result):
        return flags
    keys_file = avatar.factory.keysFile
    try:
        entries = keys_file.entries()
    except OSError as exc:
        return Result(1, err=f"cannot read authorized_keys: {escape(str(exc))}\n")
    now = time.time()
    # One pass over the connections, not one per line: a fleet has many of both.
    connected = Counter(a.identity.fingerprint for a in list(avatar.factory.avatars))
    rows: list[dict[str, Any]] = []
    for entry in entries:
        rows.append(
            {
                "line": entry.lineno,
                "fingerprint": entry.fingerprint,
                "type": entry.keytype,
                "options": _options_text(entry),
                "access": sorted(entry.access),
                "status": key_status(entry, now),
                "restrictions": [] if entry.policy_error is not None else entry.policy.describe(),
                "comment": entry.comment,
                "connections": connected[entry.fingerprint],
            }
        )
    for lineno, reason in keys_file.problems():
        rows.append(
            {
                "line": lineno,
                "fingerprint": None,
                "type": None,
                "options": None,
                "access": [],
                "status": f"invalid: {reason}; line ignored",
                "restrictions": [],
                "comment": None,
                "connections": 0,
            }
        )
    rows.sort(key=lambda row: row["line"])
    if "--json" in flags:
        return _json(rows)
    if not rows:
        return Result(0, "no keys\n")
    table = [("LINE", "FINGERPRINT", "TYPE", "OPTIONS", "STATUS", "COMMENT", "CONN")]
    for row in rows:
        table.append(
            (
                str(row["line"]),
                row["fingerprint"] or "-",
                escape(row["type"] or "-"),
                escape(row["options"] or "") or "-",
                escape(row["status"]),
                escape(row["comment"] or "") or "-",
                str(row["connections"]),
            )
        )
    return Result(0, _table(table))


# kick


def kick(avatar: Any, args: list[str]) -> Result:
    if len(args) != 1:
        return _usage("kick NAME   (a connect name or alias; name~N as in routing)")
    try:
        listener = avatar.factory.registry.find(args[0])
    except NotFound:
        return Result(1, err=f"kick: no such listener: {escape(args[0])}\n")
    if not listener.opener.disconnect("kicked by an administrator"):
        return Result(1, err=f"kick: {escape(args[0])} is already leaving\n")
    log.info(
        "admin {admin} kicked {name} from {peer} (key {fingerprint})",
        admin=avatar.identity.fingerprint,
        name=listener.connect_name,
        peer=listener.peer,
        fingerprint=listener.fingerprint,
    )
    return Result(0, f"kicked {escape(listener.connect_name)} ({escape(listener.peer)})\n")


# changes to authorized_keys


def _fingerprint_arg(text: str) -> str:
    m = _FP_RE.match(text)
    if not m:
        raise AdminError(f"not a SHA256 fingerprint: {escape(text)} (see: keys)")
    return "SHA256:" + m.group(1)


def _keytype_of(blob: bytes) -> str:
    length = int.from_bytes(blob[:4], "big")
    return blob[4 : 4 + length].decode("ascii", "replace")


class _Edit:
    """One transform for `AuthorizedKeysFile.rewrite`: change every line of one key."""

    def __init__(self, fp: str, change: Any, blob_hint: bytes | None, append: Any = None) -> None:
        self.fp = fp
        self.change = change  # AuthorizedKey -> AuthorizedKey | None (None drops the line)
        self.blob_hint = blob_hint
        self.append = append  # blob -> AuthorizedKey, when the file lacks the key
        self.changed: list[int] = []
        self.unparsed: list[int] = []
        self.added = False

    def __call__(self, lines: list[str]) -> list[str]:
        self.changed, self.unparsed, self.added = [], [], False
        out: list[str] = []
        blob = self.blob_hint
        bad: list[tuple[int, str]] = []
        for lineno, line in enumerate(lines, 1):
            try:
                entry = authkeys.parse_line(line, lineno)
            except authkeys.AuthorizedKeyError:
                bad.append((lineno, line))
                out.append(line)
                continue
            if entry is None or entry.fingerprint != self.fp or entry.cert_authority:
                out.append(line)
                continue
            blob = entry.blob
            new = self.change(entry)
            self.changed.append(lineno)
            if new is None:
                continue
            try:
                out.append(authkeys.serialise(new))
            except authkeys.AuthorizedKeyError as exc:
                raise AdminError(f"line {lineno} cannot be rewritten safely: {exc}") from None
        if blob is not None:
            token = base64.b64encode(blob).decode("ascii")
            self.unparsed = [n for n, text in bad if token in text]
        if not self.changed and self.append is not None and blob is not None:
            entry = self.append(blob)
            try:
                out.append(authkeys.serialise(entry))
            except authkeys.AuthorizedKeyError as exc:
                raise AdminError(f"cannot write the new line: {exc}") from None
            self.added = True
        return out


def _rewrite(avatar: Any, edit: _Edit) -> None:
    try:
        avatar.factory.keysFile.rewrite(edit)
    except AdminError:
        raise
    except OSError as exc:
        raise AdminError(f"cannot write authorized_keys: {escape(str(exc))}") from None


def _find_blob(factory: Any, fp: str) -> bytes | None:
    """A connected key's blob, for keys not (yet) in the file."""
    for other in _connected(factory, fp):
        return other.identity.key_blob
    return None


def _disconnect(factory: Any, fp: str, why: bytes) -> int:
    count = 0
    for other in _connected(factory, fp):
        conn = getattr(other, "conn", None)
        if conn is not None and conn.transport is not None:
            conn.transport.sendDisconnect(DISCONNECT_BY_APPLICATION, why)
            count += 1
    return count


def _new_comment(factory: Any, fp: str, what: str) -> str:
    for other in _connected(factory, fp):
        identity = other.identity
        return f"{identity.username}@{identity.peer} {what}"
    return what


def grant(avatar: Any, args: list[str]) -> Result:
    if len(args) < 2:
        return _usage(f"grant FINGERPRINT ACCESS...   (ACCESS: {', '.join(GRANTABLE)})")
    try:
        fp = _fingerprint_arg(args[0])
        wanted = []
        for value in args[1:]:
            for part in value.split(","):
                if part not in GRANTABLE:
                    raise AdminError(
                        f"unknown access value {escape(part)} (one of {', '.join(GRANTABLE)})"
                    )
                if part not in wanted:
                    wanted.append(part)
        factory = avatar.factory

        def change(entry: authkeys.AuthorizedKey) -> authkeys.AuthorizedKey:
            options = [o for o in entry.options if o != ("access", access.DENIED)]
            have = {v for n, v in options if n == "access"}
            options += [("access", v) for v in wanted if v not in have]
            return authkeys.AuthorizedKey(tuple(options), entry.keytype, entry.blob, entry.comment)

        def append(blob: bytes) -> authkeys.AuthorizedKey:
            comment = _new_comment(factory, fp, "(granted by admin)")
            options = tuple(("access", v) for v in wanted)
            return authkeys.AuthorizedKey(options, _keytype_of(blob), blob, comment)

        edit = _Edit(fp, change, _find_blob(factory, fp), append)
        _rewrite(avatar, edit)
    except AdminError as exc:
        return Result(1, err=f"grant: {exc}\n")
    if not edit.changed and not edit.added:
        return Result(
            1,
            err=f"grant: no key {fp} in authorized_keys, and none is connected to learn it from\n",
        )
    _audit(avatar, "granted " + ",".join(wanted) + " to", fp, edit)
    lines = [f"granted {', '.join(wanted)} to {fp}" + _where(edit)]
    lines += [
        f"warning: line {n} mentions this key but cannot be parsed, so it keeps the key denied"
        for n in edit.unparsed
    ]
    lines.append("(applies from the key's next login)")
    return Result(0, "\n".join(lines) + "\n")


def revoke(avatar: Any, args: list[str]) -> Result:
    if len(args) != 1:
        return _usage("revoke FINGERPRINT")
    try:
        fp = _fingerprint_arg(args[0])
        if fp == avatar.identity.fingerprint:
            raise AdminError("refusing to revoke the key you are logged in with")
        edit = _Edit(fp, lambda entry: None, None)
        _rewrite(avatar, edit)
    except AdminError as exc:
        return Result(1, err=f"revoke: {exc}\n")
    if not edit.changed:
        return Result(1, err=f"revoke: no key {fp} in authorized_keys\n")
    dropped = _disconnect(avatar.factory, fp, b"key revoked by an administrator")
    _audit(avatar, "revoked", fp, edit)
    lines = [f"revoked {fp}" + _where(edit) + f"; {dropped} connection(s) dropped"]
    if avatar.factory.config.allow_new_clients:
        lines.append(
            "note: allow_new_clients is on, so this key is trusted again if it logs in;"
            " use ban to keep it out"
        )
    return Result(0, "\n".join(lines) + "\n")


def ban(avatar: Any, args: list[str]) -> Result:
    if len(args) != 1:
        return _usage("ban FINGERPRINT")
    try:
        fp = _fingerprint_arg(args[0])
        if fp == avatar.identity.fingerprint:
            raise AdminError("refusing to ban the key you are logged in with")
        factory = avatar.factory

        def change(entry: authkeys.AuthorizedKey) -> authkeys.AuthorizedKey:
            options = [o for o in entry.options if o[0] != "access"]
            options.append(("access", access.DENIED))
            return authkeys.AuthorizedKey(tuple(options), entry.keytype, entry.blob, entry.comment)

        def append(blob: bytes) -> authkeys.AuthorizedKey:
            comment = _new_comment(factory, fp, "(banned by admin)")
            return authkeys.AuthorizedKey(
                (("access", access.DENIED),), _keytype_of(blob), blob, comment
            )

        edit = _Edit(fp, change, _find_blob(factory, fp), append)
        _rewrite(avatar, edit)
    except AdminError as exc:
        return Result(1, err=f"ban: {exc}\n")
    if not edit.changed and not edit.added:
        return Result(
            1, err=f"ban: no key {fp} in authorized_keys, and none is connected to learn it from\n"
        )
    dropped = _disconnect(avatar.factory, fp, b"key banned by an administrator")
    _audit(avatar, "banned", fp, edit)
    return Result(0, f"banned {fp}" + _where(edit) + f"; {dropped} connection(s) dropped\n")


def _where(edit: _Edit) -> str:
    if edit.added:
        return " (new line added)"
    plural = "s" if len(edit.changed) > 1 else ""
    return f" (line{plural} {', '.join(str(n) for n in edit.changed)})"


def _audit(avatar: Any, what: str, fp: str, edit: _Edit) -> None:
    log.info(
        "admin {admin} {what} key {fingerprint} in authorized_keys{where}",
        admin=avatar.identity.fingerprint,
        what=what,
        fingerprint=fp,
        where=_where(edit),
    )
