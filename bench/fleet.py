"""A fleet of initiators (asyncssh), for the fleet-scale tests and benchmarks (issue 13).

- ``burst``: ``--count`` initiators log in at the same moment, each from its own
  loopback address (127.1.x.y) when ``--spread``, each with a fresh key when
  ``--fresh-keys`` (trust on first use) or with ``--key``; each asks for one remote
  forward (``-R``). One try each, no retry: prints ``{"ok", "failed", "reasons",
  "seconds", "p50", "p99"}`` (login-to-forward times of those that succeeded).
- ``stall``: holds ``--count`` handshakes stopped after the version line.
- ``storm``: ``--count`` initiators hold a connection and one forward each and, as
  autossh does, reconnect when it drops (first retry after up to ``--retry`` seconds,
  then backing off to 5 s, with jitter). Prints a JSON line ``{"event": "ready"}``
  once all are up, then ``{"event": "back", "seconds": S, "reconnects": R}`` each time
  all are up again after a loss (S: from the first loss seen to the last one back).
  Runs until standard input closes or ``--hold-seconds`` pass.

Source addresses of 127.0.0.0/8 other than 127.0.0.1 need no setup on Linux.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time

import asyncssh

PINNED = {
    "encryption_algs": ["aes128-ctr"],
    "mac_algs": ["hmac-sha2-256-etm@openssh.com"],  # the server's default list is EtM only
    "kex_algs": ["curve25519-sha256"],
    "compression_algs": ["none"],
    "server_host_key_algs": ["ssh-ed25519"],
}


def source_address(i: int) -> str:
    """127.1.0.2, 127.1.0.3, ...: distinct sources, none of them the tests' 127.0.0.1
    (62,500 per second octet, then 127.2.0.2 and on)."""
    return f"127.{1 + i // 62500}.{(i // 250) % 250}.{2 + i % 250}"


def options(user: str, key: asyncssh.SSHKey, timeout: float) -> asyncssh.SSHClientConnectionOptions:
    return asyncssh.SSHClientConnectionOptions(
        username=user,
        client_keys=[key],
        known_hosts=None,
        agent_path=None,
        config=[],
        connect_timeout=timeout,
        keepalive_interval=0,
        **PINNED,
    )


async def login(
    args: argparse.Namespace, i: int, key: asyncssh.SSHKey
) -> asyncssh.SSHClientConnection:
    i += args.first
    local = (source_address(i), 0) if args.spread else None
    conn = await asyncssh.connect(
        args.host,
        args.port,
        options=options(f"{args.user}{i}", key, args.timeout),
        local_addr=local,
    )
    await conn.forward_remote_port("localhost", 0, "127.0.0.1", args.device_port)
    return conn


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def burst(args: argparse.Namespace) -> dict:
    if args.fresh_keys:
        keys = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(args.count)]
    else:
        shared = asyncssh.read_private_key(args.key)
        keys = [shared] * args.count
    go = asyncio.Event()
    times: list[float] = []
    reasons: dict[str, int] = {}
    conns: list[asyncssh.SSHClientConnection] = []

    gate = asyncio.Semaphore(args.concurrency or args.count)

    async def one(i: int) -> None:
        await go.wait()
        async with gate:
            await attempt(i)

    async def attempt(i: int) -> None:
        begun = time.monotonic()
        try:
            conn = await asyncio.wait_for(login(args, i, keys[i]), args.timeout)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"[:120]
            reasons[reason] = reasons.get(reason, 0) + 1
            return
        times.append(time.monotonic() - begun)
        conns.append(conn)

    tasks = [asyncio.ensure_future(one(i)) for i in range(args.count)]
    await asyncio.sleep(0)
    start = time.monotonic()
    go.set()
    await asyncio.gather(*tasks)
    seconds = time.monotonic() - start
    if args.hold:
        print(json.dumps({"event": "held", "ok": len(conns)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for conn in conns:
        conn.close()
    return {
        "ok": len(times),
        "failed": args.count - len(times),
        "reasons": reasons,
        "seconds": seconds,
        "p50": percentile(times, 50),
        "p99": percentile(times, 99),
    }


def stall(args: argparse.Namespace) -> None:
    """Hold ``--count`` handshakes that stop after the version line, ``--per-address`` from
    each of 127.2.x.y; prints how many stand, then holds them until stdin closes."""
    socks = []
    errors = 0
    start = time.monotonic()
    for i in range(args.count):
        sock = socket.socket()
        try:
            group = i // args.per_address
            sock.bind((f"127.2.{group // 250}.{1 + group % 250}", 0))
            sock.settimeout(args.timeout)
            sock.connect((args.host, args.port))
            sock.sendall(b"SSH-2.0-staller\r\n")
            socks.append(sock)
        except OSError:
            errors += 1
            sock.close()
    print(
        json.dumps(
            {
                "event": "held",
                "held": len(socks),
                "errors": errors,
                "seconds": time.monotonic() - start,
            }
        ),
        flush=True,
    )
    sys.stdin.read()
    os._exit(0)


async def storm(args: argparse.Namespace) -> None:
    key = asyncssh.read_private_key(args.key)
    up: set[int] = set()
    state = {"lost_at": None, "reconnects": 0, "ready": False}
    changed = asyncio.Event()

    async def member(i: int) -> None:
        delay = random.uniform(0, args.retry)
        first = True
        while True:
            try:
                conn = await asyncio.wait_for(login(args, i, key), args.timeout)
            except (OSError, asyncssh.Error, asyncio.TimeoutError):
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(5.0, max(0.2, delay * 2))
                continue
            if not first:
                state["reconnects"] += 1
            first = False
            delay = random.uniform(0, args.retry)
            up.add(i)
            changed.set()
            await conn.wait_closed()
            up.discard(i)
            if state["lost_at"] is None:
                state["lost_at"] = time.monotonic()
            changed.set()
            await asyncio.sleep(random.uniform(0, args.retry))

    tasks = [asyncio.ensure_future(member(i)) for i in range(args.count)]
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    deadline = start + args.hold_seconds
    while time.monotonic() < deadline and not stdin_closed.done():
        changed.clear()
        if len(up) == args.count:
            if not state["ready"]:
                state["ready"] = True
                print(
                    json.dumps({"event": "ready", "seconds": time.monotonic() - start}),
                    flush=True,
                )
            elif state["lost_at"] is not None:
                print(
                    json.dumps(
                        {
                            "event": "back",
                            "seconds": time.monotonic() - state["lost_at"],
                            "reconnects": state["reconnects"],
                        }
                    ),
                    flush=True,
                )
                state["lost_at"] = None
                state["reconnects"] = 0
        try:
            await asyncio.wait_for(changed.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    for task in tasks:
        task.cancel()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["burst", "storm", "stall"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="dev")
    parser.add_argument("--key")
    parser.add_argument("--fresh-keys", action="store_true")
    parser.add_argument("--spread", action="store_true")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--per-address", type=int, default=40)
    parser.add_argument("--first", type=int, default=0, help="number of the first initiator")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="burst: logins in flight at most (0: all)"
    )
    parser.add_argument("--device-port", type=int, default=9)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--retry", type=float, default=1.0)
    parser.add_argument("--hold", action="store_true", help="burst: hold until stdin closes")
    parser.add_argument("--hold-seconds", type=float, default=600.0)
    args = parser.parse_args()
    if args.mode == "burst":
        print(json.dumps(asyncio.run(burst(args))), flush=True)
    elif args.mode == "stall":
        stall(args)
    else:
        asyncio.run(storm(args))


if __name__ == "__main__":
    main()
