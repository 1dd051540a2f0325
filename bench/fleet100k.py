"""The 100,000 idle initiators row (issue 13.3) with a client's circuit setup latency
while they stand. ``nuttconch --workers W`` (reuse_port); before the fleet, ``--probes``
``ssh -N -R 7000:...`` initiators with one key and alias ``probe`` are started so the
kernel spreads them over every worker (each worker keeps its own names until the shared
registry is in), and ``--listeners`` ``ssh -N -L PORT:probe:7000`` client connections;
the socket tables (``ss -tnp``) tell which worker holds which, and one client connection
per worker that also holds a probe is kept for timing. Then client processes of
``bench/fleet.py burst --hold --concurrency 64`` (at most 15,000 each, ``--parallel`` at
once, each initiator from its own 127.x address) add the fleet step by step; after each
step: the sum of the workers' VmRSS, KiB per initiator, the time to accept the step, the
servers' CPU over a 10 s idle window, and ``--circuits`` circuit opens (connect to the
client's -L port, one byte echoed back by a device through the switchboard) spread over
the per-worker client connections. Stops by itself when available memory falls under
``--min-available`` MiB or at ``--stop-at`` (epoch seconds). Run from the repository
root::

    python bench/fleet100k.py --workers 6 --steps 20000,50000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.fleet_workers import workers_of  # noqa: E402
from bench.keepalive_cpu import cpu_seconds, rss_kib  # noqa: E402
from bench.storm import circuit_latency, echo_server, free_port, percentile  # noqa: E402
from tests.harness import host_key_dir, make_key  # noqa: E402

PER_CLIENT = 15000


def available_mib() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def sockets(filter_: str) -> list[tuple[str, str, int]]:
    """(local, peer, pid) of established TCP sockets matching an ss filter."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", filter_], capture_output=True, text=True
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        match = re.search(r"pid=(\d+)", line)
        if len(parts) >= 4 and match:
            rows.append((parts[2], parts[3], int(match.group(1))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--steps", default="20000,50000,100000")
    parser.add_argument("--parallel", type=int, default=2, help="client processes at once")
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--listeners", type=int, default=30)
    parser.add_argument("--circuits", type=int, default=200)
    parser.add_argument("--alive", default="15", help="server client_alive_interval")
    parser.add_argument("--min-available", type=int, default=3072)
    parser.add_argument("--stop-at", type=float, default=0.0)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    work = tempfile.mkdtemp(prefix="nuttconch-100k-")
    keys = os.path.join(work, "keys")
    shutil.copytree(host_key_dir(), keys)
    port = free_port()
    ini = os.path.join(work, "nuttssh.ini")
    with open(ini, "w") as handle:
        handle.write(
            f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {port}\nreuse_port = true\n"
            f"max_connections_per_key = 0\nlogin_grace_time = 120\n"
            f"client_alive_interval = {args.alive}\n"
            "per_source_penalty_exempt_list = 127.0.0.1\n"
            f"[keys]\nhost_key_dir = {keys}\n[log]\nlevel = warn\n"
        )
    key, public = make_key(work, "fleet")
    probe_key, probe_pub = make_key(work, "probe")
    client_key, client_pub = make_key(work, "client")
    with open(os.path.join(keys, "authorized_keys"), "w") as handle:
        handle.write(f'access="initiate" {public}\n')
        handle.write(f'access="initiate",alias="probe" {probe_pub}\n')
        handle.write(f'access="listen" {client_pub}\n')
    env = {**os.environ, "PYTHONPATH": ROOT}
    log = open(os.path.join(tempfile.gettempdir(), "fleet100k-server.log"), "ab")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "nuttconch", "--workers", str(args.workers), "--config", ini],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    print(f"supervisor pid {supervisor.pid}, port {port}", flush=True)
    time.sleep(5)
    workers = workers_of(supervisor.pid)
    print(f"workers {workers}", flush=True)
    device = echo_server()
    common = [
        "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
        "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=30",
        "-o", "ExitOnForwardFailure=yes", "-p", str(port),
    ]  # fmt: skip
    helpers: list[subprocess.Popen[bytes]] = []
    clients: list[subprocess.Popen[bytes]] = []
    stop = {"why": ""}

    def watchdog() -> None:
        while not stop["why"]:
            if available_mib() < args.min_available:
                stop["why"] = f"available memory {available_mib()} MiB < {args.min_available}"
            elif args.stop_at and time.time() > args.stop_at:
                stop["why"] = "time limit reached"
            time.sleep(1)
        if stop["why"] != "done":
            for client in clients:
                client.kill()

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        for _ in range(args.probes):
            helpers.append(subprocess.Popen(
                [*common, "-i", probe_key, "-N", "-R", f"7000:127.0.0.1:{device}",
                 "probe@127.0.0.1"], stdin=subprocess.DEVNULL,
            ))  # fmt: skip
            time.sleep(0.05)
        lports = {}
        for _ in range(args.listeners):
            lport = free_port()
            proc = subprocess.Popen(
                [*common, "-i", client_key, "-N", "-L", f"{lport}:probe:7000",
                 "client@127.0.0.1"], stdin=subprocess.DEVNULL,
            )  # fmt: skip
            helpers.append(proc)
            lports[proc.pid] = lport
            time.sleep(0.05)
        time.sleep(5)
        server_side = {peer: pid for _, peer, pid in sockets(f"( sport = :{port} )")}
        client_side = {local: pid for local, _, pid in sockets(f"( dport = :{port} )")}
        live = {p.pid for p in helpers if p.poll() is None}
        worker_of = {cpid: server_side.get(local) for local, cpid in client_side.items()}
        probes_on: dict[int, int] = {}
        chosen: dict[int, int] = {}
        for cpid, wpid in worker_of.items():
            if cpid not in live or wpid is None:
                continue
            if cpid in lports:
                chosen.setdefault(wpid, lports[cpid])
            else:
                probes_on[wpid] = probes_on.get(wpid, 0) + 1
        listening_on = [
            sum(1 for c, w in worker_of.items() if w == wp and c in lports) for wp in workers
        ]
        print(
            f"probes alive per worker {[probes_on.get(w, 0) for w in workers]};"
            f" client connections per worker {listening_on}",
            flush=True,
        )
        timing = [chosen[w] for w in workers if w in chosen and probes_on.get(w)]
        print(f"timing through {len(timing)} of {len(workers)} workers", flush=True)
        for lport in timing:
            print(f"  warm-up circuit via {lport}: {circuit_latency(lport)}", flush=True)

        def measure(held: int) -> None:
            cpu0 = sum(cpu_seconds(p) for p in workers)
            time.sleep(10)
            cpu = sum(cpu_seconds(p) for p in workers) - cpu0
            samples = [circuit_latency(timing[i % len(timing)]) for i in range(args.circuits)]
            ok = [s * 1000 for s in samples if s is not None]
            print(
                f"  at {held}: servers' CPU {cpu / 10 * 100:.0f} % of one core while idle;"
                f" circuit setup {len(ok)}/{len(samples)} ok, p50 "
                f"{percentile(ok, 50) if ok else float('nan'):.2f} ms, p99 "
                f"{percentile(ok, 99) if ok else float('nan'):.2f} ms, max "
                f"{max(ok) if ok else float('nan'):.2f} ms",
                flush=True,
            )

        base = sum(rss_kib(p) for p in workers)
        print(f"{base / 1024:.0f} MiB in all before the fleet (probes and clients standing)")
        measure(0)
        held = 0
        started = time.monotonic()
        for target in steps:
            begun = time.monotonic()
            chunks = []
            left = target - held
            first = held
            while left > 0:
                count = min(PER_CLIENT, left)
                chunks.append((first, count))
                first += count
                left -= count
            short = False
            while chunks and not stop["why"]:
                batch, chunks = chunks[: args.parallel], chunks[args.parallel :]
                running = []
                for first, count in batch:
                    client = subprocess.Popen(
                        [
                            sys.executable, os.path.join(ROOT, "bench", "fleet.py"), "burst",
                            "--hold", "--port", str(port), "--count", str(count), "--key", key,
                            "--spread", "--first", str(first), "--concurrency", "64",
                            "--timeout", "120",
                        ],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                    )  # fmt: skip
                    clients.append(client)
                    running.append((client, count))
                for client, count in running:
                    assert client.stdout is not None
                    line = client.stdout.readline()
                    if not line:
                        print(f"  a client ended without an answer ({stop['why']})", flush=True)
                        short = True
                        continue
                    answer = json.loads(line)
                    held += answer["ok"]
                    if answer["ok"] < count:
                        print(f"  a client got {answer['ok']} of {count}", flush=True)
                        short = True
                print(
                    f"    {held} held at {time.monotonic() - started:.0f} s,"
                    f" {sum(rss_kib(p) for p in workers) / 1024:.0f} MiB,"
                    f" available {available_mib()} MiB, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                if short:
                    break
            seconds = time.monotonic() - begun
            time.sleep(3)
            rss = sum(rss_kib(p) for p in workers)
            per_worker = [round(rss_kib(p) / 1024) for p in workers]
            fds = [len(os.listdir(f"/proc/{p}/fd")) for p in workers]
            client_rss = sum(rss_kib(c.pid) for c in clients if c.poll() is None)
            print(
                f"{held} initiators held: servers {rss / 1024:.0f} MiB in all"
                f" ({per_worker} MiB per worker, {fds} descriptors),"
                f" {(rss - base) / max(1, held):.1f} KiB per initiator; this step accepted in"
                f" {seconds:.0f} s; clients {client_rss / 1024:.0f} MiB; available"
                f" {available_mib()} MiB",
                flush=True,
            )
            if stop["why"]:
                print(f"stopped: {stop['why']}", flush=True)
                break
            measure(held)
            if held < target or short:
                break
    finally:
        stop["why"] = stop["why"] or "done"
        for client in clients:
            client.kill()
        for helper in helpers:
            helper.kill()
        for client in clients + helpers:
            client.wait()
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(40)
        except subprocess.TimeoutExpired:
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            supervisor.kill()
            supervisor.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
