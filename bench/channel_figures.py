"""Issue 14.5 figure: the cost of a tiny maximum packet size, against a server process.

    python bench/channel_figures.py [--bytes N] [--max-packet N ...] [--commit REV]

Starts ``python -m nuttconch`` as ``bench/threat_figures.py`` does (same helpers), holds
an ``ssh -N -R`` initiator in front of a loopback ``source`` device (it writes as fast as
it can), and for each maximum packet size opens one asyncssh ``direct-tcpip`` channel
with that size, reads ``--bytes`` from it and reports the server's CPU seconds, the
relay's wall time and how long a concurrent ``ssh whoami`` by another user took.  A
refused open is reported with its reason.  ``--commit REV`` runs the server from
``git archive REV``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from threat_figures import ROOT, Device, Run, cpu_seconds  # noqa: E402


async def relay(port: int, key: Path, alias: str, size: int, max_packet: int) -> str:
    import asyncssh

    options = asyncssh.SSHClientConnectionOptions(
        username="reader",
        client_keys=[asyncssh.read_private_key(str(key))],
        known_hosts=None,
        agent_path=None,
        config=[],
        connect_timeout=20,
    )
    async with asyncssh.connect("127.0.0.1", port, options=options) as conn:
        try:
            chan, session = await conn.create_connection(
                asyncssh.SSHTCPSession, alias, 9000, max_pktsize=max_packet
            )
        except asyncssh.ChannelOpenError as exc:
            return f"open refused: {exc.reason}"
        got = 0
        done = asyncio.get_running_loop().create_future()

        def data_received(data: bytes, datatype: object) -> None:
            nonlocal got
            got += len(data)
            if got >= size and not done.done():
                done.set_result(None)

        session.data_received = data_received  # type: ignore[method-assign]
        await asyncio.wait_for(done, 600)
        chan.close()
        conn.close()
        return f"{got} bytes relayed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bytes", type=int, default=256 * 1024)
    parser.add_argument("--max-packet", type=int, nargs="+", default=[1, 1024, 32768])
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    tree = ROOT
    snapshot = None
    if args.commit:
        snapshot = Path(tempfile.mkdtemp(prefix="nuttconch-tree-"))
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.commit], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive.stdout, check=True)
        tree = snapshot
    run = Run(tree)
    # ``python -m`` puts the working directory first on sys.path: run from the tree.
    here = os.getcwd()
    os.chdir(tree)
    try:
        with run.server("c1") as srv:
            device = Device("source")
            try:
                _, alias = srv.initiator("dev", device.port)
                for mp in args.max_packet:
                    waits: list[float] = []

                    def other_user(waits: list[float] = waits) -> None:
                        time.sleep(0.5)
                        ok, took, _ = srv.command("other", "whoami", timeout=120)
                        waits.append(took if ok else float("nan"))

                    cpu0, t0 = cpu_seconds(srv.pid), time.monotonic()
                    side = threading.Thread(target=other_user)
                    side.start()
                    result = asyncio.run(relay(srv.port, run.key, alias, args.bytes, mp))
                    wall = time.monotonic() - t0
                    cpu = cpu_seconds(srv.pid) - cpu0
                    side.join(150)
                    print(
                        f"max packet {mp}: {result}; server CPU {cpu:.2f} s, wall {wall:.2f} s,"
                        f" concurrent whoami {waits[0] if waits else float('nan'):.2f} s",
                        flush=True,
                    )
            finally:
                device.stop()
    finally:
        os.chdir(here)
        run.cleanup()
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
    print(f"command: {' '.join([sys.executable, 'bench/channel_figures.py', *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
