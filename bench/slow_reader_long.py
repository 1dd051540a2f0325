"""Peak server memory of one slow-reader circuit: fast sender, reader at RATE, SIZE in all.

    python bench/slow_reader_long.py [--size-mib 200] [--rate-mib 1]

Starts nuttconch (python -m nuttconch) on a free loopback port with its own keys, a
device behind ``ssh -N -R`` that writes SIZE as fast as TCP allows, and a client
``ssh -W`` whose stdout is read at RATE MiB/s. Samples the server's VmRSS every
0.5 s and prints the baseline, the peak and the growth. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def device(size: int) -> int:
    """A TCP service that writes ``size`` bytes as fast as it can to each connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    block = hashlib.sha256(b"x").digest() * 8192

    def serve() -> None:
        conn, _ = srv.accept()
        sent = 0
        while sent < size:
            chunk = block[: min(len(block), size - sent)]
            conn.sendall(chunk)
            sent += len(chunk)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--rate-mib", type=float, default=1.0)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    rate = args.rate_mib * 1024 * 1024
    tmp = tempfile.mkdtemp(prefix="nuttconch-slow-")
    port = free_port()
    ini = os.path.join(tmp, "nuttssh.ini")
    with open(ini, "w") as handle:
        handle.write(
            f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {port}\nenable_auth = false\n"
            f"[keys]\nhost_key_dir = {tmp}/keys\n[log]\nlevel = warn\n"
        )
    key = os.path.join(tmp, "id")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    env = dict(os.environ, PYTHONPATH=ROOT)
    server = subprocess.Popen([sys.executable, "-m", "nuttconch", "--config", ini], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ssh = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
           "-o", f"UserKnownHostsFile={tmp}/kh", "-o", "IdentitiesOnly=yes", "-i", key,
           "-p", str(port)]  # fmt: skip
    procs = [server]
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        dev = device(size)
        init = subprocess.Popen(ssh + ["-N", "-o", "ExitOnForwardFailure=yes",
                                       "-R", f"9000:127.0.0.1:{dev}", "dev@127.0.0.1"])  # fmt: skip
        procs.append(init)
        who = subprocess.run(ssh + ["dev@127.0.0.1", "whoami"], capture_output=True, text=True,
                             timeout=20).stdout  # fmt: skip
        alias = who.split("names: ")[1].split(",")[0].split()[0]
        time.sleep(1)
        baseline = rss_kib(server.pid)
        client = subprocess.Popen(ssh + ["-W", f"{alias}:9000", "reader@127.0.0.1"],
                                  stdout=subprocess.PIPE, stdin=subprocess.PIPE)  # fmt: skip
        procs.append(client)
        assert client.stdout is not None
        peak = baseline
        got = 0
        started = time.monotonic()
        deadline = started + size / rate * 1.5 + 60
        next_sample = 0.0
        while got < size and time.monotonic() < deadline:
            due = started + got / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            chunk = client.stdout.read1(65536)
            if not chunk:
                break
            got += len(chunk)
            if time.monotonic() >= next_sample:
                peak = max(peak, rss_kib(server.pid))
                next_sample = time.monotonic() + 0.5
        elapsed = time.monotonic() - started
        peak = max(peak, rss_kib(server.pid))
        rate_got = got / elapsed / 1048576
        print(f"bytes received: {got} of {size} in {elapsed:.1f}s ({rate_got:.2f} MiB/s)")
        growth = peak - baseline
        print(f"server RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth} KiB")
        print(f"server VmHWM {rss_kib(server.pid, 'VmHWM')} KiB")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
