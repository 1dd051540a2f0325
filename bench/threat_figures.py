"""THREATS.md section 5 figures, measured against a separate nuttconch server process.

    python bench/threat_figures.py [--scale N] [--only F1,F4,...] [--commit REV]

Each figure starts its own ``python -m nuttconch --config <tmp ini>`` on a free loopback
port (host keys shared by the run, an ``authorized_keys`` that pre-authorizes the run's
key with ``access="initiate",access="listen",access="list"``, no TOFU, log level info to a
file, ``per_source_penalty_exempt_list = 127.0.0.1``), drives it with the OpenSSH client,
raw sockets and asyncssh, reads ``/proc/<pid>/status`` and ``/proc/<pid>/fd``, and stops
it. The table (F# | figure | target | measured) is printed at the end as Markdown.

Figures: F1 pre-auth flood and legit logins, F2 pre-auth lifetime, F3 huge packet length
and the server's KEXINIT, F4 never-finished kex plus IGNORE flood, F5 stalled circuits,
F6 circuit churn drift, F7 channel and forward caps, F8 (in-process test only), F10
initiator death, F12 handshake rate, F13 log bytes per malformed connection, F16
outbound connects (under strace). ``--scale`` multiplies the F1, F5 and F6 counts.

Every loop is bounded in count and time; only loopback is used; every process is
started here and stopped by pid; the temporary directory is removed at the end.
``--commit REV`` runs the server from ``git archive REV`` instead of this checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BANNER = b"SSH-2.0-threatfig_1.0\r\n"
MSG_IGNORE = 2
MSG_KEXINIT = 20
KEXINIT_FIELDS = ("kex", "hostkey", "cipher", "cipher_sc", "mac", "mac_sc", "comp", "comp_sc")
Row = tuple[str, str, str, str]


# -- small helpers ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (root only), so a later VmHWM is this step's peak."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    """Nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def seconds(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f} s"


def mib(kib: float) -> str:
    return f"{kib / 1024:+.2f} MiB"


def ns(data: bytes) -> bytes:
    return struct.pack(">L", len(data)) + data


def ssh_packet(payload: bytes) -> bytes:
    """One unencrypted binary packet (RFC 4253 section 6), block size 8."""
    pad = 8 - (len(payload) + 5) % 8
    if pad < 4:
        pad += 8
    return struct.pack(">LB", len(payload) + pad + 1, pad) + payload + b"\0" * pad


def client_kexinit() -> bytes:
    lists = [b"curve25519-sha256", b"ssh-ed25519", b"aes128-ctr", b"aes128-ctr"]
    lists += [b"hmac-sha2-256", b"hmac-sha2-256", b"none", b"none", b"", b""]
    return bytes([MSG_KEXINIT]) + os.urandom(16) + b"".join(ns(x) for x in lists) + b"\0" * 5


def parse_kexinit(payload: bytes) -> dict[str, list[str]]:
    rest = payload[17:]
    out: dict[str, list[str]] = {}
    for name in KEXINIT_FIELDS:
        (length,) = struct.unpack(">L", rest[:4])
        value, rest = rest[4 : 4 + length], rest[4 + length :]
        out[name] = value.decode("ascii", "replace").split(",") if value else []
    return out


class Raw:
    """A plain TCP connection to the server whose bytes the figure writes itself."""

    def __init__(self, port: int, bind: str | None = None, timeout: float = 5.0) -> None:
        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        if bind:
            self.sock.bind((bind, 0))
        self.sock.connect(("127.0.0.1", port))
        self.opened = time.monotonic()
        self.buf = bytearray()
        self.closed_at: float | None = None

    def send(self, data: bytes) -> bool:
        """False once the server has closed (reset or broken pipe)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self._closed()
            return False

    def greet(self) -> None:
        """Send the version line alone: Conch drops a connection whose first read holds
        more than 4 KiB before the version is parsed, which would hide what comes next."""
        self.send(BANNER)
        time.sleep(0.3)

    def _closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()

    def pump(self, wait: float) -> None:
        """Read what is there (waiting at most ``wait``); notes EOF or reset."""
        if self.closed_at is not None:
            return
        self.sock.settimeout(max(wait, 0.001))
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return
        except OSError:
            self._closed()
            return
        if not data:
            self._closed()
        elif len(self.buf) < 1 << 20:
            self.buf += data

    def kexinit(self, timeout: float = 5.0) -> dict[str, list[str]]:
        """The server's KEXINIT name-lists (the client must have sent its version line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.closed_at is None:
            end = self.buf.find(b"\n")
            if end >= 0 and len(self.buf) >= end + 6:
                (length,) = struct.unpack(">L", self.buf[end + 1 : end + 5])
                if len(self.buf) >= end + 5 + length:
                    pad = self.buf[end + 5]
                    payload = bytes(self.buf[end + 6 : end + 5 + length - pad])
                    if payload[:1] == bytes([MSG_KEXINIT]):
                        return parse_kexinit(payload)
                    raise RuntimeError(f"first server packet is not KEXINIT: {payload[:1]!r}")
            self.pump(0.2)
        raise RuntimeError("no KEXINIT from the server")

    def wait_closed(self, timeout: float) -> float | None:
        """Seconds from connect to the server's close, or None if still open at ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.closed_at is None and time.monotonic() < deadline:
            self.pump(min(0.2, max(0.0, deadline - time.monotonic())))
        return None if self.closed_at is None else self.closed_at - self.opened

    def close(self) -> None:
        self.sock.close()


class Device:
    """A loopback TCP service in one thread: ``echo``, ``source`` (writes as fast as it
    can to every connection) or ``hold`` (accepts and discards)."""

    BLOCK = os.urandom(256 * 1024)

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4096)
        self.srv.setblocking(False)
        self.port = int(self.srv.getsockname()[1])
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.srv, selectors.EVENT_READ)
        self.accepted = 0
        self.sent = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        events = selectors.EVENT_READ
        if self.mode == "source":
            events |= selectors.EVENT_WRITE
        while not self.stopping:
            for key, mask in self.sel.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.srv:
                    try:
                        conn, _ = self.srv.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    self.sel.register(conn, events)
                    self.accepted += 1
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        data = sock.recv(65536)
                        if not data:
                            self._drop(sock)
                            continue
                        if self.mode == "echo":
                            sock.send(data)
                    if mask & selectors.EVENT_WRITE:
                        self.sent += sock.send(self.BLOCK)
                except BlockingIOError:
                    pass
                except OSError:
                    self._drop(sock)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()

    def _drop(self, sock: socket.socket) -> None:
        self.sel.unregister(sock)
        sock.close()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)


# -- the run: keys, servers, ssh clients --------------------------------------


class Run:
    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.tmp = Path(tempfile.mkdtemp(prefix="nuttconch-threats-"))
        self.keys = self.tmp / "keys"
        self.keys.mkdir()
        self.key = self.tmp / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        pub = Path(str(self.key) + ".pub").read_text().strip()
        access = 'access="initiate",access="listen",access="list"'
        (self.keys / "authorized_keys").write_text(f"{access} {pub}\n")
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def cleanup(self, keep: bool = False) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)
        if keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @contextmanager
    def server(self, name: str, extra: str = "", strace: Path | None = None) -> Iterator[Server]:
        srv = Server(self, name, extra, strace)
        try:
            srv.start()
            yield srv
        finally:
            srv.stop()


class Server:
    """One ``python -m nuttconch`` process (optionally under strace) with its own ini."""

    def __init__(self, run: Run, name: str, extra: str, strace: Path | None) -> None:
        self.run = run
        self.dir = run.tmp / name
        self.dir.mkdir()
        self.port = free_port()
        self.log = self.dir / "server.log"
        self.strace = strace
        self.ini = self.dir / "nuttssh.ini"
        self.ini.write_text(
            "[server]\nlisten_host = 127.0.0.1\n"
            f"listen_port = {self.port}\nenable_auth = true\nallow_new_clients = false\n"
            f"per_source_penalty_exempt_list = 127.0.0.1\n{extra}\n"
            f"[keys]\nhost_key_dir = {run.keys}\n[log]\nlevel = info\n"
        )
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.clients: list[subprocess.Popen] = []
        self.last_error = ""

    def spawn(self, cmd: list[str], **kw) -> subprocess.Popen:
        """A client process of this server, stopped (by pid) before the server is."""
        proc = self.run.spawn(cmd, **kw)
        self.clients.append(proc)
        return proc

    def start(self) -> None:
        cmd = [sys.executable, "-m", "nuttconch", "--config", str(self.ini)]
        if self.strace is not None:
            cmd = [
                "strace",
                "-f",
                "-qq",
                "-e",
                "trace=connect,accept,accept4",
                "-o",
                str(self.strace),
                *cmd,
            ]
        env = dict(os.environ, PYTHONPATH=str(self.run.tree))
        with open(self.log, "wb") as out:
            self.proc = self.run.spawn(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("server did not listen within 60 s")
        if self.strace is not None:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            self.pid = int(children[0])  # the traced python
        time.sleep(0.3)

    def stop(self) -> None:
        for client in reversed(self.clients):
            self.run.stop(client)
        if self.proc is None:
            return
        if self.pid != self.proc.pid and self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)  # the traced python; strace follows it out
            except ProcessLookupError:
                pass
        self.run.stop(self.proc)

    def rss(self) -> int:
        return status_kib(self.pid)

    def hwm(self) -> int:
        return status_kib(self.pid, "VmHWM")

    def fds(self) -> int:
        return fd_count(self.pid)

    def ssh(self) -> list[str]:
        return [
            "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", "-i", str(self.run.key),
            "-p", str(self.port),
        ]  # fmt: skip

    def command(self, user: str, command: str, timeout: float = 20) -> tuple[bool, float, str]:
        """``ssh user@127.0.0.1 command``: (exit 0, seconds, stdout)."""
        start = time.monotonic()
        try:
            done = subprocess.run(
                [*self.ssh(), f"{user}@127.0.0.1", command],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            self.last_error = f"timed out after {timeout:g} s"
            return False, time.monotonic() - start, ""
        if done.returncode != 0:
            self.last_error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return done.returncode == 0, time.monotonic() - start, done.stdout

    def alias(self, user: str) -> str:
        ok, _, out = self.command(user, "whoami")
        if not ok or "names: " not in out:
            raise RuntimeError(f"whoami failed: {out!r}")
        return out.split("names: ")[1].split(",")[0].split()[0]

    def listed(self, alias: str) -> str | None:
        """The ``listeners`` row naming ``alias``, or None."""
        ok, _, out = self.command("lister", "listeners")
        if not ok:
            raise RuntimeError(f"listeners failed: {out!r}")
        for line in out.splitlines()[1:]:
            if alias in line.split():
                return line
        return None

    def initiator(self, user: str, device_port: int) -> tuple[subprocess.Popen, str]:
        """``ssh -N -R 9000:127.0.0.1:<device>`` held open; waits until the registry lists it."""
        alias = self.alias(user)
        forward = f"9000:127.0.0.1:{device_port}"
        cmd = [*self.ssh(), "-N", "-o", "ExitOnForwardFailure=yes", "-R", forward]
        proc = self.spawn([*cmd, f"{user}@127.0.0.1"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            row = self.listed(alias)
            if row is not None and "9000" in row:
                return proc, alias
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError("initiator did not come up")


# -- the figures --------------------------------------------------------------


class Flood:
    """Non-blocking sockets that connect from 127.0.0.2..101, send the version line and
    then nothing; notes when the server closes each one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.connected: dict[socket.socket, float] = {}
        self.closed: dict[socket.socket, float] = {}
        self.connecting = 0
        self.errors = 0

    def open(self, index: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((f"127.0.0.{2 + index % 100}", 0))
            sock.connect_ex(("127.0.0.1", self.port))
        except OSError:
            self.errors += 1
            sock.close()
            return
        self.sel.register(sock, selectors.EVENT_WRITE)
        self.connecting += 1

    def poll(self, wait: float) -> None:
        for key, mask in self.sel.select(wait):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            now = time.monotonic()
            if mask & selectors.EVENT_WRITE:
                self.connecting -= 1
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self.errors += 1
                    self.sel.unregister(sock)
                    sock.close()
                    continue
                self.connected[sock] = now
                self.sel.modify(sock, selectors.EVENT_READ)
                try:
                    sock.send(BANNER)
                except OSError:
                    self._closed(sock, now)
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._closed(sock, now)

    def _closed(self, sock: socket.socket, now: float) -> None:
        self.closed[sock] = now
        self.sel.unregister(sock)

    def close(self) -> None:
        self.sel.close()
        for sock in self.connected:
            sock.close()


def f1(run: Run, scale: int) -> list[Row]:
    total = 2000 * scale
    in_flight = 256
    with run.server("f1") as srv:
        flood = Flood(srv.port)
        logins: list[tuple[bool, float, float]] = []
        errors: list[str] = []
        started = threading.Event()

        def legit() -> None:
            started.wait(30)
            for _ in range(10):
                begun = time.monotonic()
                ok, seconds, _ = srv.command("legit", "whoami")
                logins.append((ok, seconds, begun))
                if not ok:
                    errors.append(srv.last_error)
                time.sleep(max(0.0, begun + 0.5 - time.monotonic()))

        worker = threading.Thread(target=legit, daemon=True)
        worker.start()
        flood_start = time.monotonic()
        deadline = flood_start + 60
        opened = 0
        while (opened < total or flood.connecting) and time.monotonic() < deadline:
            while opened < total and flood.connecting < in_flight:
                flood.open(opened)
                opened += 1
            if opened >= min(200, total):
                started.set()
            flood.poll(0.01)
        started.set()
        flood_seconds = time.monotonic() - flood_start
        observe_until = time.monotonic() + 3
        while time.monotonic() < observe_until or (
            worker.is_alive() and time.monotonic() < deadline
        ):
            flood.poll(0.1)
        socks = flood.connected
        at_once = sum(1 for s, t in flood.closed.items() if t - socks[s] <= 1.0)
        later = len(flood.closed) - at_once
        held = len(socks) - len(flood.closed)
        server_fds, rss_flood = srv.fds(), srv.rss()
        flood.close()
        released = time.monotonic()
        recovered = math.nan
        while time.monotonic() - released < 30:
            ok, _, _ = srv.command("legit", "whoami")
            if ok:
                recovered = time.monotonic() - released
                break
            time.sleep(0.2)
        worker.join(5)
    times = [s for ok, s, _ in logins if ok]
    arriving = [ok for ok, _, begun in logins if begun < flood_start + flood_seconds]
    arrival = f"{sum(arriving)}/{len(arriving)} while the flood was arriving"
    failed = f" (failures: {'; '.join(sorted(set(errors)))})" if errors else ""
    measured = (
        f"{len(socks)} of {total} flood sockets connected in {flood_seconds:.1f} s"
        f" ({flood.errors} connect errors); after ≥3 s: {held} held open, {at_once} closed at"
        f" once (≤1 s), {later} closed later; server fds {server_fds}, RSS"
        f" {rss_flood / 1024:.0f} MiB; legit logins during the flood {len(times)}/{len(logins)}"
        f" ok ({arrival}){failed}, p50 {seconds(percentile(times, 50))},"
        f" p95 {seconds(percentile(times, 95))};"
        f" login after closing the flood works in {recovered:.2f} s"
    )
    target = "N ≥ 5000 shed with early drop; legit login completes, p95 < 2 s"
    figure = f"pre-auth flood: {total} × (version line, then silence) from 100 sources"
    return [("F1", figure, target, measured)]


def f2(run: Run, scale: int) -> list[Row]:
    grace = 3.0
    results: dict[str, float | None] = {}

    def probe(mode: str, port: int) -> None:
        raw = Raw(port)
        try:
            if mode == "banner, then 1 byte/s":
                raw.send(BANNER)
                drip = ssh_packet(client_kexinit())
                for i in range(int(grace) + 10):
                    if not raw.send(drip[i : i + 1]):
                        break
                    if raw.wait_closed(1.0) is not None:
                        break
            elif mode == "KEXINIT exchanged, then stall":
                raw.send(BANNER)
                raw.send(ssh_packet(client_kexinit()))
                raw.kexinit()
            results[mode] = raw.wait_closed(grace + 10)
        finally:
            raw.close()

    modes = ["sends nothing", "banner, then 1 byte/s", "KEXINIT exchanged, then stall"]
    with run.server("f2", f"login_grace_time = {grace:g}") as srv:
        threads = [threading.Thread(target=probe, args=(m, srv.port)) for m in modes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(grace + 30)

    def fmt(value: float | None) -> str:
        return "still open after 13 s" if value is None else f"{value:.2f} s"

    measured = "; ".join(f"{m}: {fmt(results.get(m))}" for m in modes)
    figure = f"pre-auth connection lifetime from connect, login_grace_time = {grace:g}"
    return [("F2", figure, "≤ login_grace_time (≈3 s)", measured)]


def f3(run: Run, scale: int) -> list[Row]:
    with run.server("f3") as srv:
        raw = Raw(srv.port)
        raw.send(BANNER)
        lists = raw.kexinit()
        raw.close()
        time.sleep(0.5)
        base = srv.rss()
        have_hwm = reset_hwm(srv.pid)
        raw = Raw(srv.port)
        raw.greet()
        raw.opened = time.monotonic()  # lifetime from here: the bad header
        raw.send(struct.pack(">LB", 0xFFFFFFF0, 4))
        junk = os.urandom(64 * 1024)
        sent = 5
        for _ in range(16):
            if not raw.send(junk):
                break
            sent += len(junk)
        lifetime = raw.wait_closed(10)
        raw.close()
        time.sleep(0.5)
        rss, hwm = srv.rss(), srv.hwm()
    zlib = [name for name in lists["comp"] + lists["comp_sc"] if "zlib" in name]
    peak = f"peak (VmHWM) {mib(hwm - base)}" if have_hwm else "VmHWM not resettable"
    closed = (
        "NOT closed within 10 s"
        if lifetime is None
        else f"closed {lifetime:.2f} s after the header was sent"
    )
    measured = f"RSS {mib(rss - base)}, {peak}; {closed}; {sent} bytes written before the reset"
    shown = ("kex", "hostkey", "cipher", "mac", "comp")
    offered = "; ".join(f"{name}: {','.join(lists[name])}" for name in shown)
    return [
        ("F3", "one pre-auth packet claiming length 0xFFFFFFF0 + 1 MiB junk", "< 2 MiB", measured),
        (
            "F3",
            "server KEXINIT name-lists (c→s; s→c identical)",
            "no zlib",
            f"zlib offered: {'yes ' + ','.join(zlib) if zlib else 'no'}; {offered}",
        ),
    ]


def _flood(srv: Server, packet: bytes, count: int) -> tuple[int, int, float | None, int]:
    """After the version line and a KEXINIT, ``count`` copies of ``packet``, never reading
    what the server answers. Returns (RSS growth, VmHWM growth or -1, lifetime, sent)."""
    base = srv.rss()
    have_hwm = reset_hwm(srv.pid)
    raw = Raw(srv.port)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.greet()
    raw.send(ssh_packet(client_kexinit()))
    raw.opened = time.monotonic()  # lifetime from here: the first flood packet
    batch = packet * 1000
    sent = 0
    deadline = time.monotonic() + 30
    while sent < count and time.monotonic() < deadline:
        if not raw.send(batch):
            break
        sent += 1000
    time.sleep(1)
    rss, hwm = srv.rss(), srv.hwm()
    lifetime = raw.wait_closed(5)
    raw.close()
    time.sleep(0.5)
    return rss - base, hwm - base if have_hwm else -1, lifetime, sent


def f4(run: Run, scale: int) -> list[Row]:
    variants = [
        ("IGNORE", ssh_packet(bytes([MSG_IGNORE]) + ns(os.urandom(256))), 100_000),
        # 22 is unassigned in the kex range (20-49): Conch answers each with UNIMPLEMENTED.
        ("unassigned message 22", ssh_packet(bytes([22])), 1_000_000),
    ]
    rows = []
    with run.server("f4") as srv:
        for label, packet, count in variants:
            growth, peak, lifetime, sent = _flood(srv, packet, count)
            if lifetime is None:
                closed = "NOT disconnected (5 s after the last write)"
            else:
                closed = f"disconnected {lifetime:.2f} s after the flood began"
            measured = (
                f"RSS {mib(growth)} one second after the last write"
                f"{f', peak (VmHWM) {mib(peak)}' if peak >= 0 else ''}; {closed};"
                f" {sent} of {count} packets ({sent * len(packet) / 1048576:.1f} MiB) written"
            )
            figure = (
                f"never-finished kex + {count:.0e} {label} packets ({len(packet)} B each),"
                " replies never read"
            )
            rows.append(("F4", figure, "< 5 MiB, disconnect", measured))
    return rows


def stalled_reader(srv: Server, alias: str, user: str) -> subprocess.Popen:
    """``ssh -W alias:9000`` whose stdout pipe is read for one byte (the circuit is up) and
    then never again, so the circuit stalls. One retry: MaxStartups' random early drop may
    refuse a login while other clients are still in their handshake."""
    for _ in range(2):
        cmd = [*srv.ssh(), "-W", f"{alias}:9000", f"{user}@127.0.0.1"]
        proc = srv.spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        if ready and proc.stdout.read(1):
            return proc
        srv.run.stop(proc)
    raise RuntimeError(f"circuit for {user} did not open: {srv.last_error}")


def f5(run: Run, scale: int) -> list[Row]:
    rows = []
    for count in (1, 20 * scale):
        with run.server(f"f5-{count}") as srv:
            device = Device("source")
            clients: list[subprocess.Popen] = []
            try:
                _, alias = srv.initiator("dev", device.port)
                time.sleep(1)
                base = srv.rss()
                have_hwm = reset_hwm(srv.pid)
                for i in range(count):
                    clients.append(stalled_reader(srv, alias, f"reader{i}"))
                time.sleep(5)
                mid = srv.rss()
                time.sleep(5)
                rss, hwm = srv.rss(), srv.hwm()
                alive = sum(1 for c in clients if c.poll() is None)
                sent = device.sent
            finally:
                device.stop()
        growth = rss - base
        peak = f", peak {mib(hwm - base)}" if have_hwm else ""
        measured = (
            f"RSS {mib(growth)} total{peak}, {mib(growth / count)} per circuit, 10 s after"
            f" all circuits were up; at 5 s {mib(mid - base)} (plateau: {mib(rss - mid)} in the"
            f" last 5 s); device wrote {sent / 1048576:.0f} MiB; {alive}/{count} clients alive"
        )
        figure = f"{count} stalled circuit(s), fast sender, reader never reads, 10 s"
        rows.append(("F5", figure, "≤ 2.5–5 MiB each, plateau", measured))
    return rows


def one_circuit(port: int) -> float:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise OSError("no echo")
    return time.monotonic() - start


def f6(run: Run, scale: int) -> list[Row]:
    cycles = 2000 * scale
    with run.server("f6") as srv:
        device = Device("echo")
        try:
            _, alias = srv.initiator("dev", device.port)
            lport = free_port()
            forward = f"{lport}:{alias}:9000"
            cmd = [*srv.ssh(), "-N", "-o", "ExitOnForwardFailure=yes", "-L", forward]
            srv.spawn([*cmd, "client@127.0.0.1"])
            deadline = time.monotonic() + 20
            while True:
                try:
                    one_circuit(lport)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            failures = 0
            for _ in range(200):
                try:
                    one_circuit(lport)
                except OSError:
                    failures += 1
            time.sleep(1)
            rss0, fd0, row0 = srv.rss(), srv.fds(), srv.listed(alias)
            times = []
            deadline = time.monotonic() + 180
            for _ in range(cycles):
                if time.monotonic() > deadline:
                    break
                try:
                    times.append(one_circuit(lport))
                except OSError:
                    failures += 1
            time.sleep(2)
            rss1, fd1, row1 = srv.rss(), srv.fds(), srv.listed(alias)
        finally:
            device.stop()
    measured = (
        f"{len(times)} circuits after a 200 warm-up ({failures} failed): RSS"
        f" {rss0 / 1024:.1f} → {rss1 / 1024:.1f} MiB ({mib(rss1 - rss0)}), fds {fd0} → {fd1},"
        f" registry row {'unchanged' if row0 == row1 else f'{row0!r} → {row1!r}'};"
        f" circuit (connect, 1-byte echo, close) p50 {percentile(times, 50) * 1000:.1f} ms,"
        f" p99 {percentile(times, 99) * 1000:.1f} ms"
    )
    figure = f"drift after {cycles} sequential circuits through one ssh -L"
    return [("F6", figure, "< 5 MiB; fd and registry back to baseline", measured)]


async def _f7_client(port: int, key: Path, alias: str, device_port: int) -> tuple[str, str]:
    import asyncssh

    def options(user: str) -> asyncssh.SSHClientConnectionOptions:
        return asyncssh.SSHClientConnectionOptions(
            username=user,
            client_keys=[asyncssh.read_private_key(str(key))],
            known_hosts=None,
            agent_path=None,
            config=[],
            connect_timeout=20,
        )

    max_channels, max_forwards = 1024, 64
    channels, refusal = 0, "none"
    deadline = time.monotonic() + 120
    async with asyncssh.connect("127.0.0.1", port, options=options("chan")) as conn:
        writers = []
        while channels < max_channels + 200 and time.monotonic() < deadline:
            try:
                _, writer = await asyncio.wait_for(conn.open_connection(alias, 9000), 20)
            except asyncssh.ChannelOpenError as exc:
                refusal = exc.reason
                break
            writers.append(writer)
            channels += 1
        conn.close()
    forwards, freason = 0, "none"
    async with asyncssh.connect("127.0.0.1", port, options=options("fwd")) as conn:
        for offset in range(max_forwards + 50):
            try:
                await asyncio.wait_for(
                    conn.forward_remote_port("", 10000 + offset, "127.0.0.1", device_port), 20
                )
            except asyncssh.ChannelListenError as exc:
                freason = str(exc)
                break
            forwards += 1
        conn.close()
    return (
        f"{channels} direct-tcpip channels accepted (max_channels = {max_channels}), then"
        f" refused: {refusal!r}",
        f"{forwards} remote forwards accepted (max_forwards = {max_forwards}), then refused:"
        f" {freason!r}",
    )


def f7(run: Run, scale: int) -> list[Row]:
    with run.server("f7") as srv:
        device = Device("hold")
        try:
            _, alias = srv.initiator("dev", device.port)
            chans, fwds = asyncio.run(_f7_client(srv.port, run.key, alias, device.port))
        finally:
            device.stop()
    figure = "channels / forwards accepted on one connection before refusal (asyncssh)"
    return [("F7", figure, "= configured caps (1024 / 64)", f"{chans}; {fwds}")]


def f8(run: Run, scale: int) -> list[Row]:
    measured = (
        "not measured here: covered in-process by tests/test_threats.py test_21"
        " (1 avatar / 1 logout)"
    )
    return [("F8", "avatars vs logouts under pipelined auth", "1 / 1", measured)]


def f10(run: Run, scale: int) -> list[Row]:
    rows = []
    variants = [
        ("kill -9 (FIN)", "", signal.SIGKILL),
        ("SIGSTOP (blackhole), keepalive 1 s × 2", "client_alive_interval = 1\n"
         "client_alive_count_max = 2", signal.SIGSTOP),
    ]  # fmt: skip
    for label, extra, sig in variants:
        with run.server(f"f10-{sig}", extra) as srv:
            device = Device("echo")
            try:
                init, alias = srv.initiator("dev", device.port)
                cmd = [*srv.ssh(), "-W", f"{alias}:9000", "reader@127.0.0.1"]
                pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
                client = srv.spawn(cmd, **pipes)
                assert client.stdin is not None and client.stdout is not None
                client.stdin.write(b"x")
                client.stdin.flush()
                echoed = client.stdout.read(1) == b"x"
                killed = time.monotonic()
                os.kill(init.pid, sig)
                exited = gone = math.nan
                while time.monotonic() - killed < 30:
                    if math.isnan(exited) and client.poll() is not None:
                        exited = time.monotonic() - killed
                    if math.isnan(gone) and srv.listed(alias) is None:
                        gone = time.monotonic() - killed
                    if not math.isnan(exited) and not math.isnan(gone):
                        break
                    time.sleep(0.02)
                run.stop(init, signal.SIGKILL)
                run.stop(client)
            finally:
                device.stop()
        measured = (
            f"circuit open (echo {'ok' if echoed else 'FAILED'}); client ssh -W exited"
            f" {exited:.2f} s after the signal; registry dropped the initiator within"
            f" {gone:.2f} s (polled with `ssh listeners`, ~0.1 s per poll)"
        )
        target = "< 1 s" if sig == signal.SIGKILL else "≤ keepalive × count (2 s)"
        rows.append(("F10", f"initiator death, {label}", target, measured))
    return rows


def f12(run: Run, scale: int) -> list[Row]:
    seconds, concurrency = 10, 8
    with run.server("f12") as srv:
        device = Device("hold")
        try:
            cmd = [
                sys.executable, str(ROOT / "bench" / "sshload.py"), "handshakes",
                "--port", str(srv.port), "--user", "hs", "--key", str(run.key),
                "--device-port", str(device.port), "--seconds", str(seconds),
                "--concurrency", str(concurrency),
            ]  # fmt: skip
            cpu0 = cpu_seconds(srv.pid)
            load = run.spawn(cmd, stdout=subprocess.PIPE, text=True)
            time.sleep(1)
            logins = []
            deadline = time.monotonic() + seconds + 60
            while load.poll() is None and time.monotonic() < deadline:
                logins.append(srv.command("legit", "whoami"))
                time.sleep(0.2)
            out, _ = load.communicate(timeout=60)
            cpu = cpu_seconds(srv.pid) - cpu0
            run.procs.remove(load)
        finally:
            device.stop()
    result = json.loads(out.strip().splitlines()[-1])
    rate = result["done"] / result["seconds"]
    times = [s for ok, s, _ in logins if ok]
    measured = (
        f"{rate:.0f} handshakes/s ({result['done']} done, {result['errors']} errors in"
        f" {result['seconds']:.1f} s; server CPU {cpu / max(1, result['done']) * 1000:.1f} ms"
        f" each); legit `ssh whoami` {len(times)}/{len(logins)} ok, p50"
        f" {percentile(times, 50):.2f} s, p95 {percentile(times, 95):.2f} s"
    )
    figure = (
        f"handshakes (kex+auth+one -R+close), asyncssh {concurrency} concurrent,"
        f" {seconds} s; legit login meanwhile"
    )
    return [("F12", figure, "report; legit p95 < 1 s", measured)]


def _garbage_round(srv: Server, payloads: list[bytes]) -> str:
    """One connection per payload, 10 at a time; each waits ≤ 2 s for the server's close."""
    size0 = srv.log.stat().st_size
    held = 0
    lock = threading.Lock()

    def one(payload: bytes) -> None:
        nonlocal held
        raw = Raw(srv.port)
        raw.send(payload)
        if raw.wait_closed(2) is None:
            with lock:
                held += 1
        raw.close()

    for first in range(0, len(payloads), 10):
        threads = [threading.Thread(target=one, args=(p,)) for p in payloads[first : first + 10]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    time.sleep(1)
    with open(srv.log, "rb") as handle:
        handle.seek(size0)
        added = handle.read()
    count = len(payloads)
    tracebacks = added.count(b"Traceback")
    lines = added.count(b"\n")
    errors = sorted(set(re.findall(rb"builtins\.(\w+Error): ([^\n]{0,80})", added)))
    detail = "; ".join(f"{e.decode()}: {m.decode(errors='replace')}" for e, m in errors)
    return (
        f"{len(added) / count:.0f} B/connection ({lines / count:.1f} lines),"
        f" {tracebacks} tracebacks{f' ({detail})' if detail else ''};"
        f" {count - held}/{count} closed by the server within 2 s"
    )


def f13(run: Run, scale: int) -> list[Row]:
    count = 200
    target = "< 300 B, no tracebacks"
    http = [b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"] * count
    # Every message number 1-49 (and a few after) as the first packet, 40 junk bytes each.
    kinds = [*range(1, 50), 50, 60, 80, 90, 94, 98, 100, 192, 255]
    junk = bytes(range(40))
    packets = [BANNER + ssh_packet(bytes([kinds[i % len(kinds)]]) + junk) for i in range(count)]
    with run.server("f13") as srv:
        http_row = _garbage_round(srv, http)
        packet_row = _garbage_round(srv, packets)
    figure = "log bytes per malformed connection"
    return [
        ("F13", f"{figure}: {count} × HTTP request", target, http_row),
        ("F13", f"{figure}: {count} × version line + one packet of type 1-49, 50-255 (junk"
         " body), before KEXINIT", target, packet_row),
    ]  # fmt: skip


async def _f16_client(port: int, key: Path, targets: list[tuple[str, int]]) -> tuple[int, int]:
    import asyncssh

    options = asyncssh.SSHClientConnectionOptions(
        username="ssrf",
        client_keys=[asyncssh.read_private_key(str(key))],
        known_hosts=None,
        agent_path=None,
        config=[],
        connect_timeout=20,
    )
    opened = refused = 0
    async with asyncssh.connect("127.0.0.1", port, options=options) as conn:
        for host, dport in targets:
            for _ in range(20):
                try:
                    _, writer = await asyncio.wait_for(conn.open_connection(host, dport), 20)
                    opened += 1
                    writer.close()
                except asyncssh.ChannelOpenError:
                    refused += 1
        conn.close()
    return opened, refused


def f16(run: Run, scale: int) -> list[Row]:
    figure = "outbound connect() during 80 direct-tcpip attempts (20 per target)"
    if shutil.which("strace") is None:
        return [("F16", figure, "0", "not measured: strace not installed")]
    canary = Device("hold")
    targets = [("127.0.0.1", canary.port), ("localhost", 22), ("169.254.169.254", 80)]
    targets.append(("::1", 22))
    trace = run.tmp / "f16.strace"
    try:
        with run.server("f16", strace=trace) as srv:
            time.sleep(0.5)
            before = trace.read_text().count(" connect(")
            opened, refused = asyncio.run(_f16_client(srv.port, run.key, targets))
            time.sleep(0.5)
        traced = trace.read_text().splitlines()
        lines = [line for line in traced if " connect(" in line]
        accepts = sum(1 for line in traced if " accept" in line and "= -1" not in line)
    finally:
        canary.stop()
    patterns = [f"htons({canary.port})", "htons(22)", "169.254.169.254", '"::1"']
    to_targets = sum(1 for line in lines if any(p in line for p in patterns))
    dns = sum(1 for line in lines if "htons(53)" in line or "AF_UNIX" in line)
    measured = (
        f"{to_targets} connect() to the targets ({len(lines)} connect() calls in the whole"
        f" trace, {before} before the attempts; {dns} DNS/AF_UNIX); channels opened {opened},"
        f" refused {refused}; canary accepted {canary.accepted}; strace saw {accepts} accept()"
        " calls (it is tracing)"
    )
    return [("F16", figure, "0", measured)]


FIGURES: dict[str, Callable[[Run, int], list[Row]]] = {
    "F1": f1,
    "F2": f2,
    "F3": f3,
    "F4": f4,
    "F5": f5,
    "F6": f6,
    "F7": f7,
    "F8": f8,
    "F10": f10,
    "F12": f12,
    "F13": f13,
    "F16": f16,
}


def describe(tree: Path, commit: str | None) -> list[str]:
    def out(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (done.stdout + done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"

    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if commit:
        rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", commit]) + " (git archive)"
    else:
        rev = out(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    versions = [
        f"Python {platform.python_version()}",
        out([sys.executable, "-c", "import twisted; print('Twisted', twisted.__version__)"]),
        out(["ssh", "-V"]),
        out([sys.executable, "-c", "import asyncssh; print('asyncssh', asyncssh.__version__)"]),
        f"nuttconch {rev}",
    ]
    return [
        f"- machine: {os.cpu_count()} cores, {cpu}, Linux {platform.release()}",
        f"- versions: {', '.join(versions)}",
        f"- server tree: {tree}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=1, help="multiplies F1, F5, F6 counts")
    parser.add_argument("--only", default="", help="comma-separated figures, e.g. F1,F4")
    parser.add_argument("--commit", default=None, help="run the server from git archive REV")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    wanted = [f.strip().upper() for f in args.only.split(",") if f.strip()] or list(FIGURES)
    unknown = [f for f in wanted if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figures {unknown}; known: {','.join(FIGURES)}")
    if args.scale < 1:
        parser.error("--scale must be at least 1")
    tree = ROOT
    snapshot = None
    if args.commit:
        snapshot = Path(tempfile.mkdtemp(prefix="nuttconch-tree-"))
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.commit], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive.stdout, check=True)
        tree = snapshot
    header = describe(tree, args.commit)
    load_before = os.getloadavg()
    started = time.monotonic()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: list[Row] = []
    run = Run(tree)
    try:
        for name in wanted:
            t0 = time.monotonic()
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                new = FIGURES[name](run, args.scale)
            except Exception as exc:  # one figure's failure must not lose the others
                new = [(name, "(failed)", "", f"ERROR {type(exc).__name__}: {exc}")]
            for row in new:
                print(f"  {row[0]} {row[1]}: {row[3]}", file=sys.stderr, flush=True)
            print(f"  ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
            rows.extend(new)
    finally:
        run.cleanup(args.keep)
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
    load_after = os.getloadavg()
    command = " ".join([Path(sys.executable).as_posix(), "bench/threat_figures.py", *sys.argv[1:]])
    print(f"- date: {stamp} (run took {(time.monotonic() - started) / 60:.1f} min)")
    print(f"- command: `{command}`")
    print("\n".join(header))
    print(
        f"- load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}"
        " (other sessions share these cores)"
    )
    print()
    print("| F# | figure | target | measured |")
    print("|---|---|---|---|")
    for fig, figure, target, measured in rows:
        print(f"| {fig} | {figure} | {target} | {measured.replace('|', '/')} |")


if __name__ == "__main__":
    main()
