# -*- test-case-name: tests.test_commands -*-
"""Commands for ``ssh host CMD`` and the admin shell, as pure functions returning text.

Keeping them free of SSH plumbing means exec and the shell share one
implementation, and each can be tested without a connection.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .names import escape

MAX_COMMAND = 1024


@dataclass
class Result:
    code: int
    out: str = ""
    err: str = ""


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
    return Result(0, "\n".join(lines) + "\n")


def listeners(avatar: Any) -> Result:
    if "list" not in avatar.identity.access:
        return Result(
            1, err="Permission denied: this key may not list listeners (needs access=list)\n"
        )
    entries = avatar.factory.registry.listeners()
    if not entries:
        return Result(0, "no listeners\n")
    rows = [("NAME", "ADDRESS", "ALIASES", "PORTS")]
    for entry in entries:
        rows.append(
            (
                escape(entry.connect_name),
                escape(entry.peer),
                ",".join(escape(a) for a in entry.aliases[1:]) or "-",
                ",".join(str(p) for p in sorted(entry.ports)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    text = "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )
    return Result(0, text + "\n")


def help_text(avatar: Any, shell: bool = False) -> Result:
    lines = [
        "Commands:",
        "  whoami      your names, permissions and key",
        "  listeners   connected initiators (needs access=list; also: list)",
        "  help        this text",
    ]
    if shell:
        lines.append("  quit, exit  leave the shell (also Ctrl-D)")
    return Result(0, "\n".join(lines) + "\n")


COMMANDS: dict[str, Callable[[Any], Result]] = {
    "whoami": whoami,
    "listeners": listeners,
    "list": listeners,
    "help": help_text,
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
    handler = COMMANDS.get(argv[0])
    if handler is None:
        return Result(127, err=f"unknown command: {escape(argv[0])} (try: help)\n")
    if len(argv) > 1:
        return Result(2, err=f"{argv[0]}: takes no arguments\n")
    return handler(avatar)
