"""Bulk throughput of one circuit: nuttconch (one or more checkouts) against a real sshd.

The same topology for every server, OpenSSH clients on both ends:

    target --TCP--> ssh -R (initiator) ==SSH==> server ==SSH==> ssh -W (client) --> stdout

The target writes SIZE bytes and closes; the client's stdout is read here and
the rate is SIZE over the time from its first to its last byte.  For sshd the
initiator's ``-R`` makes sshd listen on a loopback port, and the client's
``-W localhost:PORT`` reaches it, so sshd forwards both hops too.

    python bench/cipher_throughput.py --size 512M --runs 3 \\
        --nuttconch before=/tmp/nutt-before --nuttconch after=. [--cipher aes128-gcm@openssh.com]

Each ``--nuttconch LABEL=PATH`` is a source tree whose ``nuttconch`` package
is imported by a server subprocess.  Prints a table and the ratios to sshd.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SSH = shutil.which("ssh") or "ssh"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

SERVER_SCRIPT = r"""
import sys
from twisted.internet import reactor
from nuttconch import config
from nuttconch.tap import build
cfg = config.load(sys.argv[1])
factory, registry = build(cfg)
port = reactor.listenTCP(0, factory, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def parse_size(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


class Target(threading.Thread):
    """Accepts connections; writes SIZE bytes to each and closes."""

    def __init__(self, size: int) -> None:
        super().__init__(daemon=True)
        self.size = size
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        block = os.urandom(1 << 20)
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self.serve, args=(conn, block), daemon=True).start()

    def serve(self, conn: socket.socket, block: bytes) -> None:
        left = self.size
        try:
            while left > 0:
                n = min(left, len(block))
                conn.sendall(block[:n])
                left -= n
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        except OSError:
            pass
        finally:
            conn.close()


def ssh_base(workdir: str, key: str, port: int, user: str, cipher: str | None) -> list[str]:
    args = [
        SSH, "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none", "-o", "StrictHostKeyChecking=no",
        "-o", f"UserKnownHostsFile={workdir}/known_hosts", "-o", "LogLevel=ERROR",
        "-i", key, "-p", str(port), "-l", user,
    ]  # fmt: skip
    if cipher:
        args += ["-c", cipher]
    return args


def measure(client_args: list[str], size: int) -> float:
    proc = subprocess.Popen(client_args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    got = 0
    first = last = 0.0
    while True:
        chunk = proc.stdout.read1(1 << 20)  # type: ignore[attr-defined]
        if not chunk:
            break
        if not got:
            first = time.perf_counter()
        got += len(chunk)
        last = time.perf_counter()
    proc.wait()
    if got != size:
        raise RuntimeError(f"received {got} of {size} bytes")
    return size / (last - first) / (1 << 20)


def make_key(workdir: str, name: str = "id_ed25519") -> str:
    key = os.path.join(workdir, name)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    return key


def run_nuttconch(tree: str, workdir: str, key: str, size: int, cipher: str | None, runs: int):
    keydir = os.path.join(workdir, "keys-" + os.path.basename(os.path.abspath(tree)))
    os.makedirs(keydir, exist_ok=True)
    ini = os.path.join(workdir, "nuttssh.ini")
    with open(ini, "w") as handle:
        handle.write(
            "[server]\nlisten_host = 127.0.0.1\nlisten_port = 0\nserver_fqdn = bench\n"
            "max_startups = 100\n"
            f"[keys]\nhost_key_dir = {keydir}\n"
        )
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, ini],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=workdir,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        target = Target(size)
        target.start()
        initiator = subprocess.Popen(
            ssh_base(workdir, key, port, "dev", cipher)
            + ["-N", "-R", f"9000:localhost:{target.port}", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # TOFU + registration
            client = ssh_base(workdir, key + "2", port, "reader", cipher)
            name = who(workdir, key, port)
            results = []
            for _ in range(runs):
                results.append(measure(client + ["-W", f"{name}:9000", "127.0.0.1"], size))
            return results
        finally:
            initiator.terminate()
            initiator.wait()
    finally:
        server.terminate()
        server.wait()


def who(workdir: str, key: str, port: int) -> str:
    out = subprocess.run(
        ssh_base(workdir, key, port, "dev", None) + ["127.0.0.1", "whoami"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("names:"):
            return line.split()[1].rstrip(",")
    raise RuntimeError(f"no name in {out!r}")


def run_sshd(workdir: str, key: str, size: int, cipher: str | None, runs: int):
    port = free_port()
    hostkey = os.path.join(workdir, "sshd_host_key")
    if not os.path.exists(hostkey):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostkey], check=True)
    auth = os.path.join(workdir, "sshd_authorized_keys")
    shutil.copy(key + ".pub", auth)
    cfg = os.path.join(workdir, "sshd_config")
    with open(cfg, "w") as handle:
        handle.write(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\n"
            f"AuthorizedKeysFile {auth}\nPidFile none\nUsePAM no\nStrictModes no\n"
            "AllowTcpForwarding yes\nPermitRootLogin prohibit-password\n"
        )
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", cfg], stderr=subprocess.DEVNULL)
    user = (
        os.environ.get("USER")
        or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    )
    try:
        wait_port(port)
        target = Target(size)
        target.start()
        rport = free_port()
        initiator = subprocess.Popen(
            ssh_base(workdir, key, port, user, cipher)
            + ["-N", "-R", f"{rport}:localhost:{target.port}", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_port(rport)
            client = ssh_base(workdir, key, port, user, cipher)
            return [
                measure(client + ["-W", f"localhost:{rport}", "127.0.0.1"], size)
                for _ in range(runs)
            ]
        finally:
            initiator.terminate()
            initiator.wait()
    finally:
        sshd.terminate()
        sshd.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cipher", default=None, help="ssh -c value (default: negotiated)")
    parser.add_argument("--nuttconch", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--no-sshd", action="store_true")
    args = parser.parse_args()
    size = parse_size(args.size)
    workdir = tempfile.mkdtemp(prefix="cipher-bench-")
    key = make_key(workdir)
    make_key(workdir, "id_ed25519" + "2")
    rows: list[tuple[str, list[float]]] = []
    if not args.no_sshd:
        rows.append(("sshd", run_sshd(workdir, key, size, args.cipher, args.runs)))
    for spec in args.nuttconch or ["current=."]:
        label, _, tree = spec.partition("=")
        rows.append((label, run_nuttconch(tree, workdir, key, size, args.cipher, args.runs)))
    base = statistics.median(rows[0][1]) if not args.no_sshd else None
    print(f"size {size >> 20} MiB, cipher {args.cipher or 'default'}, runs {args.runs}")
    print(f"{'server':<12} {'median MiB/s':>12} {'runs':<30} {'vs sshd':>8}")
    for label, values in rows:
        med = statistics.median(values)
        ratio = f"{med / base:.2f}" if base else "-"
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"{label:<12} {med:>12.1f} {runs:<30} {ratio:>8}")


if __name__ == "__main__":
    main()
