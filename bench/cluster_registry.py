"""Figures for the shared registry (issue 11.1): replication lag and registration rate.

    python bench/cluster_registry.py [--n 500]

Starts its own redis-server on a free loopback port in a temporary directory
(stopped by pid), two RedisRegistry nodes in this process, and reports:
how long a registration made on node a takes to resolve on node b (median,
p99), registrations a second issued all at once, and the RSS the two nodes'
clients add.  Same process, same machine: the figure includes both nodes'
reactor turns, as a real pair of nodes on one host would.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor, task  # noqa: E402

from nuttconch.cluster.registry import RedisRegistry  # noqa: E402
from nuttconch.registry import Listener  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402


def rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@defer.inlineCallbacks
def main(n: int) -> defer.Deferred[None]:
    redis = RedisServer(tempfile.mkdtemp(prefix="nuttconch-bench-redis-"))
    redis.start()
    try:
        before = rss_kib()
        a = RedisRegistry(redis.url, "a", lease=5)
        b = RedisRegistry(redis.url, "b", lease=5)
        a.startService()
        b.startService()
        while not (a.healthy and b.healthy):
            yield task.deferLater(reactor, 0.01, lambda: None)
        lags = []
        for i in range(n):
            mine = Listener(f"h{i}", (f"h{i}-x", "web"))
            started = time.perf_counter()
            a.add_port(mine, "", 22)
            while True:
                try:
                    b.find(f"h{i}-x")
                    break
                except LookupError:
                    yield task.deferLater(reactor, 0, lambda: None)
            lags.append((time.perf_counter() - started) * 1000)
        lags.sort()
        print(f"replication a -> b over {n}: median {statistics.median(lags):.2f} ms,"
              f" p99 {lags[int(len(lags) * 0.99) - 1]:.2f} ms")  # fmt: skip
        # All at once: one write in flight per registration, all pipelined on one connection.
        started = time.perf_counter()
        batch = [Listener(f"r{i}", (f"r{i}-x",)) for i in range(n)]
        for mine in batch:
            a.add_port(mine, "", 22)
        while len(b.listeners()) < 2 * n:
            yield task.deferLater(reactor, 0.001, lambda: None)
        took = time.perf_counter() - started
        print(f"{n} registrations visible on b in {took:.3f} s: {n / took:.0f}/s")
        print(f"RSS added by two nodes holding {2 * n} registrations: {rss_kib() - before} KiB")
        yield a.stopService()
        yield b.stopService()
    finally:
        redis.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    options = parser.parse_args()
    task.react(lambda _reactor: main(options.n))
