# -*- test-case-name: tests.test_units,tests.test_admin -*-
"""Commands for ``ssh host CMD`` and the admin shell, as pure functions returning text.

Keeping them free of SSH plumbing means exec and the shell share one
implementation, and each can be tested without a connection.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import admin, paging
from .access import ADMIN, LIST, Access
from .names import escape
from .result import Result as Result  # re-exported: callers read commands.Result

MAX_COMMAND = 1024


def connect_command(server: str, listen_port: int, name: str, port: int) -> str:
    """The exact client command for one virtual port, as the seed README shows it."""
    port_opt = f" -p {listen_port}" if listen_port != 22 else ""
    return f"ssh {server}{port_opt} -N -L {port}:{name}:{port}"


def greeting(avatar: Any, server: str, listen_port: int) -> str:
    identity = avatar.identity
    lines = [f"Welcome to nuttconch, {identity.hostname}."]
    lines.append(f"Your connect name is {identity.connect_name}.")
    if len(identity.aliases) > 1:
        lines.append("Also reachable as: " + ", ".join(identity.aliases[1:]) + ".")
    ports = sorted(avatar.listener.ports) if avatar.listener else []
    if not ports:
        lines.append("You have no virtual ports yet; connect with ssh -R PORT:HOST:PORT.")
    for port in ports:
        lines.append(port_line(server, listen_port, identity.connect_name, port))
    return "\n".join(lines) + "\n"


def port_line(server: str, listen_port: int, name: str, port: int) -> str:
    command = connect_command(server, listen_port, name, port)
    return f"Virtual port {port} is open; clients connect with:\n    {command}"


def whoami(avatar: Any) -> Result:
    identity = avatar.identity
    ports = sorted(avatar.listener.ports) if avatar.listener else []
    lines = [
        f"hostname: {identity.hostname}",
        f"names: {', '.join(identity.aliases)}",
        f"access: {', '.join(sorted(identity.access)) or 'none'}",
        f"key: {identity.fingerprint}",
        f"address: {escape(identity.peer)}",
        f"ports: {', '.join(str(p) for p in ports) or 'none'}",
    ]
    restrictions = identity.policy.describe()
    if restrictions:
        lines.append(f"restrictions: {'; '.join(escape(r) for r in restrictions)}")
    return Result(0, "\n".join(lines) + "\n")


def listeners(avatar: Any, page: paging.Page | None = None) -> Result:
    if LIST not in avatar.identity.access:
        return Result(
            1, err="Permission denied: this key may not list listeners (needs access=list)\n"
        )
    page = page or paging.Page()
    everyone = avatar.factory.registry.listeners()
    entries = page.slice(everyone)
    if not entries:
        return Result(0, "no listeners\n", page.note(0, len(everyone), "listeners"))
    rows: list[tuple[str, ...]] = [("NAME", "ADDRESS", "ALIASES", "PORTS")]
    for entry in entries:
        rows.append(
            (
                escape(entry.connect_name),
                escape(entry.peer),
                ",".join(escape(a) for a in entry.aliases[1:]) or "-",
                ",".join(str(p) for p in sorted(entry.ports)),
            )
        )
    if hasattr(avatar.factory.registry, "cluster_state"):
        # In a cluster the list is the whole cluster's: say which node holds each.
        nodes = ["NODE"] + [escape(entry.node) for entry in entries]
        rows = [(*row, node) for row, node in zip(rows, nodes, strict=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )
    return Result(0, text + "\n", page.note(len(entries), len(everyone), "listeners"))


def help_text(avatar: Any, shell: bool = False) -> Result:
    lines = [
        "Commands:",
        "  whoami      your names, permissions and key",
        "  listeners   connected initiators (needs access=list; also: list)",
        "  help        this text",
    ]
    access = avatar.identity.access
    if ADMIN in access or LIST in access:
        lines += [
            "  listeners --json           the same as JSON",
            "  listeners --limit N --offset K   rows K+1..K+N (default: the first 1000)",
            "  circuits [--json]          open circuits with age and bytes (list or admin;"
            " --limit, --offset too)",
            "  stats [--json]             counters and totals (list or admin)",
        ]
    if ADMIN in access:
        lines += [
            "Administration (access=admin):",
            "  keys [--json]              authorized keys with options and fingerprints",
            "  kick NAME                  disconnect the initiator NAME (or NAME~N)",
            "  grant FINGERPRINT ACCESS.. add access values (initiate listen list admin)",
            "  revoke FINGERPRINT         remove the key from authorized_keys, drop it",
            '  ban FINGERPRINT            set access="denied" and drop its connections',
        ]
    if shell:
        lines.append("  quit, exit  leave the shell (also Ctrl-D)")
    return Result(0, "\n".join(lines) + "\n")


@dataclass(frozen=True)
class Command:
    """A command: its handler, who may run it, and whether it takes arguments."""

    handler: Callable[[Any, list[str]], Result]
    needs: Access = Access()  # any one of these access values; empty: anyone
    takes_args: bool = True


def _no_args(handler: Callable[[Any], Result]) -> Callable[[Any, list[str]], Result]:
    def run_it(avatar: Any, args: list[str]) -> Result:
        return handler(avatar)

    return run_it


LISTENERS_USAGE = "usage: listeners [--json] [--limit N] [--offset K]\n"


def _listeners_cmd(avatar: Any, args: list[str]) -> Result:
    try:
        page, args = paging.parse(args)
    except paging.PageError as exc:
        return Result(2, err=f"{exc}\n{LISTENERS_USAGE}")
    if not args:
        return listeners(avatar, page)
    if args != ["--json"]:
        return Result(2, err=LISTENERS_USAGE)
    if LIST not in avatar.identity.access:
        return listeners(avatar)  # the same refusal as without --json
    return admin.listeners_json(avatar, page)


def _admin(name: str) -> Callable[[Any, list[str]], Result]:
    """Looked up at call time, so a test may replace one admin command."""

    def run_it(avatar: Any, args: list[str]) -> Result:
        return getattr(admin, name)(avatar, args)

    return run_it


_ADMIN = Access({ADMIN})
_VIEW = Access({ADMIN, LIST})

COMMANDS: dict[str, Command] = {
    "whoami": Command(_no_args(whoami), takes_args=False),
    "listeners": Command(_listeners_cmd),
    "list": Command(_listeners_cmd),
    "help": Command(_no_args(help_text), takes_args=False),
    "circuits": Command(_admin("circuits"), _VIEW),
    "stats": Command(_admin("stats"), _VIEW),
    "keys": Command(_admin("keys"), _ADMIN),
    "kick": Command(_admin("kick"), _ADMIN),
    "grant": Command(_admin("grant"), _ADMIN),
    "revoke": Command(_admin("revoke"), _ADMIN),
    "ban": Command(_admin("ban"), _ADMIN),
}


def run(avatar: Any, line: str | bytes) -> Result:
    """Run one command line; unknown commands and bad quoting are errors, not exceptions."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    if len(line) > MAX_COMMAND:
        return Result(2, err="command too long\n")
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        return Result(2, err=f"cannot parse command: {exc}\n")
    if not argv:
        return Result(0)
    command = COMMANDS.get(argv[0])
    if command is None:
        return Result(127, err=f"unknown command: {escape(argv[0])} (try: help)\n")
    if len(argv) > 1 and not command.takes_args:
        return Result(2, err=f"{argv[0]}: takes no arguments\n")
    if command.needs and not command.needs & avatar.identity.access:
        needs = " or ".join(f"access={n}" for n in sorted(command.needs))
        return Result(1, err=f"Permission denied: this key may not run {argv[0]} (needs {needs})\n")
    return command.handler(avatar, argv[1:])
