"""Load generator run by ``bench/run.py`` against an ``ssh -L`` port (plain sockets).

Each subcommand prints one JSON object on standard output. Every loop is bounded by
a byte or circuit count and by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time

CHUNK = 256 * 1024
PAYLOAD = memoryview(os.urandom(CHUNK))


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def up(port: int, nbytes: int, max_seconds: float) -> dict:
    """Send nbytes to the sink; the sink's count after EOF marks the end."""
    deadline = time.monotonic() + max_seconds
    sock = _connect(port, max_seconds + 30)
    with sock:
        start = time.monotonic()
        sent = 0
        while sent < nbytes and time.monotonic() < deadline:
            n = min(CHUNK, nbytes - sent)
            sock.sendall(PAYLOAD[:n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            part = sock.recv(64)
            if not part:
                break
            reply += part
        elapsed = time.monotonic() - start
    got = int(reply.strip() or 0)
    return {"bytes": got, "seconds": elapsed, "complete": got == nbytes}


def down(port: int, nbytes: int, max_seconds: float) -> dict:
    """Ask the source for nbytes and read them."""
    deadline = time.monotonic() + max_seconds
    sock = _connect(port, max_seconds + 30)
    buf = bytearray(CHUNK)
    with sock:
        start = time.monotonic()
        sock.sendall(b"%d\n" % nbytes)
        got = 0
        while got < nbytes and time.monotonic() < deadline:
            n = sock.recv_into(buf)
            if not n:
                break
            got += n
        elapsed = time.monotonic() - start
    return {"bytes": got, "seconds": elapsed, "complete": got == nbytes}


def parallel(port: int, nbytes: int, count: int, max_seconds: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            res = up(port, nbytes, max_seconds)
        except OSError as exc:
            res = {"bytes": 0, "seconds": max_seconds, "complete": False, "error": str(exc)}
        with lock:
            results.append(res)

    start = time.monotonic()
    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 60)
    elapsed = time.monotonic() - start
    total = sum(r["bytes"] for r in results)
    return {
        "bytes": total,
        "seconds": elapsed,
        "complete": len(results) == count and all(r["complete"] for r in results),
    }


def setup(port: int, count: int, max_seconds: float) -> dict:
    """Sequential circuits: connect, send one byte, wait for its echo, close."""
    deadline = time.monotonic() + max_seconds
    times: list[float] = []
    errors = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        start = time.monotonic()
        try:
            with _connect(port, 10) as sock:
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    errors += 1
                    continue
                times.append((time.monotonic() - start) * 1000.0)
        except OSError:
            errors += 1
    return {"ms": times, "errors": errors}


def slow(port: int, rate: int, seconds: float) -> dict:
    """Ask the source for far more than we read; read at ``rate`` bytes/s for ``seconds``."""
    sock = _connect(port, seconds + 30)
    tick = 0.05
    quota = max(1, int(rate * tick))
    got = 0
    with sock:
        sock.sendall(b"%d\n" % (1 << 40))
        start = time.monotonic()
        next_tick = start
        while time.monotonic() - start < seconds:
            want = quota
            while want > 0:
                data = sock.recv(min(want, 65536))
                if not data:
                    break
                want -= len(data)
                got += len(data)
            next_tick += tick
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        elapsed = time.monotonic() - start
    return {"bytes": got, "seconds": elapsed}


def probe(port: int, max_seconds: float) -> dict:
    """Wait until a one-byte echo works through the tunnel."""
    deadline = time.monotonic() + max_seconds
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        try:
            with _connect(port, 5) as sock:
                sock.settimeout(5)
                sock.sendall(b"p")
                if sock.recv(1) == b"p":
                    return {"ok": True, "tries": tries}
        except OSError:
            pass
        time.sleep(0.1)
    return {"ok": False, "tries": tries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["up", "down", "parallel", "setup", "slow", "probe"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--rate", type=int, default=1 << 20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    a = parser.parse_args()
    if a.mode == "up":
        res = up(a.port, a.bytes, a.max_seconds)
    elif a.mode == "down":
        res = down(a.port, a.bytes, a.max_seconds)
    elif a.mode == "parallel":
        res = parallel(a.port, a.bytes, a.count, a.max_seconds)
    elif a.mode == "setup":
        res = setup(a.port, a.count, a.max_seconds)
    elif a.mode == "slow":
        res = slow(a.port, a.rate, a.seconds)
    else:
        res = probe(a.port, a.max_seconds)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
