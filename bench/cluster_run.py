"""Issue 11.7: cross-node vs same-node circuits, nodes as processes on Redis, and sshd.

One run starts a private ``redis-server``, two nuttconch node PROCESSES (a and b,
``python -m nuttconch``, same keys and cluster key, hop over loopback TCP) and a
private OpenSSH ``sshd``, and drives all three with the real OpenSSH client and
bench/run.py's device and load client (bench/device.py, bench/load.py):

- same-node: initiator (``ssh -R``) and client (``ssh -L``) both on node a;
- cross-node: initiator on node b, client on node a: every circuit crosses the hop;
- sshd: initiator and client on sshd, as bench/run.py does.

Rows: circuit setup (N sequential circuits through one ``-L``: connect, 1-byte echo,
close; median and p99, the hop warm after the first), bulk up and down (one circuit,
pinned cipher as in bench/run.py), and parallel: 8 circuits at once, each from its own
client connection to its own initiator, with 1 node, 2 reuse_port workers (nodes w1
and w2 on one port, one cluster) and sshd. Repetitions are
interleaved (same, cross, sshd, same, ...). The table is written into
bench/RESULTS.md as a ``## Cluster`` section (replacing an earlier one).

    /work/venv/bin/python bench/cluster_run.py [--reps 3] [--setup-count 300] [--bulk-mib 256]

Needs root (sshd privilege separation) and redis-server.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (bench/run.py: processes, device, load client, sshd)
from run import (  # noqa: E402
    MIB,
    PINNED,
    PY,
    REPO,
    Env,
    Sshd,
    free_port,
    load,
    log,
    ssh_common,
    start,
    stop,
)  # fmt: skip

SIDES = ["same-node", "cross-node", "sshd"]


class Cluster:
    """redis-server and two node processes sharing keys, alias secret and cluster key."""

    def __init__(self, tmp: Path, key: Path) -> None:
        self.tmp, self.key = tmp, key
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        redis_dir = self.tmp / "redis"
        redis_dir.mkdir()
        self.redis_port = free_port()
        self.procs["redis"] = start(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--dir", str(redis_dir), "--logfile", str(redis_dir / "log")],
        )  # fmt: skip
        keydir = self.tmp / "keys"
        keydir.mkdir()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keydir / "cluster_key")],
            check=True,
            timeout=30,
        )
        pub = Path(str(self.key) + ".pub").read_text().strip()
        (keydir / "authorized_keys").write_text(f'access="initiate",access="listen" {pub}\n')
        shared = free_port()
        for node in ("a", "b", "w1", "w2"):
            self.ports[node] = shared if node.startswith("w") else free_port()
            relay = free_port()
            ini = self.tmp / f"{node}.ini"
            ini.write_text(
                f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {self.ports[node]}\n"
                "enable_auth = true\nallow_new_clients = false\n"
                "max_startups = 1000:30:2000\nper_source_max_startups = 2000\n"
                "reuse_port = true\n"
                f"[keys]\nhost_key_dir = {keydir}\n"
                f"[cluster]\nredis_url = redis://127.0.0.1:{self.redis_port}/0\n"
                f"node_name = {node}\nrelay_listen = {relay}\n"
                f"relay_address = 127.0.0.1:{relay}\ncluster_key_file = {keydir / 'cluster_key'}\n"
            )
            logfile = self.tmp / f"{node}.log"
            out = open(logfile, "w")  # noqa: SIM115 - kept open for the child
            self.procs[node] = start(
                [PY, "-m", "nuttconch", "--config", str(ini)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                cwd=self.tmp,
            )
            run.wait_log(logfile, "is current", self.procs[node])

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):  # the nodes leave Redis, then Redis
            stop(proc)

    def ssh(self, node: str, *args: str) -> list[str]:
        return ["ssh", *ssh_common(self.key, self.ports[node]), *PINNED, *args]


class Tunnel:
    """``ssh -R`` to the device on one server, ``ssh -L`` to it through another."""

    def __init__(self, env: Env, init: list[str], client: list[str], target: str) -> None:
        self.env, self.init, self.client, self.target = env, init, client, target
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Tunnel:
        dev = [self.env.ports["sink"], self.env.ports["source"], self.env.ports["echo"]]
        rargs, largs, lports = [], [], []
        for i, dp in enumerate(dev):
            vport, lp = 9000 + i, free_port()
            rargs += ["-R", f"{vport}:127.0.0.1:{dp}"]
            largs += ["-L", f"{lp}:{self.target}:{vport}"]
            lports.append(lp)
        self.sink, self.source, self.echo = lports
        self.procs.append(start([*self.init[:-1], "-N", *rargs, self.init[-1]],
                                stdin=subprocess.DEVNULL))  # fmt: skip
        deadline = time.monotonic() + 20
        while True:  # the circuit works once the name is in the client node's replica
            client = start([*self.client[:-1], "-N", *largs, self.client[-1]],
                           stdin=subprocess.DEVNULL)  # fmt: skip
            if load("probe", self, port=self.echo, max_seconds=3).get("ok"):
                self.procs.append(client)
                return self
            stop(client)
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"tunnel to {self.target} did not come up")

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs = []
        time.sleep(0.3)  # the name leaves every replica before the next tunnel takes it


def parallel(
    env: Env, init: object, client: object, names: list[str], nbytes: int, max_seconds: float
) -> float:
    """Aggregate MB/s of len(names) circuits at once, each from its own client connection
    (``ssh -L``) to its own initiator (``ssh -R`` to the device's sink)."""
    procs: list[subprocess.Popen] = []
    sinks: list[int] = []
    try:
        for i, name in enumerate(names):
            rport = 9000 if name else free_port()
            eport = 9001 if name else free_port()
            target = name or "127.0.0.1"
            bind = "" if name else "127.0.0.1:"
            procs.append(
                start(
                    [
                        *init(i)[:-1],
                        "-N",  # type: ignore[operator]
                        "-R",
                        f"{bind}{rport}:127.0.0.1:{env.ports['sink']}",
                        "-R",
                        f"{bind}{eport}:127.0.0.1:{env.ports['echo']}",
                        init(i)[-1],
                    ],
                    stdin=subprocess.DEVNULL,
                )
            )  # type: ignore[operator]
            sink, echo = free_port(), free_port()
            deadline = time.monotonic() + 20
            while True:
                cmd = client(i)  # type: ignore[operator]
                c = start(
                    [
                        *cmd[:-1],
                        "-N",
                        "-L",
                        f"{sink}:{target}:{rport}",
                        "-L",
                        f"{echo}:{target}:{eport}",
                        cmd[-1],
                    ],
                    stdin=subprocess.DEVNULL,
                )
                if load("probe", env_server(env), port=echo, max_seconds=3).get("ok"):
                    procs.append(c)
                    break
                stop(c)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"parallel: circuit {i} did not come up")
            sinks.append(sink)
        runs = [
            load(
                "up",
                env_server(env),
                background=True,
                port=port,
                bytes=nbytes,
                max_seconds=max_seconds,
            )
            for port in sinks
        ]
        results = [json.loads(r.stdout.read()) for r in runs]  # type: ignore[union-attr]
        for r in runs:
            r.wait()  # type: ignore[union-attr]
        return sum(x["bytes"] for x in results) / max(x["seconds"] for x in results) / 1e6
    finally:
        for proc in reversed(procs):
            stop(proc)
        time.sleep(0.3)


class env_server:  # noqa: N801 - what bench/run.py's load() reads from a server
    def __init__(self, env: Env) -> None:
        self.env = env


def p99(values: list[float]) -> float:
    ms = sorted(values)
    return ms[min(len(ms) - 1, int(round(0.99 * len(ms))) - 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--setup-count", type=int, default=300)
    p.add_argument("--bulk-mib", type=int, default=256)
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--parallel-count", type=int, default=8, help="parallel: circuits")
    p.add_argument("--parallel-mib", type=int, default=64, help="parallel: MiB per circuit")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = p.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("redis-server"):
        print("bench/cluster_run.py needs root (sshd) and redis-server", file=sys.stderr)
        return 2
    atexit.register(run.stop_all)
    command = " ".join(["/work/venv/bin/python", "bench/cluster_run.py", *sys.argv[1:]])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    tmp = Path(tempfile.mkdtemp(prefix="nuttcluster-"))
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    env = Env("loopback", [], [], "127.0.0.1")
    env.start_device()
    cluster = Cluster(tmp, key)
    cluster.start()
    sshd = Sshd(tmp, key, env)
    sshd.start()
    who = subprocess.run([*cluster.ssh("a", "dev1@127.0.0.1"), "whoami"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    m = re.search(r"names: ([^,\s]+)", who.stdout)
    if not m:
        raise RuntimeError(f"whoami: {who.stdout} {who.stderr}")
    alias = m.group(1)  # the same on both nodes: one alias secret
    sides = {
        "same-node": (cluster.ssh("a", "dev1@127.0.0.1"), cluster.ssh("a", "dev1@127.0.0.1"),
                      alias),
        "cross-node": (cluster.ssh("b", "dev1@127.0.0.1"), cluster.ssh("a", "dev1@127.0.0.1"),
                       alias),
        "sshd": None,
    }  # fmt: skip
    n = a.parallel_count
    users = [f"par{i}" for i in range(n)]
    names = []
    for user in users:
        who = subprocess.run([*cluster.ssh("a", f"{user}@127.0.0.1"), "whoami"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        names.append(re.search(r"names: ([^,\s]+)", who.stdout).group(1))  # type: ignore[union-attr]
    psides = {
        "1 worker": (lambda i: cluster.ssh("a", f"{users[i]}@127.0.0.1"), names),
        "2 workers": (lambda i: cluster.ssh("w1", f"{users[i]}@127.0.0.1"), names),
        "sshd": (lambda i: ["ssh", *ssh_common(key, sshd.port), *PINNED, "root@127.0.0.1"],
                 [""] * n),
    }  # fmt: skip
    pvalues: dict[str, list[float]] = {side: [] for side in psides}
    values: dict[str, dict[str, list[float]]] = {}

    def add(row: str, side: str, value: float) -> None:
        values.setdefault(row, {s: [] for s in SIDES})[side].append(value)

    try:
        for rep in range(a.reps):
            for side in SIDES:
                if side == "sshd":
                    tun = run.Tunnel(sshd, PINNED)
                else:
                    init, client, target = sides[side]  # type: ignore[misc]
                    tun = Tunnel(env, init, client, target)
                with tun as t:
                    r = load("setup", t if side != "sshd" else sshd, port=t.echo,
                             count=a.setup_count, max_seconds=a.max_seconds)  # fmt: skip
                    if r["ms"]:
                        add("setup_median", side, statistics.median(r["ms"]))
                        add("setup_p99", side, p99(r["ms"]))
                    for d, port in (("up", t.sink), ("down", t.source)):
                        r = load(d, t if side != "sshd" else sshd, port=port,
                                 bytes=a.bulk_mib * MIB, max_seconds=a.max_seconds)  # fmt: skip
                        add(f"bulk_{d}", side, r["bytes"] / r["seconds"] / 1e6)
                log(f"rep {rep} {side}: " + ", ".join(
                    f"{k} {v[side][-1]:.2f}" for k, v in values.items() if v[side]))  # fmt: skip
            for pside, (ssh_for, pnames) in psides.items():
                mbs = parallel(env, ssh_for, ssh_for, pnames, a.parallel_mib * MIB,
                               a.max_seconds)  # fmt: skip
                pvalues[pside].append(mbs)
                log(f"rep {rep} parallel {pside}: {mbs:.1f} MB/s")
    finally:
        sshd.stop()
        cluster.stop()
        env.stop_device()
        run.stop_all()
    labels = {
        "setup_median": (f"setup, {a.setup_count} sequential circuits: median", "ms"),
        "setup_p99": (f"setup, {a.setup_count} sequential circuits: p99", "ms"),
        "bulk_up": (f"bulk up, 1 circuit × {a.bulk_mib} MiB", "MB/s"),
        "bulk_down": (f"bulk down, 1 circuit × {a.bulk_mib} MiB", "MB/s"),
    }
    cell = run.Results().cell
    med = {k: {s: statistics.median(v[s]) for s in SIDES if v[s]} for k, v in values.items()}
    lines = [
        "| workload | unit | same-node | cross-node | sshd | cross/same | cross/sshd |",
        "|---|---|---|---|---|---|---|",
    ]
    for key_, (label, unit) in labels.items():
        v, m_ = values.get(key_, {}), med.get(key_, {})
        ratio = [f"{m_['cross-node'] / m_[o]:.2f}×" if m_.get(o) and "cross-node" in m_ else "—"
                 for o in ("same-node", "sshd")]  # fmt: skip
        lines.append(f"| {label} | {unit} | " + " | ".join(cell(v.get(s, [])) for s in SIDES)
                     + f" | {ratio[0]} | {ratio[1]} |")  # fmt: skip

    pm = {side: statistics.median(v) for side, v in pvalues.items() if v}
    lines += [
        "",
        "| workload | unit | 1 worker | 2 workers | sshd | 2 workers/1 | 2 workers/sshd |",
        "|---|---|---|---|---|---|---|",
        f"| parallel up, {n} circuits × {a.parallel_mib} MiB, each from its own client"
        f" connection to its own initiator (aggregate) | MB/s | "
        + " | ".join(cell(pvalues[s]) for s in psides)
        + " | "
        + " | ".join(f"{pm['2 workers'] / pm[o]:.2f}×" if pm.get(o) and pm.get("2 workers")
                     else "—" for o in ("1 worker", "sshd"))
        + " |",
    ]  # fmt: skip

    def goal(ok: bool, text: str) -> str:
        return ("met" if ok else "NOT met") + f" ({text})"

    cm = med.get("setup_median", {}).get("cross-node")
    bu = [med.get(f"bulk_{d}", {}) for d in ("up", "down")]
    targets = [
        f"- cross-node setup median ≤ 2 ms (warm hop): {goal(cm is not None and cm <= 2, f'{cm:.2f} ms' if cm else '—')}",  # noqa: E501
        *[f"- cross-node bulk {d} ≥ 0.6× same-node: "
          + goal(x.get("cross-node", 0) >= 0.6 * x.get("same-node", 1e9),
                 f"{x.get('cross-node', 0) / x.get('same-node', 1):.2f}×")
          for d, x in zip(("up", "down"), bu, strict=True)],
        "- parallel with 2 workers ≥ 1.0× sshd: "
        + goal(pm.get("2 workers", 0) >= pm.get("sshd", 1e9),
               f"{pm.get('2 workers', 0) / pm.get('sshd', 1):.2f}×"),
    ]  # fmt: skip
    section = [
        "## Cluster (issue 11.7): cross-node vs same-node, node processes on Redis, vs sshd",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; command: `{command}`",
        f"- load average at start: {' '.join(load_start)}, at end: "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} (2 cores shared with other"
        " work: anything above 0 at start means the figures carry others' load)",
        f"- {a.reps} repetitions interleaved (same-node, cross-node, sshd, ...); two nuttconch"
        " node processes + redis-server + sshd on loopback; pinned aes128-ctr + hmac-sha2-256-etm"
        " on the client legs; the hop between the nodes negotiates its own cipher (AES-GCM)",
        "- setup: connect to the client's -L port, 1-byte echo, close (bench/load.py setup),"
        " measured by the client; the hop is up after the tunnel's probe (warm)",
        "",
        *lines,
        "",
        "Goals (issue 11.7), from the medians:",
        "",
        *targets,
        "",
        "What limits the figures: every process (ssh client, initiator, node a, node b, device,"
        " load client, redis) shares 2 cores; cross-node bytes are encrypted and decrypted"
        " twice more (the hop) by Python processes, and node a and node b each take a core"
        " in the bulk rows, so cross-node bulk is bounded by the busier node's core.",
        "",
    ]
    text = "\n".join(section)
    print(text)
    if a.results:
        results = Path(a.results)
        previous = results.read_text() if results.exists() else ""
        previous = re.sub(r"^## Cluster \(issue 11\.7\).*?(?=^## |\Z)", "", previous,
                          flags=re.M | re.S)  # fmt: skip
        results.write_text(previous.rstrip("\n") + "\n\n" + text)
        print(f"wrote {a.results}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
