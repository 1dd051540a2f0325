"""Reactor blocking caused by authorized_keys work (issue 9 point 3).

Starts the server in-process with an authorized_keys of N lines (default
20,000), then makes first-use logins with the real ``ssh`` (separate
processes, so the client's work does not load this reactor) and one login
of a known key, while a 5 ms LoopingCall measures how late the reactor
runs. It also sums the time ``authkeys.parse_text`` spends on the reactor
thread. Run from the repository root::

    python bench/authkeys_reactor.py [lines] [first-use logins] [connected sessions]

With connected sessions (``ssh -N`` of the known key, held open), every
change to the file also makes the key watcher re-check each of them.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key
from twisted.internet import defer, protocol, reactor, task, utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import run, scratch, serve  # noqa: E402

from nuttconch import authkeys  # noqa: E402
from nuttconch.tap import KEYS_POLL_SECONDS  # noqa: E402
from tests.harness import make_key  # noqa: E402

LINES = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
LOGINS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
SESSIONS = int(sys.argv[3]) if len(sys.argv) > 3 else 0

on_reactor = {"parse": 0.0, "calls": 0}
real_parse = authkeys.parse_text


def timed_parse(text: str, *args: object, **kw: object) -> object:
    started = time.perf_counter()
    try:
        return real_parse(text, *args, **kw)  # type: ignore[arg-type]
    finally:
        if threading.current_thread() is threading.main_thread():
            on_reactor["parse"] += time.perf_counter() - started
            on_reactor["calls"] += 1


authkeys.parse_text = timed_parse  # type: ignore[assignment]


def lines_file(path: str) -> None:
    cache = f"/tmp/nuttconch-bench-{LINES}-lines"
    if not os.path.exists(cache):
        with open(cache + ".tmp", "w") as handle:
            for i in range(LINES):
                public = Key(ed25519.Ed25519PrivateKey.generate()).public()
                handle.write(f'access="listen" {public.toString("openssh").decode()} k{i}\n')
        os.replace(cache + ".tmp", cache)
    shutil.copy(cache, path)


def base_args(port: int) -> list[str]:
    return [
        "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-p", str(port),
    ]  # fmt: skip


@defer.inlineCallbacks
def main() -> object:
    work, keydir = scratch("nuttconch-bench-")
    akfile = os.path.join(keydir, "authorized_keys")
    lines_file(akfile)
    known, public = make_key(work, "known")
    with open(akfile, "a") as handle:
        handle.write(f'access="listen" {public} known\n')
    factory, port = serve(work, keydir)
    poll = task.LoopingCall(factory.checkKeys)
    poll.start(KEYS_POLL_SECONDS, now=True)
    held = []
    for i in range(SESSIONS):
        proto = protocol.ProcessProtocol()
        held.append(proto)
        reactor.spawnProcess(
            proto,
            "ssh",
            ["ssh", *base_args(port), "-N", "-i", known, "-l", f"s{i}", "127.0.0.1"],
            env=os.environ,
        )
    yield task.deferLater(reactor, 1.0 + SESSIONS * 0.05, lambda: None)
    # Let the first full load (in a thread) and its racy window pass before measuring.
    yield task.deferLater(reactor, 3.0, lambda: None)
    lags: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        lags.append(now - last[0] - 0.005)
        last[0] = now

    on_reactor.update(parse=0.0, calls=0)
    ticker = task.LoopingCall(tick)
    ticker.start(0.005)
    args = base_args(port)
    started = time.perf_counter()
    codes = []
    for i in range(LOGINS):
        key, _ = make_key(work, f"new{i}")
        out, err, code = yield utils.getProcessOutputAndValue(
            "ssh", [*args, "-i", key, "-l", f"new{i}", "127.0.0.1", "whoami"], env=os.environ
        )
        codes.append(code)
    out, err, code = yield utils.getProcessOutputAndValue(
        "ssh", [*args, "-i", known, "-l", "known", "127.0.0.1", "whoami"], env=os.environ
    )
    codes.append(code)
    yield task.deferLater(reactor, KEYS_POLL_SECONDS + 0.5, lambda: None)
    elapsed = time.perf_counter() - started
    ticker.stop()
    poll.stop()
    stalls = [x for x in lags if x > 0.02]
    print(
        f"lines={LINES} first_use_logins={LOGINS} sessions={len(factory.avatars)}"
        f" exit_codes={codes} wall={elapsed:.2f}s"
    )
    print(
        f"reactor: max stall {max(lags) * 1000:.0f} ms, {len(stalls)} stalls > 20 ms"
        f" totalling {sum(stalls):.2f} s; parse_text on the reactor thread:"
        f" {on_reactor['calls']} calls, {on_reactor['parse']:.2f} s"
    )
    for proto in held:
        if proto.transport is not None:
            proto.transport.signalProcess("TERM")
    yield factory.disconnectAll()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run(main)
