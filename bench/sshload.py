"""SSH connection load client for ``bench/run.py`` (asyncssh).

- ``handshakes``: for ``--seconds`` (at most ``--max-count`` connections), each of
  ``--concurrency`` tasks repeatedly connects, authenticates with a key, requests one
  remote forward (``-R``), and closes. Prints ``{"done", "errors", "seconds"}``.
- ``idle``: opens ``--count`` connections (each holding one remote forward), prints
  ``{"ready", "errors", "seconds"}``, then holds them until standard input closes or
  ``--hold-seconds`` pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import asyncssh

PINNED = {
    "encryption_algs": ["aes128-ctr"],
    "mac_algs": ["hmac-sha2-256"],
    "kex_algs": ["curve25519-sha256"],
    "compression_algs": ["none"],
    # Both servers have an Ed25519 host key (and OpenSSH's client picks it first);
    # asyncssh would otherwise pick an RSA host key where the server has one.
    "server_host_key_algs": ["ssh-ed25519"],
}


def _options(
    args: argparse.Namespace, key: asyncssh.SSHKey, user: str
) -> asyncssh.SSHClientConnectionOptions:
    return asyncssh.SSHClientConnectionOptions(
        username=user,
        client_keys=[key],
        known_hosts=None,
        agent_path=None,
        config=[],
        connect_timeout=30,
        keepalive_interval=0,
        **PINNED,
    )


async def _one(args: argparse.Namespace, options, local_addr: str | None = None):
    conn = await asyncssh.connect(
        args.host,
        args.port,
        options=options,
        local_addr=(local_addr, 0) if local_addr else None,
    )
    await conn.forward_remote_port("localhost", 0, "127.0.0.1", args.device_port)
    return conn


async def handshakes(args: argparse.Namespace, key: asyncssh.SSHKey) -> dict:
    options = _options(args, key, args.user)
    start = time.monotonic()
    deadline = start + args.seconds
    done = 0
    errors = 0
    started = 0

    async def worker() -> None:
        nonlocal done, errors, started
        while time.monotonic() < deadline and started < args.max_count:
            started += 1
            try:
                conn = await asyncio.wait_for(_one(args, options), 30)
                conn.close()
                await asyncio.wait_for(conn.wait_closed(), 10)
                done += 1
            except (OSError, asyncssh.Error, asyncio.TimeoutError):
                errors += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return {"done": done, "errors": errors, "seconds": time.monotonic() - start}


async def idle(args: argparse.Namespace, key: asyncssh.SSHKey) -> None:
    start = time.monotonic()
    deadline = start + args.connect_seconds
    conns = []
    errors = 0
    next_index = 0
    sem = asyncio.Semaphore(args.concurrency)

    async def open_one(i: int) -> None:
        nonlocal errors
        async with sem:
            if time.monotonic() > deadline:
                errors += 1
                return
            user = f"{args.user}{i}" if args.user_suffix else args.user
            # Spread over source addresses: about 28,000 ephemeral ports each.
            local = f"127.0.0.{2 + i // 20000}" if args.spread else None
            try:
                conn = await asyncio.wait_for(_one(args, _options(args, key, user), local), 60)
                conns.append(conn)
            except (OSError, asyncssh.Error, asyncio.TimeoutError):
                errors += 1

    tasks = []
    while next_index < args.count:
        tasks.append(asyncio.ensure_future(open_one(next_index)))
        next_index += 1
    await asyncio.gather(*tasks)
    print(
        json.dumps({"ready": len(conns), "errors": errors, "seconds": time.monotonic() - start}),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), args.hold_seconds)
    except asyncio.TimeoutError:
        pass
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["handshakes", "idle"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument(
        "--user-suffix", action="store_true", help="append the connection index to --user"
    )
    parser.add_argument("--key", required=True)
    parser.add_argument("--device-port", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-count", type=int, default=100000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--connect-seconds", type=float, default=600.0)
    parser.add_argument("--hold-seconds", type=float, default=600.0)
    parser.add_argument(
        "--spread", action="store_true", help="use 127.0.0.2, .3, ... as source addresses"
    )
    args = parser.parse_args()
    key = asyncssh.read_private_key(args.key)
    if args.mode == "handshakes":
        print(json.dumps(asyncio.run(handshakes(args, key))), flush=True)
    else:
        asyncio.run(idle(args, key))


if __name__ == "__main__":
    main()
