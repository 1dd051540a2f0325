"""Issue 9.11 figure: how fast one source can guess names with circuit opens.

    python bench/enumerate.py [--seconds 10] [--commit REV]

Starts ``python -m nuttconch`` (bench/amplify.py's ``start_server``: first-use trust
on, penalties on, only 127.0.0.1 exempt), then for ``--seconds`` logs in from
127.0.0.2 with a first-use key and opens ``direct-tcpip`` channels to made-up
generated aliases as fast as the server answers, reconnecting whenever it is
disconnected or refused. Prints the guesses answered, logins, refused connection
attempts, and guesses per second.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amplify import start_server, stop_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--commit", default=None, help="run the server from git archive REV")
    args = parser.parse_args()

    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.conch.ssh import keys
    from twisted.internet import defer, task

    from tests import rawssh

    tmp = tempfile.mkdtemp(prefix="nuttconch-enum-")
    server, port, logpath = start_server(tmp, args.commit)
    keypath = Path(tmp) / "guesser"
    keypath.write_bytes(
        keys.Key(ed25519.Ed25519PrivateKey.generate()).toString("openssh", subtype="v1")
    )
    result: dict[str, Any] = {}

    @defer.inlineCallbacks
    def attack(reactor: Any) -> Any:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                yield task.deferLater(reactor, 0.2, lambda: None)
        guesses = logins = refused = 0
        started = time.monotonic()
        end = started + args.seconds
        while time.monotonic() < end:
            try:
                c = yield rawssh.connect_client(
                    port, key=str(keypath), user=b"guesser", bind="127.0.0.2", timeout=10
                )
            except Exception:
                refused += 1
                yield task.deferLater(reactor, 0.5, lambda: None)
                continue
            if not c.authenticated:
                refused += 1
                c.close()
                yield task.deferLater(reactor, 0.5, lambda: None)
                continue
            logins += 1
            while not c.isLost and time.monotonic() < end:
                name = b"dev-%07d" % guesses
                try:
                    num, _ = yield c.conn.openRaw(b"direct-tcpip", rawssh.direct_tcpip(name, 22))
                except Exception:
                    break
                guesses += 1
            c.close()
        elapsed = time.monotonic() - started
        result.update(
            guesses=guesses,
            logins=logins,
            refused_attempts=refused,
            guesses_per_s=guesses / elapsed,
            log_bytes=logpath.stat().st_size,
        )

    try:
        task.react(lambda reactor: attack(reactor))
    except SystemExit:
        pass
    finally:
        stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"seconds={args.seconds} "
        + " ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
        )
    )


if __name__ == "__main__":
    main()
