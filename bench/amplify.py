"""Issue 9.2 figure: what greeting sessions plus a forward add/cancel loop cost the server.

    python bench/amplify.py [--sessions 1000] [--cycles 500] [--commit REV]

Starts ``python -m nuttconch`` on a free loopback port (first-use trust on, log to a
file, no penalties for 127.0.0.1), logs in with a fresh first-use key through Conch's
client (tests/rawssh.py), opens ``--sessions`` session channels with a zero window and
asks each for a shell (the greeting), then sends ``--cycles`` pairs of ``tcpip-forward``
(port 0) / ``cancel-tcpip-forward``. Prints the server's RSS growth, its CPU seconds
(utime+stime from /proc), the log bytes written, the request bytes sent, and how many
cycles the server granted. The server is stopped by its pid; the temp dir is removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: str, commit: str | None, extra_ini: str = "") -> tuple[Any, int, Path]:
    """``python -m nuttconch`` from this checkout (or ``git archive commit``) on a free port."""
    src = ROOT
    if commit:
        src = Path(tmp) / "src"
        src.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    port = _free_port()
    keydir = Path(tmp) / "keys"
    ini = Path(tmp) / "nuttssh.ini"
    ini.write_text(
        f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {port}\n"
        "per_source_penalty_exempt_list = 127.0.0.1\nmax_channels = 2048\n"
        f"{extra_ini}[keys]\nhost_key_dir = {keydir}\n[log]\nlevel = info\n"
    )
    logpath = Path(tmp) / "server.log"
    env = dict(os.environ, PYTHONPATH=str(src))
    with open(logpath, "wb") as logfile:
        server = subprocess.Popen(
            [sys.executable, "-m", "nuttconch", "--config", str(ini)],
            cwd=tmp,
            env=env,
            stdout=logfile,
            stderr=subprocess.STDOUT,
        )
    return server, port, logpath


def stop_server(server: Any) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--show-log", action="store_true", help="print the server log")
    parser.add_argument("--commit", default=None, help="run the server from git archive REV")
    args = parser.parse_args()

    from twisted.conch.ssh import common, keys
    from twisted.internet import defer, task

    from tests import rawssh

    tmp = tempfile.mkdtemp(prefix="nuttconch-amplify-")
    server, port, logpath = start_server(tmp, args.commit)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    clientKey = keys.Key(ed25519.Ed25519PrivateKey.generate())
    keypath = Path(tmp) / "client"
    keypath.write_bytes(clientKey.toString("openssh", subtype="v1"))
    result: dict[str, Any] = {}

    @defer.inlineCallbacks
    def attack(reactor: Any) -> Any:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                yield task.deferLater(reactor, 0.2, lambda: None)
        c = yield rawssh.connect_client(port, key=str(keypath), user=b"amp", timeout=120)
        assert c.authenticated, c.banner
        yield task.deferLater(reactor, 1.0, lambda: None)
        rss0, cpu0, log0 = _rss_kb(server.pid), _cpu_s(server.pid), logpath.stat().st_size
        sent = 0
        opened = refusedShells = 0
        for _ in range(args.sessions):
            if c.isLost:
                break
            num, payload = yield c.conn.openRaw(b"session", window=0)
            if num != 91:
                continue
            remote = struct.unpack(">2L", payload[:8])[1]
            body = struct.pack(">L", remote) + common.NS(b"shell") + b"\x01"
            c.sendPacket(98, body)
            sent += len(body) + 1
            reply, _ = yield c.inbox.expect((99, 100), timeout=30)
            if reply == 99:
                opened += 1
            else:
                refusedShells += 1
        granted = refusedCycles = 0
        for _ in range(args.cycles):
            if c.isLost:
                break
            data = common.NS(b"") + struct.pack(">L", 0)
            sent += len(data) + 20
            num, payload = yield c.conn.globalRequest(b"tcpip-forward", data)
            if num != 81:
                refusedCycles += 1
                continue
            (allocated,) = struct.unpack(">L", payload[:4])
            cancel = common.NS(b"") + struct.pack(">L", allocated)
            sent += len(cancel) + 27
            yield c.conn.globalRequest(b"cancel-tcpip-forward", cancel)
            granted += 1
        # Let the server finish what it queued.
        yield task.deferLater(reactor, 1.0, lambda: None)
        result.update(
            rss_growth_mb=(_rss_kb(server.pid) - rss0) / 1024,
            cpu_s=_cpu_s(server.pid) - cpu0,
            log_bytes=logpath.stat().st_size - log0,
            request_bytes=sent,
            shell_requests_ok=opened,
            shell_requests_failed=refusedShells,
            cycles_granted=granted,
            cycles_refused=refusedCycles,
            connection_lost=c.isLost,
        )
        c.close()

    try:
        task.react(lambda reactor: attack(reactor))
    except SystemExit:
        pass
    finally:
        stop_server(server)
        if args.show_log:
            print(logpath.read_text())
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"sessions={args.sessions} cycles={args.cycles} "
        + " ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
        )
    )


if __name__ == "__main__":
    main()
