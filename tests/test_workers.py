"""``nuttconch --workers N`` (issue 11.5): N processes share the SSH port, supervised.

Run from outside as an operator runs it: the supervisor is a child process,
its workers are found through /proc, every process is stopped in cleanup by
its own pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.harness import host_key_dir, make_key
from tests.test_twistd import ROOT, _Child, free_port


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def sockets_of(pid: int) -> int:
    """How many sockets the process holds (its listener and connections)."""
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    count += 1
            except OSError:
                pass
    except OSError:
        pass
    return count


class WorkersTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        keys = os.path.join(self.dir, "keys")
        shutil.copytree(host_key_dir(), keys)
        self.port = free_port()
        self.ini = os.path.join(self.dir, "nuttssh.ini")
        with open(self.ini, "w") as handle:
            handle.write(
                f"[server]\nlisten_host = 127.0.0.1\nlisten_port = {self.port}\n"
                f"per_source_penalty_exempt_list = 127.0.0.1\n[keys]\nhost_key_dir = {keys}\n"
            )
        self.keypath, public = make_key(self.dir, "dev")
        with open(os.path.join(keys, "authorized_keys"), "a") as handle:
            handle.write(f'access="initiate" {public} dev\n')

    def spawn(self, workers: int) -> _Child:
        child = _Child()
        argv = [sys.executable, "-m", "nuttconch", "--workers", str(workers), "--config", self.ini]
        env = {**os.environ, "PYTHONPATH": ROOT}
        reactor.spawnProcess(child, sys.executable, argv, env=env, path=self.dir)
        self.addCleanup(self.reap, child)
        return child

    @defer.inlineCallbacks
    def reap(self, child: _Child) -> Any:
        pid = child.transport.pid
        workers = children_of(pid) if pid else []
        if child.running:
            child.transport.signalProcess("TERM")
            yield self.until(lambda: not child.running, 15, "supervisor to stop")
        for worker in workers:
            try:
                os.kill(worker, signal.SIGKILL)
            except OSError:
                pass

    def until(self, predicate: Any, timeout: float, what: str) -> defer.Deferred[Any]:
        deadline = time.monotonic() + timeout

        @defer.inlineCallbacks
        def poll() -> Any:
            while True:
                value = predicate()
                if value:
                    return value
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                yield task.deferLater(reactor, 0.1, lambda: None)

        return poll()

    @defer.inlineCallbacks
    def test_two_workers_both_accept(self) -> Any:
        """Both workers listen on the one port and the kernel gives each a share of 64
        connections; a real ssh login works through the shared port."""
        child = self.spawn(2)
        yield self.until(
            lambda: child.output.count("nuttconch listening on") >= 2, 60, "two workers listening"
        )
        self.assertIn("as worker 1", child.output)
        self.assertIn("as worker 2", child.output)
        workers = children_of(child.transport.pid)
        self.assertEqual(len(workers), 2, child.output)
        before = {pid: sockets_of(pid) for pid in workers}

        def connect() -> list[socket.socket]:
            socks = []
            for _ in range(64):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(b"SSH-2.0-probe\r\n")
                socks.append(sock)
            return socks

        socks = yield threads.deferToThread(connect)
        try:
            yield self.until(
                lambda: sum(sockets_of(p) - before[p] for p in workers) >= 64, 10, "64 accepted"
            )
            gained = {pid: sockets_of(pid) - before[pid] for pid in workers}
        finally:
            for sock in socks:
                sock.close()
        self.assertTrue(all(n > 0 for n in gained.values()), f"accepted per worker: {gained}")
        from twisted.internet.utils import getProcessOutputAndValue

        out, err, code = yield getProcessOutputAndValue(
            "ssh",
            [
                "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
                "-i", self.keypath, "-p", str(self.port), "-T", "dev@127.0.0.1", "whoami",
            ],
            env={"PATH": os.environ.get("PATH", "")},
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn(b"dev", out)

    @defer.inlineCallbacks
    def test_dead_worker_restarted_and_stop_forwarded(self) -> Any:
        """A worker killed with SIGKILL is started again; SIGTERM to the supervisor stops
        every worker and the supervisor exits 0."""
        child = self.spawn(2)
        yield self.until(
            lambda: child.output.count("nuttconch listening on") >= 2, 60, "two workers listening"
        )
        workers = children_of(child.transport.pid)
        os.kill(workers[0], signal.SIGKILL)
        yield self.until(
            lambda: child.output.count("nuttconch listening on") >= 3, 60, "worker restarted"
        )
        self.assertIn("exited with status -9", child.output)
        now = children_of(child.transport.pid)
        self.assertEqual(len(now), 2)
        self.assertNotIn(workers[0], now)
        child.transport.signalProcess("TERM")
        code = yield child.ended
        self.assertEqual(code, 0, child.output)
        for pid in now:
            self.assertFalse(os.path.exists(f"/proc/{pid}/status") and _alive(pid), pid)

    def test_bad_workers_value(self) -> None:
        """--workers with a bad value is one line, no traceback."""
        from nuttconch.__main__ import split_workers

        rows = [
            (["--workers", "2", "-c", "x"], (2, ["-c", "x"])),
            (["--workers=3"], (3, [])),
            (["-c", "x"], (None, ["-c", "x"])),
        ]
        for args, expected in rows:
            self.assertEqual(split_workers(args), expected)
        for bad in (["--workers"], ["--workers", "0"], ["--workers=x"], ["--workers", "999"]):
            with self.assertRaises(ValueError) as caught:
                split_workers(bad)
            self.assertIn("--workers expects a number from 1 to 256", str(caught.exception))


def _alive(pid: int) -> bool:
    """Not a zombie nor gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return "zombie" not in handle.read()
    except OSError:
        return False


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def _readme_blocks(heading: str) -> list[str]:
    """The command blocks of one README section (from ``heading`` to the next heading)."""
    text = _read("README.md")
    start = text.index(heading)
    end = min(
        i
        for i in (text.find("\n## ", start + 1), text.find("\n### ", start + 1), len(text))
        if i > 0
    )
    return text[start:end].split("```")[1::2]


class DeployInStepTests(unittest.TestCase):
    """The README's Cluster section, the compose file and the systemd template agree."""

    def test_compose_cluster(self) -> None:
        """The README's command names the compose file; the file runs Redis and two nodes
        with --workers, each mounting the cluster ini, which loads with reuse_port on."""
        from nuttconch import config as configmod

        blocks = _readme_blocks("### docker compose: Redis and two nodes")
        self.assertIn("docker compose -f deploy/compose.cluster.yml up -d --build", blocks[0])
        compose = _read("deploy/compose.cluster.yml")
        self.assertIn("docker compose -f deploy/compose.cluster.yml up -d --build", compose)
        for service in ("  redis:", "  node1:", "  node2:"):
            self.assertIn(service, compose)
        self.assertEqual(compose.count('command: ["nuttconch", "--workers", "2"]'), 2)
        self.assertEqual(compose.count("./nuttssh.cluster.ini:/etc/nuttconch/nuttssh.ini:ro"), 2)
        self.assertEqual(compose.count("keys:/var/lib/nuttconch/keys"), 2)
        cfg = configmod.load(os.path.join(ROOT, "deploy", "nuttssh.cluster.ini"))
        self.assertTrue(cfg.reuse_port)
        self.assertEqual(cfg.host_key_dir, "/var/lib/nuttconch/keys")

    def test_systemd_template(self) -> None:
        """The README's commands install and enable the template unit its comment names;
        instances share the port, prepare keys once under a lock, and are sandboxed as
        the single unit is."""
        blocks = _readme_blocks("### Several processes on one machine")
        self.assertIn("nuttconch --workers 2", blocks[0])
        unit = _read("deploy/nuttconch@.service")
        for command in (
            "install -m 0644 deploy/nuttconch@.service /etc/systemd/system/",
            "systemctl daemon-reload && systemctl enable --now nuttconch@1 nuttconch@2",
        ):
            self.assertIn(command, blocks[1])
            self.assertIn(command, unit)
        self.assertIn("--reuse-port --worker %i", unit)
        self.assertIn("ExecStartPre=/usr/bin/flock", unit)
        self.assertIn("nuttconch --prepare", unit)
        single = _read("deploy/nuttconch.service")
        sandbox = [
            line
            for line in single.splitlines()
            if line.startswith(("Protect", "Private", "Restrict", "NoNewPrivileges", "System"))
        ]
        self.assertGreater(len(sandbox), 10)
        for line in sandbox:
            self.assertIn(line + "\n", unit)

    def test_prepare_creates_keys_once(self) -> None:
        """``nuttconch --prepare`` makes host keys, secret and authorized_keys, then exits."""
        import subprocess

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        ini = os.path.join(work, "nuttssh.ini")
        with open(ini, "w") as handle:
            handle.write(f"[keys]\nhost_key_dir = {work}/keys\nhost_key_rsa =\n")
        done = subprocess.run(
            [sys.executable, "-m", "nuttconch", "--prepare", "--config", ini],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        made = sorted(os.listdir(os.path.join(work, "keys")))
        self.assertIn("authorized_keys", made)
        self.assertIn("ssh_host_ed25519_key", made)
