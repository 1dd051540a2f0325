"""nuttconch vs OpenSSH sshd: forwarding benchmark (issue 5).

One command starts nuttconch and a private OpenSSH ``sshd`` (loopback, its own config
and keys, ``AllowTcpForwarding yes``), drives both with the real OpenSSH client
(``ssh -R`` to a local device, ``ssh -L`` to reach it), runs interleaved repetitions
(nuttconch, sshd, nuttconch, sshd, ...) and prints a table of medians, min-max and
nuttconch/sshd ratios. See bench/README.md.

Run as root (sshd privilege separation, network namespaces):

    /work/venv/bin/python bench/run.py            # full run, about 15 minutes
    /work/venv/bin/python bench/run.py --quick    # small sizes, about 2-3 minutes
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
SSHD = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin") or "/usr/sbin/sshd"
MIB = 1 << 20
PINNED = [
    "-o",
    "Ciphers=aes128-ctr",
    "-o",
    "MACs=hmac-sha2-256-etm@openssh.com",
    "-o",
    "KexAlgorithms=curve25519-sha256",
]
WORKLOADS = ["bulk", "parallel", "setup", "handshakes", "slow", "idle", "long"]
SIDES = ["nuttconch", "sshd"]

# ---------------------------------------------------------------- processes

_STARTED: list[subprocess.Popen] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(cmd: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **kw)
    _STARTED.append(proc)
    return proc


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 200000:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(proc: subprocess.Popen | None, tree: bool = False, timeout: float = 5.0) -> None:
    """Stop a process we started (and, with tree, the processes it forked), by pid."""
    if proc is None:
        return
    kids = descendants(proc.pid) if tree and proc.poll() is None else []
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc in _STARTED:
        _STARTED.remove(proc)


def stop_all() -> None:
    for proc in list(reversed(_STARTED)):
        try:
            stop(proc, tree=True, timeout=3)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_log(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pattern in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{path.name}: no {pattern!r}:\n{path.read_text(errors='replace')[-2000:]}")


# ---------------------------------------------------------------- /proc measurement

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int, children_too: bool) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    if children_too:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def _mem(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- environments


@dataclass
class Env:
    """Where servers and clients run: plain loopback, or two namespaces joined by netem."""

    name: str
    srv_prefix: list[str]
    cli_prefix: list[str]
    host: str
    device: subprocess.Popen | None = None
    ports: dict = field(default_factory=dict)

    def start_device(self) -> None:
        self.device = start(
            [*self.cli_prefix, PY, str(HERE / "device.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ports = json.loads(self.device.stdout.readline())

    def stop_device(self) -> None:
        stop(self.device)
        self.device = None


class Netns:
    """Two namespaces (server, clients) joined by a veth pair, netem delay on both ends."""

    def __init__(self, rtt_ms: float) -> None:
        tag = os.getpid() % 100000
        self.srv, self.cli = f"nb-srv-{tag}", f"nb-cli-{tag}"
        self.vs, self.vc = f"nbs{tag}", f"nbc{tag}"
        self.rtt_ms = rtt_ms
        self.made: list[str] = []

    @staticmethod
    def available(rtt_ms: float) -> str | None:
        if not shutil.which("ip") or not shutil.which("tc"):
            return "iproute2 (ip, tc) is not installed"
        if os.geteuid() != 0:
            return "network namespaces need root"
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            return f"`ip netns` is unavailable: {res.stderr.strip()}"
        if rtt_ms <= 0:
            return None
        # The kernel may lack sch_netem (no modules in many VMs): try it in a probe namespace.
        probe = f"nb-probe-{os.getpid() % 100000}"
        try:
            res = subprocess.run(
                ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10
            )
            if res.returncode != 0:
                return f"cannot create a network namespace: {res.stderr.strip()}"
            res = subprocess.run(
                ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root"]
                + ["netem", "delay", "1ms"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if res.returncode != 0:
                return f"`tc qdisc add ... netem` fails in this kernel: {res.stderr.strip()}"
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
        return None

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=20, capture_output=True)

    def create(self) -> None:
        delay = f"{self.rtt_ms / 2:g}ms"
        for ns in (self.srv, self.cli):
            self._ip("netns", "add", ns)
            self.made.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip(
            "-n",
            self.srv,
            "link",
            "add",
            self.vs,
            "type",
            "veth",
            "peer",
            "name",
            self.vc,
            "netns",
            self.cli,
        )
        self._ip("-n", self.srv, "addr", "add", "10.201.0.1/24", "dev", self.vs)
        self._ip("-n", self.cli, "addr", "add", "10.201.0.2/24", "dev", self.vc)
        for ns, dev in ((self.srv, self.vs), (self.cli, self.vc)):
            self._ip("-n", ns, "link", "set", dev, "up")
            if self.rtt_ms <= 0:
                continue
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "netem",
                    "delay",
                    delay,
                ]
                + ["limit", "100000"],
                check=True,
                timeout=20,
                capture_output=True,
            )

    def remove(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], timeout=20, capture_output=True)
        self.made = []

    def env(self) -> Env:
        return Env(
            "netns",
            ["ip", "netns", "exec", self.srv],
            ["ip", "netns", "exec", self.cli],
            "10.201.0.1",
        )


# ---------------------------------------------------------------- servers


def ssh_common(key: Path, port: int) -> list[str]:
    return [
        "-F",
        "/dev/null",
        "-i",
        str(key),
        "-p",
        str(port),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ExitOnForwardFailure=yes",
    ]


class Server:
    name = ""
    user = ""

    def __init__(self, tmp: Path, key: Path, env: Env) -> None:
        self.tmp, self.key, self.env = tmp, key, env
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.direct_port = self.proxy_port = 0  # long link through bench/delayproxy.py

    def pids(self) -> list[int]:
        raise NotImplementedError

    def mem(self) -> tuple[int, int]:
        rss = pss = 0
        for pid in self.pids():
            r, p = _mem(pid)
            rss += r
            pss += p
        return rss, pss

    def cpu(self) -> float:
        assert self.proc
        return _cpu(self.proc.pid, True) + sum(_cpu(p, True) for p in self.pids()[1:])

    def ssh(self, *args: str, algs: list[str] | None = None) -> list[str]:
        return [
            *self.env.cli_prefix,
            "ssh",
            *ssh_common(self.key, self.port),
            *(algs or []),
            *args,
            f"{self.user}@{self.env.host}",
        ]

    def negotiated(self, algs: list[str]) -> str:
        cmd = self.ssh("-v", algs=algs)
        cmd[cmd.index("LogLevel=ERROR")] = "LogLevel=DEBUG1"
        res = subprocess.run([*cmd, self.probe_command], capture_output=True, text=True, timeout=30)
        m = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+)", res.stderr)
        k = re.search(r"kex: algorithm: (\S+)", res.stderr)
        if not m:
            return "?"
        mac = "(AEAD)" if m.group(2) == "<implicit>" else m.group(2)
        return f"{m.group(1)} {mac} {k.group(1) if k else '?'}"

    probe_command = "true"

    def forwards(self, dev_ports: list[int]) -> tuple[list[str], list[str], list[int]]:
        """(-R arguments, -L arguments, local ports) for the device ports."""
        raise NotImplementedError


class Nuttconch(Server):
    name = "nuttconch"
    user = "dev1"
    probe_command = "whoami"

    def start(self) -> None:
        d = self.tmp / f"nuttconch-{self.env.name}"
        (d / "keys").mkdir(parents=True, exist_ok=True)
        pub = Path(str(self.key) + ".pub").read_text().strip()
        (d / "keys" / "authorized_keys").write_text(f'access="initiate",access="listen" {pub}\n')
        self.port = free_port()
        host = "127.0.0.1" if self.env.name == "loopback" else self.env.host
        (d / "nuttssh.ini").write_text(
            "[server]\n"
            f"listen_host = {host}\nlisten_port = {self.port}\n"
            "enable_auth = true\nallow_new_clients = false\n"
            "max_startups = 1000:30:2000\nper_source_max_startups = 2000\n"
            # The idle workload holds thousands of connections with one key from one address.
            "max_connections_per_key = 0\nmax_connections_per_source = 0\n"
            f"[keys]\nhost_key_dir = {d / 'keys'}\n"
        )
        self.logfile = d / "server.log"
        out = open(self.logfile, "w")  # noqa: SIM115 - kept open for the child
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = start(
            [*self.env.srv_prefix, PY, "-m", "nuttconch", "--config", str(d / "nuttssh.ini")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=d,
        )
        # Twisted logs this once the port is bound ("nuttconch listening on" comes before).
        wait_log(self.logfile, "SwitchboardFactory starting on", self.proc)
        res = subprocess.run([*self.ssh(), "whoami"], capture_output=True, text=True, timeout=30)
        m = re.search(r"names: ([^,\s]+)", res.stdout)
        if not m:
            raise RuntimeError(f"nuttconch whoami: {res.stdout} {res.stderr}")
        self.alias = m.group(1)

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def forwards(self, dev_ports):
        rargs, largs, lports = [], [], []
        for i, dp in enumerate(dev_ports):
            vport = 9000 + i
            lp = free_port()
            rargs += ["-R", f"{vport}:127.0.0.1:{dp}"]
            largs += ["-L", f"{lp}:{self.alias}:{vport}"]
            lports.append(lp)
        return rargs, largs, lports


class Sshd(Server):
    name = "sshd"
    user = "root"

    def start(self) -> None:
        d = self.tmp / f"sshd-{self.env.name}"
        d.mkdir(parents=True, exist_ok=True)
        hostkey = d / "ssh_host_ed25519_key"
        if not hostkey.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                check=True,
                timeout=30,
            )
        (d / "authorized_keys").write_text(Path(str(self.key) + ".pub").read_text())
        Path("/run/sshd").mkdir(exist_ok=True)
        self.port = free_port()
        host = "127.0.0.1" if self.env.name == "loopback" else self.env.host
        lines = [
            f"Port {self.port}",
            f"ListenAddress {host}",
            f"HostKey {hostkey}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            f"PidFile {d / 'sshd.pid'}",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes",
            "GatewayPorts no",
            "X11Forwarding no",
            "PrintMotd no",
            "MaxStartups 1000:30:2000",
            "MaxSessions 100",
            "LogLevel INFO",
        ]
        cfg = d / "sshd_config"
        cfg.write_text("\n".join(lines) + "\n")
        # PerSourcePenalties exists from OpenSSH 9.8 on; older sshd rejects the keyword.
        with open(cfg, "a") as f:
            f.write("PerSourcePenalties no\n")
        if (
            subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, timeout=30).returncode
            != 0
        ):
            cfg.write_text("\n".join(lines) + "\n")
        self.logfile = d / "sshd.log"
        out = open(self.logfile, "w")  # noqa: SIM115 - kept open for the child
        self.proc = start(
            [*self.env.srv_prefix, SSHD, "-D", "-e", "-f", str(cfg)], stdout=out, stderr=out
        )
        wait_log(self.logfile, "Server listening on", self.proc)

    def stop(self) -> None:
        stop(self.proc, tree=True)
        self.proc = None

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)] if self.proc else []

    def forwards(self, dev_ports):
        rargs, largs, lports = [], [], []
        for dp in dev_ports:
            rp, lp = free_port(), free_port()
            rargs += ["-R", f"127.0.0.1:{rp}:127.0.0.1:{dp}"]
            largs += ["-L", f"{lp}:127.0.0.1:{rp}"]
            lports.append(lp)
        return rargs, largs, lports


class Tunnel:
    """An initiator (ssh -R to the device's sink, source and echo) and a client (ssh -L)."""

    def __init__(self, server: Server, algs: list[str]) -> None:
        self.server, self.algs = server, algs
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Tunnel:
        env = self.server.env
        dev = [env.ports["sink"], env.ports["source"], env.ports["echo"]]
        rargs, largs, lports = self.server.forwards(dev)
        self.sink, self.source, self.echo = lports
        for args in (rargs, largs):
            cmd = self.server.ssh("-N", *args, algs=self.algs)
            self.procs.append(start(cmd, stdin=subprocess.DEVNULL))
            if args is rargs:
                time.sleep(0.3)
        res = load("probe", self.server, port=self.echo, max_seconds=20)
        if not res.get("ok"):
            self.__exit__()
            raise RuntimeError(f"{self.server.name}: tunnel did not come up")
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs = []
        time.sleep(0.2)


def load(mode: str, server: Server, background: bool = False, **kw) -> dict | subprocess.Popen:
    cmd = [*server.env.cli_prefix, PY, str(HERE / "load.py"), mode]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if background:
        return start(cmd, stdout=subprocess.PIPE, text=True)
    limit = float(kw.get("max_seconds", kw.get("seconds", 60))) + 120
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    if res.returncode != 0:
        raise RuntimeError(f"load {mode}: {res.stderr[-2000:]}")
    return json.loads(res.stdout)


# ---------------------------------------------------------------- results


@dataclass
class Row:
    label: str
    unit: str
    better: str  # "high" or "low"
    values: dict = field(default_factory=lambda: {s: [] for s in SIDES})
    note: str = ""


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def add(
        self, key: str, label: str, unit: str, better: str, side: str, value: float | None
    ) -> None:
        row = self.rows.setdefault(key, Row(label, unit, better))
        if value is not None:
            row.values[side].append(value)

    def note(self, key: str, text: str) -> None:
        if key in self.rows:
            self.rows[key].note = text

    def median(self, key: str, side: str) -> float | None:
        vals = self.rows[key].values[side] if key in self.rows else []
        return statistics.median(vals) if vals else None

    @staticmethod
    def _fmt(x: float) -> str:
        if x >= 100:
            return f"{x:.0f}"
        if x >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"

    def cell(self, vals: list[float]) -> str:
        if not vals:
            return "—"
        med = self._fmt(statistics.median(vals))
        if len(vals) == 1:
            return med
        return f"{med} ({self._fmt(min(vals))}–{self._fmt(max(vals))})"

    def table(self) -> str:
        out = [
            "| workload | unit | nuttconch median (min–max) | sshd median (min–max) "
            "| nuttconch/sshd |",
            "|---|---|---|---|---|",
        ]
        for key, row in self.rows.items():
            a, b = self.median(key, "nuttconch"), self.median(key, "sshd")
            ratio = "—"
            if a is not None and b:
                ratio = f"{a / b:.2f}×" if abs(a / b) >= 0.1 else f"{a / b:.2g}×"
            label = row.label + (f" [{row.note}]" if row.note else "")
            out.append(
                f"| {label} | {row.unit} | {self.cell(row.values['nuttconch'])} "
                f"| {self.cell(row.values['sshd'])} | {ratio} |"
            )
        return "\n".join(out)

    def targets(self) -> list[tuple[str, str]]:
        """(target, verdict) for the issue's goals, from the medians."""
        out = []

        def ratio(key: str) -> float | None:
            a, b = self.median(key, "nuttconch"), self.median(key, "sshd")
            return a / b if a is not None and b else None

        def verdict(ok: bool | None, text: str) -> str:
            return ("n/a (not run)" if ok is None else ("met" if ok else "NOT met")) + f" ({text})"

        for key, goal, name in (
            ("bulk_up", 1.0, "bulk up ≥ 1.0× sshd"),
            ("bulk_down", 1.0, "bulk down ≥ 1.0× sshd"),
            ("parallel", 1.0, "parallel ≥ 1.0× sshd"),
            ("long_up", 0.9, "long link up ≥ 0.9× sshd"),
            ("long_down", 0.9, "long link down ≥ 0.9× sshd"),
        ):
            r = ratio(key)
            out.append(
                (
                    name,
                    verdict(
                        None if r is None else r >= goal, f"{r:.2f}×" if r is not None else "—"
                    ),
                )
            )
        for key, goal, name in (
            ("setup_median", 1.0, "setup median ≤ 1 ms"),
            ("setup_p99", 3.0, "setup p99 ≤ 3 ms"),
        ):
            m = self.median(key, "nuttconch")
            out.append(
                (
                    name,
                    verdict(
                        None if m is None else m <= goal, f"{m:.2f} ms" if m is not None else "—"
                    ),
                )
            )
        m, r = self.median("handshakes", "nuttconch"), ratio("handshakes")
        out.append(
            (
                "handshakes ≥ 300/s and ≥ 4× sshd",
                verdict(
                    None if m is None else (m >= 300 and (r is None or r >= 4)),
                    f"{m:.0f}/s, {r:.1f}×" if m and r else (f"{m:.0f}/s" if m else "—"),
                ),
            )
        )
        for key in [k for k in self.rows if k.startswith("idle_") and k[5:].isdigit()]:
            m = self.median(key, "nuttconch")
            out.append(
                (
                    f"idle ({key.split('_')[-1]}) ≤ 16 KiB per connection",
                    verdict(
                        None if m is None else m <= 16, f"{m:.1f} KiB" if m is not None else "—"
                    ),
                )
            )
        m = self.median("slow", "nuttconch")
        out.append(
            (
                "slow reader growth ≤ 4 MiB",
                verdict(None if m is None else m <= 4, f"{m:.2f} MiB" if m is not None else "—"),
            )
        )
        return out


# ---------------------------------------------------------------- workloads


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.res = Results()
        self.tmp = Path(tempfile.mkdtemp(prefix="nuttbench-"))
        self.key = self.tmp / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)],
            check=True,
            timeout=30,
        )
        self.loop = Env("loopback", [], [], "127.0.0.1")
        self.servers: dict[str, Server] = {}
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.algos: dict[str, str] = {}

    def start_servers(self, env: Env) -> dict[str, Server]:
        servers = {
            "nuttconch": Nuttconch(self.tmp, self.key, env),
            "sshd": Sshd(self.tmp, self.key, env),
        }
        for s in servers.values():
            s.start()
        return servers

    def restart(self, side: str) -> None:
        self.servers[side].stop()
        time.sleep(0.5)
        self.servers[side].start()

    def reps(self):
        """Interleaved: (rep, side) as A B A B ..."""
        for rep in range(self.a.reps):
            for side in SIDES:
                yield rep, side

    def run(self) -> None:
        wl = self.a.workloads
        self.loop.start_device()
        self.servers = self.start_servers(self.loop)
        for side, s in self.servers.items():
            self.algos[f"{side} pinned"] = s.negotiated(PINNED)
            self.algos[f"{side} default"] = s.negotiated([])
        log(f"algorithms: {self.algos}")
        try:
            for name in WORKLOADS:
                if name in wl:
                    t0 = time.monotonic()
                    getattr(self, f"w_{name}")()
                    log(f"{name} done in {time.monotonic() - t0:.0f} s")
        finally:
            for s in self.servers.values():
                s.stop()
            self.loop.stop_device()

    # bulk / parallel ------------------------------------------------------

    def _throughput(
        self, key, label, side, server, mode, nbytes, algs, max_seconds, cpu_key=None, **kw
    ):
        with Tunnel(server, algs) as t:
            port = t.sink if mode in ("up", "parallel") else t.source
            c0 = server.cpu()
            r = load(mode, server, port=port, bytes=nbytes, max_seconds=max_seconds, **kw)
            cpu = server.cpu() - c0
        mbs = r["bytes"] / r["seconds"] / 1e6
        log(
            f"  {label} {side}: {mbs:.1f} MB/s ({r['bytes'] / MIB:.0f} MiB in "
            f"{r['seconds']:.2f} s), server CPU {cpu:.2f} s"
        )
        if not r["complete"]:
            log(f"  {label} {side}: stopped at the time limit")
        self.res.add(key, label, "MB/s", "high", side, mbs)
        if cpu_key and r["bytes"]:
            self.res.add(
                cpu_key,
                f"{label}: server CPU",
                "s/GiB",
                "low",
                side,
                cpu / (r["bytes"] / (1 << 30)),
            )

    def w_bulk(self) -> None:
        size = self.a.bulk_mib * MIB
        for _rep, side in self.reps():
            s = self.servers[side]
            for d in ("up", "down"):
                self._throughput(
                    f"bulk_{d}",
                    f"bulk {d}, 1 circuit × {self.a.bulk_mib} MiB",
                    side,
                    s,
                    d,
                    size,
                    PINNED,
                    self.a.max_seconds,
                    cpu_key=f"bulk_{d}_cpu",
                )
            for d in ("up", "down"):
                self._throughput(
                    f"bulk_{d}_default",
                    f"bulk {d}, each side's default cipher",
                    side,
                    s,
                    d,
                    size,
                    [],
                    self.a.max_seconds,
                )

    def w_parallel(self) -> None:
        n, size = self.a.parallel_count, self.a.parallel_mib
        for _rep, side in self.reps():
            self._throughput(
                "parallel",
                f"parallel up, {n} circuits × {size} MiB (aggregate)",
                side,
                self.servers[side],
                "parallel",
                size * MIB,
                PINNED,
                self.a.max_seconds,
                cpu_key="parallel_cpu",
                count=n,
            )

    # setup -------------------------------------------------------------

    def w_setup(self) -> None:
        n = self.a.setup_count
        for _rep, side in self.reps():
            with Tunnel(self.servers[side], PINNED) as t:
                r = load(
                    "setup",
                    self.servers[side],
                    port=t.echo,
                    count=n,
                    max_seconds=self.a.max_seconds,
                )
            ms = sorted(r["ms"])
            if not ms:
                log(f"  setup {side}: no circuit completed ({r['errors']} errors)")
                continue
            med = statistics.median(ms)
            p99 = ms[min(len(ms) - 1, int(round(0.99 * len(ms))) - 1)]
            log(
                f"  setup {side}: {len(ms)} circuits, median {med:.2f} ms, "
                f"p99 {p99:.2f} ms, errors {r['errors']}"
            )
            self.res.add(
                "setup_median", f"setup, {n} sequential circuits: median", "ms", "low", side, med
            )
            self.res.add(
                "setup_p99", f"setup, {n} sequential circuits: p99", "ms", "low", side, p99
            )

    # handshakes ---------------------------------------------------------

    def _sshload(self, server: Server, mode: str, **kw) -> list[str]:
        cmd = [
            *server.env.cli_prefix,
            PY,
            str(HERE / "sshload.py"),
            mode,
            "--host",
            server.env.host,
            "--port",
            str(server.port),
            "--user",
            server.user,
            "--key",
            str(self.key),
            "--device-port",
            str(server.env.ports["echo"]),
        ]
        for k, v in kw.items():
            if v is True:
                cmd.append(f"--{k.replace('_', '-')}")
            elif v is not False:
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        return cmd

    def w_handshakes(self) -> None:
        secs, conc = self.a.hs_seconds, self.a.hs_concurrency
        for _rep, side in self.reps():
            s = self.servers[side]
            c0, t0 = s.cpu(), time.monotonic()
            procs = [
                start(
                    self._sshload(
                        s, "handshakes", seconds=secs, concurrency=conc, max_count=self.a.hs_max
                    ),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(self.a.hs_procs)
            ]
            done = errors = 0
            span = 0.0
            for p in procs:
                out, _ = p.communicate(timeout=secs + 120)
                _STARTED.remove(p)
                r = json.loads(out)
                done, errors, span = done + r["done"], errors + r["errors"], max(span, r["seconds"])
            cpu, wall = s.cpu() - c0, time.monotonic() - t0
            rate = done / span
            log(
                f"  handshakes {side}: {done} in {span:.1f} s = {rate:.0f}/s, errors {errors}, "
                f"server CPU {cpu:.1f} s over {wall:.1f} s wall "
                f"({1000 * cpu / max(done, 1):.2f} ms each)"
            )
            label = f"handshakes (kex+auth+one -R+close), {self.a.hs_procs}×{conc} concurrent"
            self.res.add("handshakes", label, "conn/s", "high", side, rate)
            self.res.add(
                "handshakes_cpu",
                "handshakes: server CPU per connection",
                "ms",
                "low",
                side,
                1000 * cpu / max(done, 1),
            )
            if side == "sshd":
                time.sleep(1)  # let sshd reap its children

    # slow reader -----------------------------------------------------------

    def w_slow(self) -> None:
        secs = self.a.slow_seconds
        for _rep, side in self.reps():
            # A fresh server: after bulk transfers its heap has room to spare, hiding growth.
            self.restart(side)
            s = self.servers[side]
            with Tunnel(s, PINNED) as t:
                time.sleep(0.5)
                rss0, pss0 = s.mem()
                if side == "nuttconch":
                    Path(f"/proc/{s.proc.pid}/clear_refs").write_text("5")
                p = load(
                    "slow", s, background=True, port=t.source, rate=self.a.slow_rate, seconds=secs
                )
                peak_rss, peak_pss = rss0, pss0
                deadline = time.monotonic() + secs + 60
                while p.poll() is None and time.monotonic() < deadline:
                    rss, pss = s.mem()
                    peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
                    time.sleep(0.1)
                if side == "nuttconch":
                    peak_rss = max(peak_rss, _hwm(s.proc.pid))
                out, _ = p.communicate(timeout=60)
                _STARTED.remove(p)
                r = json.loads(out)
            g_rss, g_pss = (peak_rss - rss0) / 1024, (peak_pss - pss0) / 1024
            log(
                f"  slow {side}: read {r['bytes'] / MIB:.1f} MiB; "
                f"peak growth RSS {g_rss:.2f} MiB, PSS {g_pss:.2f} MiB"
            )
            rate = self.a.slow_rate / MIB
            what = f"slow reader ({rate:g} MiB/s, {secs:g} s): peak server memory growth"
            main = g_rss if side == "nuttconch" else g_pss
            self.res.add(
                "slow", f"{what} (nuttconch RSS; sshd PSS, summed)", "MiB", "low", side, main
            )
            self.res.add("slow_rss", f"{what}, RSS (sshd: summed)", "MiB", "low", side, g_rss)

    # idle ---------------------------------------------------------------

    def w_idle(self) -> None:
        for count in self.a.idle_counts:
            for _rep in range(self.a.idle_reps):
                for side in SIDES:
                    if side == "sshd" and count > self.a.idle_sshd_max:
                        cap = self.a.idle_sshd_max
                        msg = f"idle {count} for sshd skipped (> --idle-sshd-max {cap})"
                        if msg not in self.skipped:
                            self.skipped.append(msg)
                            log("  " + msg)
                        continue
                    self._idle_one(count, side)

    def _idle_one(self, count: int, side: str) -> None:
        self.restart(side)
        s = self.servers[side]
        time.sleep(1.0)
        rss0, pss0 = s.mem()
        cmd = self._sshload(
            s,
            "idle",
            count=count,
            concurrency=self.a.idle_concurrency,
            connect_seconds=self.a.idle_connect_seconds,
            hold_seconds=self.a.idle_connect_seconds + 120,
            user_suffix=(side == "nuttconch"),
            spread=count > 20000,
        )
        p = start(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = p.stdout.readline()
            r = json.loads(line) if line else {"ready": 0, "errors": count, "seconds": 0}
            time.sleep(2.0)
            rss, pss = s.mem()
            nproc = len(s.pids())
        finally:
            p.stdin.close()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
            stop(p)
        ready = r["ready"]
        if not ready:
            log(f"  idle {count} {side}: no connection came up")
            return
        kib_rss, kib_pss = (rss - rss0) / ready, (pss - pss0) / ready
        log(
            f"  idle {count} {side}: {ready} up in {r['seconds']:.1f} s ({r['errors']} errors), "
            f"{nproc} server processes, per connection RSS {kib_rss:.1f} KiB, PSS {kib_pss:.1f} KiB"
        )
        what = f"idle, {count} initiators: server memory per connection"
        main = kib_rss if side == "nuttconch" else kib_pss
        key = f"idle_{count}"
        self.res.add(key, f"{what} (nuttconch RSS; sshd PSS, summed)", "KiB", "low", side, main)
        self.res.add(
            f"idle_rss_{count}", f"{what}, RSS (sshd: summed)", "KiB", "low", side, kib_rss
        )
        if ready < count:
            self.res.note(key, f"only {ready} of {count} connected for {side}")

    # long link ----------------------------------------------------------

    def w_long(self) -> None:
        mode = self.a.long_proxy
        why = None if mode == "always" else Netns.available(self.a.rtt_ms)
        if mode == "always" or (why and mode == "auto"):
            self._long_proxy(why)
            return
        if why:
            msg = f"long link skipped: {why}"
            self.skipped.append(msg)
            log(msg)
            return
        ns = Netns(self.a.rtt_ms)
        env = ns.env()
        servers: dict[str, Server] = {}
        try:
            try:
                ns.create()
            except subprocess.CalledProcessError as exc:
                msg = f"long link skipped: {' '.join(exc.cmd)}: {exc.stderr.decode().strip()}"
                self.skipped.append(msg)
                log(msg)
                return
            env.start_device()
            servers = self.start_servers(env)
            size = self.a.long_mib * MIB
            for _rep, side in self.reps():
                for d in ("up", "down"):
                    self._throughput(
                        f"long_{d}",
                        f"long link {d} ({self.a.rtt_ms:g} ms RTT), "
                        f"1 circuit × {self.a.long_mib} MiB",
                        side,
                        servers[side],
                        d,
                        size,
                        PINNED,
                        self.a.long_max_seconds,
                    )
        finally:
            for s in servers.values():
                s.stop()
            env.stop_device()
            ns.remove()

    def _long_proxy(self, why: str | None) -> None:
        """The long link without netem: bench/delayproxy.py in front of each server,
        the same for both, holding every chunk rtt/2 in each direction."""
        one_way = self.a.rtt_ms / 2
        msg = (
            f"long link through bench/delayproxy.py (user-space TCP proxy, {one_way:g} ms "
            f"each way, {self.a.rtt_ms:g} ms RTT) in front of both servers"
            + (f", because netem is unavailable: {why}" if why else "")
        )
        self.notes.append(msg)
        log(msg)
        size = self.a.long_mib * MIB
        proxies: dict[str, subprocess.Popen] = {}
        try:
            for side, server in self.servers.items():
                proc = start(
                    [PY, str(HERE / "delayproxy.py"), "--target", f"127.0.0.1:{server.port}"]
                    + ["--delay-ms", f"{one_way:g}"],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                proxies[side] = proc
                proxy_port = json.loads(proc.stdout.readline())["port"]
                server.direct_port = server.port
                server.proxy_port = proxy_port
            for _rep, side in self.reps():
                server = self.servers[side]
                server.port = server.proxy_port
                try:
                    for d in ("up", "down"):
                        self._throughput(
                            f"long_{d}",
                            f"long link {d} ({self.a.rtt_ms:g} ms RTT, delay proxy), "
                            f"1 circuit × {self.a.long_mib} MiB",
                            side,
                            server,
                            d,
                            size,
                            PINNED,
                            self.a.long_max_seconds,
                        )
                finally:
                    server.port = server.direct_port
        finally:
            for proc in proxies.values():
                stop(proc)


# ---------------------------------------------------------------- main


def versions() -> dict[str, str]:
    def cmd(*c: str) -> str:
        try:
            r = subprocess.run(c, capture_output=True, text=True, timeout=30)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import twisted

    try:
        import asyncssh

        asv = asyncssh.__version__
    except ImportError:
        asv = "not installed"
    rev = cmd("git", "-C", str(REPO), "describe", "--always", "--dirty")
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "openssh": cmd("ssh", "-V"),
        "asyncssh": asv,
        "nuttconch": rev,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="nuttconch vs OpenSSH sshd forwarding benchmark (run as root).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes and counts (about 3 minutes)")
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated subset of " + ",".join(WORKLOADS),
    )
    p.add_argument(
        "--reps", type=int, default=3, help="repetitions of each workload per side (interleaved)"
    )
    p.add_argument("--bulk-mib", type=int, default=512, help="bulk: bytes per direction, MiB")
    p.add_argument("--parallel-count", type=int, default=8, help="parallel: circuits")
    p.add_argument("--parallel-mib", type=int, default=128, help="parallel: MiB per circuit")
    p.add_argument("--setup-count", type=int, default=300, help="setup: sequential circuits")
    p.add_argument(
        "--hs-seconds", type=float, default=10.0, help="handshakes: duration of each run"
    )
    p.add_argument(
        "--hs-max", type=int, default=20000, help="handshakes: at most this many per load process"
    )
    p.add_argument(
        "--hs-concurrency",
        type=int,
        default=16,
        help="handshakes: concurrent connections per process",
    )
    p.add_argument("--hs-procs", type=int, default=1, help="handshakes: load client processes")
    p.add_argument(
        "--idle-counts", default="1000,10000", help="idle: comma-separated connection counts"
    )
    p.add_argument("--idle-reps", type=int, default=1, help="idle: repetitions per count and side")
    p.add_argument(
        "--idle-sshd-max",
        type=int,
        default=1000,
        help="idle: skip sshd for counts above this (2 processes each)",
    )
    p.add_argument(
        "--idle-concurrency", type=int, default=32, help="idle: concurrent connection attempts"
    )
    p.add_argument(
        "--idle-connect-seconds",
        type=float,
        default=300.0,
        help="idle: time limit to connect them all",
    )
    p.add_argument("--slow-rate", type=int, default=MIB, help="slow reader: bytes per second read")
    p.add_argument("--slow-seconds", type=float, default=20.0, help="slow reader: duration")
    p.add_argument("--long-mib", type=int, default=128, help="long link: MiB per direction")
    p.add_argument(
        "--long-max-seconds", type=float, default=20.0, help="long link: time limit per transfer"
    )
    p.add_argument(
        "--rtt-ms",
        type=float,
        default=40.0,
        help="long link: round-trip time added with netem (0: namespaces, no netem)",
    )
    p.add_argument(
        "--long-proxy",
        choices=("auto", "always", "never"),
        default="auto",
        help="long link: use bench/delayproxy.py (a user-space delay proxy in front of both "
        "servers) when netem is unavailable (auto), always (with --rtt-ms 0: the proxy's "
        "own overhead), or never",
    )
    p.add_argument(
        "--max-seconds", type=float, default=120.0, help="time limit of any one transfer or loop"
    )
    p.add_argument(
        "--results", default=str(HERE / "RESULTS.md"), help="write the table here ('' for no file)"
    )
    a = p.parse_args(argv)
    if a.quick:
        given = set(argv if argv is not None else sys.argv[1:])

        def q(opt: str, attr: str, value) -> None:
            if opt not in given:
                setattr(a, attr, value)

        q("--reps", "reps", 2)
        q("--bulk-mib", "bulk_mib", 64)
        q("--parallel-mib", "parallel_mib", 16)
        q("--setup-count", "setup_count", 100)
        q("--hs-seconds", "hs_seconds", 4.0)
        q("--idle-counts", "idle_counts", "200")
        q("--slow-seconds", "slow_seconds", 5.0)
        q("--long-mib", "long_mib", 16)
        q("--long-max-seconds", "long_max_seconds", 10.0)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in a.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workloads: {', '.join(bad)}")
    a.idle_counts = [int(x) for x in str(a.idle_counts).split(",") if x.strip()]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "bench/run.py needs root (sshd privilege separation, network namespaces)",
            file=sys.stderr,
        )
        return 2
    if "handshakes" in a.workloads or "idle" in a.workloads:
        try:
            import asyncssh  # noqa: F401
        except ImportError:
            print("handshakes/idle need asyncssh: pip install asyncssh", file=sys.stderr)
            return 2
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    command = " ".join(
        [os.path.relpath(PY) if PY.startswith(str(REPO)) else PY, "bench/run.py", *sys.argv[1:]]
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    bench = Bench(a)
    try:
        bench.run()
    finally:
        stop_all()
    minutes = (time.monotonic() - t0) / 60
    v = versions()
    table = bench.res.table()
    targets = bench.res.targets()
    print()
    print(table)
    print()
    for name, verdict in targets:
        print(f"- {name}: {verdict}")
    for msg in bench.notes + bench.skipped:
        print(f"- {msg}")
    if a.results:

        def algos(kind: str) -> str:
            return ", ".join(f"{k.split()[0]} {x}" for k, x in bench.algos.items() if kind in k)

        text = [
            "# Benchmark results: nuttconch vs OpenSSH sshd",
            "",
            f"- date: {started:%Y-%m-%d %H:%M} UTC (run took {minutes:.1f} min)",
            f"- machine: {v['cores']} cores, {v['cpu']}, Linux {v['kernel']}",
            f"- versions: Python {v['python']}, Twisted {v['twisted']}, {v['openssh']}, "
            f"asyncssh {v['asyncssh']} (load client), nuttconch {v['nuttconch']}",
            f"- command: `{command}`",
            f"- load average (1/5/15 min) at start: {' '.join(load_start)}, at end: "
            f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
            "(anything above about 0 at start means other work shared the cores)",
            f"- repetitions: {a.reps} per side, interleaved "
            "(nuttconch, sshd, nuttconch, sshd, ...); "
            f"idle: {a.idle_reps} per count and side",
            f"- algorithms: pinned rows {algos('pinned')}; default-cipher rows {algos('default')}",
            "",
            table,
            "",
            "Targets (issue 5), from the medians:",
            "",
            *[f"- {name}: {verdict}" for name, verdict in targets],
            *[f"- {msg}" for msg in bench.notes + bench.skipped],
            "",
        ]
        # Sections other tools append (``## ...``, e.g. bench/threat_figures.py) are kept.
        results = Path(a.results)
        previous = results.read_text() if results.exists() else ""
        kept = re.search(r"^## ", previous, re.M)
        if kept:
            text += ["", previous[kept.start() :].rstrip("\n"), ""]
        results.write_text("\n".join(text))
        print(f"\nwrote {a.results}")
    shutil.rmtree(bench.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
