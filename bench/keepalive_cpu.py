"""Keepalive CPU with many idle initiators (issue 13.3): is the per-connection timer cost
linear? For each N, a fresh server (``python -m nuttconch``, client_alive_interval 15 s)
gets N idle initiators (``bench/fleet.py burst --hold``: one fleet key, each from its own
127.1.x.y address); then the server's CPU seconds over a 30 s idle window (two
keepalive rounds) and its RSS are read from /proc. Run from the repository root::

    python bench/keepalive_cpu.py [--on-only] [N ...]

Logins are paced (64 in flight) so that MaxStartups does not refuse a crowd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.storm import free_port  # noqa: E402
from tests.harness import host_key_dir, make_key  # noqa: E402

WINDOW = 30.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(count: int, interval: str) -> dict:
    work = tempfile.mkdtemp(prefix="nuttconch-keepalive-")
    keys = os.path.join(work, "keys")
    shutil.copytree(host_key_dir(), keys)
    port = free_port()
    ini = os.path.join(work, "nuttssh.ini")
    with open(ini, "w") as handle:
        handle.write(
            f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {port}\n"
            f"client_alive_interval = {interval}\nmax_connections_per_key = 0\n"
            f"login_grace_time = 120\n[keys]\nhost_key_dir = {keys}\n[log]\nlevel = warn\n"
        )
    key, public = make_key(work, "fleet")
    with open(os.path.join(keys, "authorized_keys"), "w") as handle:
        handle.write(f'access="initiate" {public}\n')
    env = {**os.environ, "PYTHONPATH": ROOT}
    server = subprocess.Popen([sys.executable, "-m", "nuttconch", "--config", ini], env=env)
    time.sleep(2)
    rss0 = rss_kib(server.pid)
    begun = time.monotonic()
    fleet = subprocess.Popen(
        [
            sys.executable, os.path.join(ROOT, "bench", "fleet.py"), "burst", "--hold",
            "--port", str(port), "--count", str(count), "--key", key, "--spread",
            "--timeout", "120", "--concurrency", "64",
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert fleet.stdout is not None
    held = json.loads(fleet.stdout.readline())
    accepted = time.monotonic() - begun
    time.sleep(5)
    cpu0 = cpu_seconds(server.pid)
    time.sleep(WINDOW)
    cpu = cpu_seconds(server.pid) - cpu0
    rss = rss_kib(server.pid)
    fleet.kill()
    server.kill()
    server.wait()
    fleet.wait()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "count": count,
        "held": held["ok"],
        "interval": interval,
        "accept_seconds": round(accepted, 1),
        "cpu_seconds": round(cpu, 2),
        "rss_mib": round(rss / 1024, 1),
        "kib_per_connection": round((rss - rss0) / max(1, held["ok"]), 1),
    }


def main() -> None:
    words = sys.argv[1:]
    intervals = ("15",) if "--on-only" in words else ("15", "0")
    counts = [int(a) for a in words if a.isdigit()] or [2000, 8000]
    for count in counts:
        for interval in intervals:
            row = run(count, interval)
            per = row["cpu_seconds"] / max(1, row["held"]) / (WINDOW / 15) * 1e6
            print(
                json.dumps(row)
                + (f"  # {per:.0f} µs server CPU per keepalive" if interval != "0" else ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
