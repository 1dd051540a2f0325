"""Cost of the list views with a fleet registered (issue 13.4): N fake initiators in the
embedded registry, then the time and size of ``listeners``, ``listeners --json``,
``stats`` and a /metrics scrape, in process. Run from the repository root::

    python bench/fleet_views.py [N]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nuttconch import commands  # noqa: E402
from nuttconch.registry import InMemoryRegistry, Listener  # noqa: E402

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 100000


class Factory:
    registry = InMemoryRegistry()
    transports: set = set()
    metrics = None


class Identity:
    access = frozenset({"list", "admin"})


class Avatar:
    factory = Factory
    identity = Identity()


def main() -> None:
    for i in range(COUNT):
        listener = Listener(
            f"dev{i}", (f"dev{i}-abcdefg", f"dev{i}"), peer=f"127.1.{i // 250}.{i % 250}"
        )
        Factory.registry.add_port(listener, "localhost", 22)
    for line in (
        "listeners",
        "listeners --json",
        "listeners --limit 100000",
        "listeners --json --limit 100000",
        "stats",
    ):
        start = time.perf_counter()
        result = commands.run(Avatar, line)
        ms = (time.perf_counter() - start) * 1000
        print(f"{COUNT} initiators: `{line}`: {ms:.0f} ms, {len(result.out)} bytes out")


if __name__ == "__main__":
    main()
