"""Idle initiators spread over worker processes sharing the port (issue 13.3, the
multi-worker part): ``nuttconch --workers W`` with ``reuse_port``; client processes of
``bench/fleet.py burst --hold`` (at most 15,000 each: a process may hold 20,000 files
here) add initiators step by step, each from its own 127.x address; after each step the
total server memory (sum of the workers' VmRSS) and the time to accept the step.
Run from the repository root::

    python bench/fleet_workers.py --workers 2 --steps 10000,20000,30000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.keepalive_cpu import rss_kib  # noqa: E402
from bench.storm import free_port  # noqa: E402
from tests.harness import host_key_dir, make_key  # noqa: E402

PER_CLIENT = 15000


def workers_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", default="10000,20000,30000")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    work = tempfile.mkdtemp(prefix="nuttconch-workers-")
    keys = os.path.join(work, "keys")
    shutil.copytree(host_key_dir(), keys)
    port = free_port()
    ini = os.path.join(work, "nuttssh.ini")
    with open(ini, "w") as handle:
        handle.write(
            f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {port}\nreuse_port = true\n"
            "max_connections_per_key = 0\nlogin_grace_time = 120\n"
            f"[keys]\nhost_key_dir = {keys}\n[log]\nlevel = warn\n"
        )
    key, public = make_key(work, "fleet")
    with open(os.path.join(keys, "authorized_keys"), "w") as handle:
        handle.write(f'access="initiate" {public}\n')
    env = {**os.environ, "PYTHONPATH": ROOT}
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "nuttconch", "--workers", str(args.workers), "--config", ini],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(4)
    workers = workers_of(supervisor.pid)
    base = sum(rss_kib(p) for p in workers)
    print(f"{args.workers} workers, {base / 1024:.0f} MiB together before any initiator")
    clients: list[subprocess.Popen[bytes]] = []
    held = 0
    try:
        for target in steps:
            begun = time.monotonic()
            while held < target:
                count = min(PER_CLIENT, target - held)
                client = subprocess.Popen(
                    [
                        sys.executable, os.path.join(ROOT, "bench", "fleet.py"), "burst",
                        "--hold", "--port", str(port), "--count", str(count), "--key", key,
                        "--spread", "--first", str(held), "--concurrency", "64",
                        "--timeout", "120",
                    ],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                )  # fmt: skip
                clients.append(client)
                assert client.stdout is not None
                answer = json.loads(client.stdout.readline())
                held += answer["ok"]
                if answer["ok"] < count:
                    print(f"  a client got {answer['ok']} of {count}")
                    break
            seconds = time.monotonic() - begun
            time.sleep(3)
            rss = sum(rss_kib(p) for p in workers)
            per_worker = [round(rss_kib(p) / 1024) for p in workers]
            print(
                f"{held} initiators held: servers {rss / 1024:.0f} MiB in all"
                f" ({per_worker} MiB per worker), {(rss - base) / max(1, held):.1f} KiB per"
                f" initiator; this step accepted in {seconds:.0f} s",
                flush=True,
            )
            if held < target:
                break
    finally:
        for client in clients:
            client.kill()
        supervisor.terminate()
        supervisor.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
