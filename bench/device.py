"""The benchmark's "device": TCP sink, source and echo servers on one loopback address.

Run as a subprocess by ``bench/run.py`` (possibly inside a network namespace). It
prints one JSON line with its ports, then serves until its standard input closes or
``--max-seconds`` pass.

- sink: reads until EOF, then answers ``<bytes received>\\n`` and closes;
- source: reads a line ``N\\n``, sends N bytes as fast as it can, then closes;
- echo: sends back whatever it receives until EOF.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading

CHUNK = 256 * 1024
PAYLOAD = memoryview(os.urandom(1024 * 1024))


def _nodelay(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def sink(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    total = 0
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        total += n
    conn.sendall(b"%d\n" % total)


def source(conn: socket.socket) -> None:
    line = b""
    while not line.endswith(b"\n") and len(line) < 64:
        part = conn.recv(64 - len(line))
        if not part:
            return
        line += part
    remaining = int(line.strip())
    size = len(PAYLOAD)
    while remaining > 0:
        n = min(remaining, size)
        conn.sendall(PAYLOAD[:n])
        remaining -= n


def echo(conn: socket.socket) -> None:
    _nodelay(conn)
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)


def _handle(fn, conn: socket.socket) -> None:
    try:
        with conn:
            fn(conn)
    except OSError:
        pass


def _serve(listener: socket.socket, fn) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_handle, args=(fn, conn), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-seconds", type=float, default=7200.0)
    args = parser.parse_args()
    ports = {}
    for name, fn in (("sink", sink), ("source", source), ("echo", echo)):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.host, 0))
        listener.listen(1024)
        ports[name] = listener.getsockname()[1]
        threading.Thread(target=_serve, args=(listener, fn), daemon=True).start()
    print(json.dumps(ports), flush=True)
    done = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    done.wait(args.max_seconds)
    os._exit(0)


if __name__ == "__main__":
    main()
