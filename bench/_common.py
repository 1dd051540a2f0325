"""Start-up shared by the in-process benchmarks (auth_attacks, first_use_flood,
authkeys_reactor): a scratch directory with the test host keys, a server built from
a minimal nuttssh.ini on 127.0.0.1, and a reactor run around one main()."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nuttconch import config as configmod  # noqa: E402
from nuttconch.tap import build  # noqa: E402
from tests.harness import host_key_dir  # noqa: E402


def scratch(prefix: str) -> tuple[str, str]:
    """(work directory, its keys directory holding the test host keys)."""
    work = tempfile.mkdtemp(prefix=prefix)
    keydir = os.path.join(work, "keys")
    shutil.copytree(host_key_dir(), keydir)
    return work, keydir


def serve(work: str, keydir: str) -> tuple[Any, int]:
    """(factory, port) of a server on 127.0.0.1 that never penalises 127.0.0.1 and
    offers the encrypt-and-MAC MACs Twisted Conch's client (tests.rawssh) needs."""
    ini = os.path.join(work, "nuttssh.ini")
    with open(ini, "w") as handle:
        handle.write(
            "[server]\nlisten_host = 127.0.0.1\nlisten_port = 0\n"
            "macs = +hmac-sha2-256,hmac-sha2-512\n"
            f"per_source_penalty_exempt_list = 127.0.0.1\n[keys]\nhost_key_dir = {keydir}\n"
        )
    factory, _ = build(configmod.load(ini))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port
    return factory, port


def run(main: Callable[[], Any]) -> None:
    """Run the reactor until main()'s Deferred fires, printing any failure."""
    d = main()
    d.addErrback(lambda f: (f.printTraceback(file=sys.stderr), None))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
