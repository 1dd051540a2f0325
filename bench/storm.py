"""Reconnect storm (issue 13.2): N initiators come back after a restart and after a crash.

Starts a server (``python -m nuttconch``) on a free loopback port, a fleet of N
initiators (``bench/fleet.py storm``: asyncssh, one fleet key, each from its own
127.1.x.y address, reconnecting as autossh does), a probe initiator and a client
holding ``ssh -L`` to it (both real OpenSSH in reconnect loops). Then, twice, it
stops the server (SIGTERM, then SIGKILL) and starts it again at once, and reports
the time until the last initiator is back and the client's circuit setup latency
(connect to the -L port, one byte echoed through the switchboard) during the storm.
Run from the repository root::

    python bench/storm.py [--count 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.harness import host_key_dir, make_key  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def echo_server() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def ssh_loop(args: list[str]) -> subprocess.Popen[bytes]:
    """An ssh command restarted half a second after it ends, as autossh would."""
    quoted = " ".join(f"'{a}'" for a in args)
    return subprocess.Popen(
        ["sh", "-c", f"while true; do {quoted} </dev/null >/dev/null 2>&1; sleep 0.5; done"],
        start_new_session=True,
    )


def circuit_latency(port: int) -> float | None:
    """Connect to the client's -L port and get one byte back through the switchboard."""
    begun = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                return None
    except OSError:
        return None
    return time.monotonic() - begun


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="nuttconch-storm-")
    keys = os.path.join(work, "keys")
    shutil.copytree(host_key_dir(), keys)
    port = free_port()
    ini = os.path.join(work, "nuttssh.ini")
    with open(ini, "w") as handle:
        handle.write(
            f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {port}\n"
            f"per_source_penalty_exempt_list = 127.0.0.1\n[keys]\nhost_key_dir = {keys}\n"
            "[log]\nlevel = warn\n"
        )
    fleet_key, fleet_pub = make_key(work, "fleet")
    probe_key, probe_pub = make_key(work, "probe")
    client_key, client_pub = make_key(work, "client")
    with open(os.path.join(keys, "authorized_keys"), "w") as handle:
        handle.write(f'access="initiate" {fleet_pub}\n')
        handle.write(f'access="initiate",alias="probe" {probe_pub}\n')
        handle.write(f'access="listen" {client_pub}\n')
    env = {**os.environ, "PYTHONPATH": ROOT}
    log = open(os.path.join(work, "server.log"), "ab")

    def start_server() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "nuttconch", "--config", ini], stdout=log, stderr=log, env=env
        )

    server = start_server()
    time.sleep(2)
    device = echo_server()
    lport = free_port()
    common = [
        "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
        "-o", "ServerAliveInterval=5", "-o", "ExitOnForwardFailure=yes", "-p", str(port),
    ]  # fmt: skip
    probe = [*common, "-i", probe_key, "-N", "-R", f"7000:127.0.0.1:{device}"]
    client = [*common, "-i", client_key, "-N", "-L", f"{lport}:probe:7000"]
    loops = [ssh_loop([*probe, "probe@127.0.0.1"]), ssh_loop([*client, "client@127.0.0.1"])]
    fleet = subprocess.Popen(
        [
            sys.executable, os.path.join(ROOT, "bench", "fleet.py"), "storm",
            "--port", str(port), "--count", str(args.count), "--key", fleet_key, "--spread",
            "--retry", "1", "--timeout", "30",
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    events: list[dict] = []

    def read() -> None:
        assert fleet.stdout is not None
        for line in fleet.stdout:
            events.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while not events and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"{args.count} initiators up: {events[0] if events else 'not all up in 300 s'}")
    while circuit_latency(lport) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    quiet = [x for x in (circuit_latency(lport) for _ in range(50)) if x is not None]
    print(
        f"client circuit setup with {args.count} initiators standing: p50"
        f" {percentile(quiet, 50) * 1000:.1f} ms, p99 {percentile(quiet, 99) * 1000:.1f} ms"
    )
    rows = []
    try:
        for how in ("SIGTERM", "SIGKILL"):
            seen = len(events)
            server.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
            server.wait(30)
            stopped = time.monotonic()
            server = start_server()
            latencies: list[float] = []
            failures = 0
            end = stopped + 120
            while time.monotonic() < end and len(events) == seen:
                sample = circuit_latency(lport)
                if sample is None:
                    failures += 1
                else:
                    latencies.append(sample)
                time.sleep(0.1)
            back = events[seen] if len(events) > seen else None
            since_stop = time.monotonic() - stopped
            lat = (
                f"client circuit setup during the storm: {len(latencies)} ok"
                f" (p50 {percentile(latencies, 50) * 1000:.1f} ms, p99"
                f" {percentile(latencies, 99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms),"
                f" {failures} tries failed while the probe was not back"
                if latencies
                else f"no circuit while the fleet came back ({failures} tries failed)"
            )
            row = (
                f"{how} + immediate restart, {args.count} initiators: all back"
                f" {since_stop:.1f} s after the old server was gone"
                f" (fleet: last back {back['seconds']:.1f} s after its first loss);"
                if back
                else f"{how}: not all back within 120 s;"
            ) + f" {lat}"
            print(row, flush=True)
            rows.append(row)
            time.sleep(3)
    finally:
        fleet.kill()
        for loop in loops:
            os.killpg(loop.pid, signal.SIGKILL)
        server.send_signal(signal.SIGKILL)
        server.wait()
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
