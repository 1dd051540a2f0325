"""Issue 14.10 figures against a separate server process, with its default settings.

    python bench/budget_attack.py [--circuits N] [--logins N] [--commit REV]

Two attacks, each on a freshly started ``python -m nuttconch`` (threat_figures.Run and
Server: own keys, loopback, no TOFU):

- circuits: a paramiko initiator forwards port 80 and never reads what arrives
  (window 32 KiB, never re-opened); a paramiko client opens N circuits to it and
  sends on every one as long as the server grants window. Reported: bytes the server
  accepted, and its RSS growth (``/proc/<pid>/status``) once nothing more is accepted.
- logins: N paramiko logins with one key, all held open; reported: how many the
  server admitted, and the refusal text the others got.

``--commit REV`` runs the server from ``git archive REV`` (the figure "before").
Every process is started here and stopped by pid; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paramiko

sys.path.insert(0, str(Path(__file__).resolve().parent))
from threat_figures import ROOT, Run, Server  # noqa: E402

CHUNK = b"x" * 32768


def transport(srv: Server, user: str, window: int | None = None) -> paramiko.Transport:
    sock = socket.create_connection(("127.0.0.1", srv.port), 10)
    kw = {"default_window_size": window} if window else {}
    t = paramiko.Transport(sock, **kw)
    try:
        t.connect(username=user, pkey=paramiko.Ed25519Key.from_private_key_file(str(srv.run.key)))
    except paramiko.SSHException as exc:
        banner = (t.get_banner() or b"").decode("utf-8", "replace").strip()
        t.close()
        raise paramiko.SSHException(f"{exc} (banner: {banner or 'none'})") from None
    return t


def circuits(run: Run, count: int) -> str:
    with run.server("circuits") as srv:
        alias = srv.alias("sink")
        held: list[paramiko.Channel] = []
        sink = transport(srv, "sink", window=32768)
        sink.request_port_forward("", 80, handler=lambda ch, origin, server: held.append(ch))
        client = transport(srv, "filler")
        time.sleep(1)
        base = srv.rss()
        chans = []
        refused = ""
        for _ in range(count):
            try:
                chan = client.open_channel("direct-tcpip", (alias, 80), ("127.0.0.1", 1))
            except paramiko.ChannelException as exc:
                refused = f"{exc.code}: {exc.text}"
                break
            chan.setblocking(False)
            chans.append(chan)
        sent = 0
        idle_since = time.monotonic()
        deadline = time.monotonic() + 120
        while time.monotonic() - idle_since < 3 and time.monotonic() < deadline:
            progress = 0
            for chan in chans:
                while chan.send_ready():
                    try:
                        progress += chan.send(CHUNK)
                    except TimeoutError:
                        break
            sent += progress
            if progress:
                idle_since = time.monotonic()
            else:
                time.sleep(0.2)
        time.sleep(1)
        rss, hwm = srv.rss(), srv.hwm()
        client.close()
        sink.close()
    growth = (rss - base) / 1024
    return (
        f"circuits: {len(chans)} opened{f', then refused ({refused})' if refused else ''};"
        f" server accepted {sent / 1048576:.1f} MiB that cannot move on;"
        f" server RSS +{growth:.1f} MiB (VmHWM {hwm / 1024:.1f} MiB)"
    )


def logins(run: Run, count: int) -> str:
    with run.server("logins") as srv:
        held = []
        refusal = ""
        for _ in range(count):
            try:
                t = transport(srv, "many")
            except (paramiko.SSHException, OSError) as exc:
                refusal = refusal or str(exc)
                continue
            if t.is_authenticated():
                held.append(t)
        admitted = len(held)
        log = srv.log.read_text(errors="replace")
        for t in held:
            t.close()
    lines = sum(1 for line in log.splitlines() if "max connections per key" in line)
    return (
        f"logins with one key: {admitted} of {count} admitted; refusal: {refusal or 'none'};"
        f" {lines} log line(s) about the cap"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--circuits", type=int, default=256)
    parser.add_argument("--logins", type=int, default=300)
    parser.add_argument("--commit", default=None, help="run the server from git archive REV")
    args = parser.parse_args()
    tree = ROOT
    tmp = None
    if args.commit:
        tmp = tempfile.mkdtemp(prefix="nuttconch-budget-")
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.commit], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        tree = Path(tmp)
    # ``python -m nuttconch`` puts its working directory first on sys.path: run from the tree.
    os.chdir(tree)
    run = Run(tree)
    try:
        print(f"server tree: {args.commit or 'this checkout'}")
        print(circuits(run, args.circuits))
        print(logins(run, args.logins))
    finally:
        run.cleanup()
        if tmp:
            subprocess.run(["rm", "-rf", tmp], check=False)


if __name__ == "__main__":
    main()
