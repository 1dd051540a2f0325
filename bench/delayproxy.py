"""A user-space TCP delay proxy: the long-link fallback when the kernel has no netem.

``bench/run.py`` puts one in front of each server (nuttconch and sshd alike) when
``tc qdisc ... netem`` is unavailable: the ssh clients connect to the proxy, which
forwards to the server, holding every chunk for ``--delay-ms`` in each direction
(so 20 ms gives a 40 ms round trip between the clients and the server).

It prints one JSON line, ``{"port": N}``, once it listens, and runs until killed.

Not a faithful link model: the proxy acknowledges bytes at once on each side, so the
endpoints' TCP sees a short loopback round trip; what sees the delay is everything
end to end above TCP, i.e. SSH's channel windows and the request/response exchanges,
which are what a long link limits. Bytes in flight per direction and connection are
bounded (``--max-inflight``, default 16 MiB: above Linux's largest TCP windows, so the
proxy is never the tighter bound); past it the proxy stops reading that side.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import sys


class Pipe:
    """One direction: chunks wait in a FIFO until their time, then go to ``dst``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, limit: int) -> None:
        self.loop = loop
        self.delay = delay
        self.limit = limit
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.src_paused = False
        self.eof = False

    def feed(self, data: bytes) -> None:
        self.queue.append((self.loop.time() + self.delay, data))
        self.queued += len(data)
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._due)
        self._check()

    def feed_eof(self) -> None:
        self.eof = True
        if self.timer is None:
            self.timer = self.loop.call_at(self.loop.time() + self.delay, self._due)

    def _due(self) -> None:
        self.timer = None
        if self.dst is None:
            return  # the other side is still connecting: set_dst() flushes
        now = self.loop.time()
        out = []
        queue = self.queue
        while queue and queue[0][0] <= now:
            out.append(queue.popleft()[1])
        if out and self.dst is not None and not self.dst.is_closing():
            self.dst.writelines(out)
        self.queued -= sum(map(len, out))
        if queue:
            self.timer = self.loop.call_at(queue[0][0], self._due)
        elif self.eof and self.dst is not None and not self.dst.is_closing():
            try:
                self.dst.write_eof()
            except OSError:  # the other side is already gone
                self.dst.close()
        self._check()

    def set_dst(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        if self.queue and self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._due)

    def inflight(self) -> int:
        buffered = self.dst.get_write_buffer_size() if self.dst is not None else 0
        return self.queued + buffered

    def _check(self) -> None:
        """Stop reading the source past the bound, resume below half of it."""
        if self.src is None or self.src.is_closing():
            return
        n = self.inflight()
        if not self.src_paused and n > self.limit:
            self.src.pause_reading()
            self.src_paused = True
        elif self.src_paused and n <= self.limit // 2:
            self.src.resume_reading()
            self.src_paused = False

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0


class Side(asyncio.Protocol):
    """One socket of a proxied connection; ``inbound`` carries what it reads."""

    def __init__(self, inbound: Pipe, outbound: Pipe) -> None:
        self.inbound, self.outbound = inbound, outbound
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The outbound pipe's backlog counts this transport's buffer: report it early.
        transport.set_write_buffer_limits(high=64 * 1024)  # type: ignore[attr-defined]
        self.inbound.src = self.transport
        self.outbound.set_dst(self.transport)

    def data_received(self, data: bytes) -> None:
        self.inbound.feed(data)

    def eof_received(self) -> bool:
        self.inbound.feed_eof()
        return True  # keep the other half open until the peer closes

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self.outbound._check()  # our buffer drained: the other side may read again

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbound.close()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            # Deliver what is still due first, then close.
            loop = asyncio.get_running_loop()
            loop.call_later(self.inbound.delay + 0.001, peer.transport.close)


async def handle(
    loop: asyncio.AbstractEventLoop,
    client_sock: socket.socket,
    target: tuple[str, int],
    delay: float,
    limit: int,
) -> None:
    up = Pipe(loop, delay, limit)  # client -> server
    down = Pipe(loop, delay, limit)  # server -> client
    try:
        _, server_side = await loop.create_connection(lambda: Side(down, up), *target)
    except OSError:
        client_sock.close()
        return
    _, client_side = await loop.connect_accepted_socket(lambda: Side(up, down), client_sock)
    client_side.peer, server_side.peer = server_side, client_side


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--listen-port", type=int, default=0)
    p.add_argument("--target", required=True, help="host:port to forward to")
    p.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay, each direction")
    p.add_argument("--max-inflight", type=int, default=16 * 1024 * 1024)
    a = p.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    target = (host, int(port))
    delay = a.delay_ms / 1000.0
    loop = asyncio.get_running_loop()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((a.listen_host, a.listen_port))
    lsock.listen(1024)
    lsock.setblocking(False)
    print(json.dumps({"port": lsock.getsockname()[1]}), flush=True)
    tasks = set()
    while True:
        conn, _ = await loop.sock_accept(lsock)
        conn.setblocking(False)
        t = loop.create_task(handle(loop, conn, target, delay, a.max_inflight))
        tasks.add(t)
        t.add_done_callback(tasks.discard)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
