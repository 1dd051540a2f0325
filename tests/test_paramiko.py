"""paramiko as the client (issue 12 point 7): what Fabric, Ansible and Netmiko run on.

paramiko's ``exec_command`` waits for the reply to its exec request and
fails with "Channel closed" if the channel's close arrives first; OpenSSH
tolerates either order, so only a client that waits shows the bug.  Every
paramiko call blocks, so each one runs in a thread while the server runs
in the trial reactor.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from .harness import SwitchboardTestMixin, listen_echo, missing

try:
    import paramiko
except ImportError:  # pragma: no cover - paramiko is in the test extra
    paramiko = None


def _exec(transport: Any, command: str) -> tuple[bytes, bytes, int]:
    """One exec on a new session channel, as ``SSHClient.exec_command`` does it."""
    chan = transport.open_session(timeout=10)
    chan.settimeout(10)
    chan.exec_command(command)
    out = chan.makefile("rb").read()
    err = chan.makefile_stderr("rb").read()
    code = chan.recv_exit_status()
    chan.close()
    return out, err, code


class ParamikoTests(SwitchboardTestMixin, unittest.TestCase):
    """Issue 12 point 7."""

    def setUp(self) -> Any:
        if paramiko is None:
            missing("paramiko", "pip install '.[test]'")
        return super().setUp()

    def connect(self, keyPath: str, user: str) -> defer.Deferred[Any]:
        def run() -> Any:
            pkey = paramiko.Ed25519Key.from_private_key_file(keyPath)
            t = paramiko.Transport(("127.0.0.1", self.port))
            t.connect(username=user, pkey=pkey)
            return t

        d = threads.deferToThread(run)

        def opened(t: Any) -> Any:
            self.addCleanup(lambda: threads.deferToThread(t.close))
            return t

        return d.addCallback(opened)

    @defer.inlineCallbacks
    def test_exec_commands(self) -> Any:
        """whoami, listeners --json and stats give paramiko their output and exit status."""
        keyPath = self.key("scripter", options='access="list",access="listen"')
        t = yield self.connect(keyPath, "scripter")
        out, err, code = yield threads.deferToThread(_exec, t, "whoami")
        self.assertEqual((err, code), (b"", 0))
        self.assertIn(b"scripter", out)
        out, err, code = yield threads.deferToThread(_exec, t, "listeners --json")
        self.assertEqual((err, code), (b"", 0))
        self.assertIsInstance(json.loads(out), (list, dict))
        out, err, code = yield threads.deferToThread(_exec, t, "stats")
        self.assertEqual((err, code), (b"", 0))
        self.assertTrue(out)

    @defer.inlineCallbacks
    def test_exec_refused_command(self) -> Any:
        """A command the key may not run still answers: the refusal on stderr, status 1."""
        keyPath = self.key("plain", options='access="listen"')
        t = yield self.connect(keyPath, "plain")
        out, err, code = yield threads.deferToThread(_exec, t, "listeners --json")
        self.assertEqual(code, 1)
        self.assertIn(b"Permission denied", err)

    @defer.inlineCallbacks
    def test_many_execs_on_one_connection(self) -> Any:
        """Fifty execs in a row on one connection all succeed (no race with the close)."""
        keyPath = self.key("loop", options='access="list",access="listen"')
        t = yield self.connect(keyPath, "loop")

        def many() -> list[int]:
            return [_exec(t, "whoami")[2] for _ in range(50)]

        codes = yield threads.deferToThread(many)
        self.assertEqual(codes, [0] * 50)

    @defer.inlineCallbacks
    def test_remote_forward_and_direct_tcpip(self) -> Any:
        """A paramiko initiator (request_port_forward) is reached by a paramiko client's
        direct-tcpip channel, and bytes go both ways."""
        echo = listen_echo(self, b"echo:")
        initKey = self.key("pinit", options='access="initiate"')
        clientKey = self.key("pcli", options='access="listen"')
        ti = yield self.connect(initKey, "pinit")

        def handler(chan: Any, origin: Any, server: Any) -> None:
            # Splice the forwarded channel to the local echo service in a thread.
            import threading

            def pump() -> None:
                sock = socket.create_connection(("127.0.0.1", echo), timeout=10)
                chan.settimeout(10)
                try:
                    data = chan.recv(1024)
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    while True:
                        back = sock.recv(1024)
                        if not back:
                            break
                        chan.sendall(back)
                finally:
                    sock.close()
                    chan.close()

            threading.Thread(target=pump, daemon=True).start()

        port = yield threads.deferToThread(ti.request_port_forward, "", 7400, handler)
        self.assertEqual(port, 7400)
        listener = yield self.waitPort(7400)
        tc = yield self.connect(clientKey, "pcli")

        def talk() -> bytes:
            chan = tc.open_channel(
                "direct-tcpip", (listener.connect_name, 7400), ("127.0.0.1", 0), timeout=10
            )
            chan.settimeout(10)
            chan.sendall(b"hello")
            got = b""
            while True:
                data = chan.recv(1024)
                if not data:
                    break
                got += data
            chan.close()
            return got

        got = yield threads.deferToThread(talk)
        self.assertEqual(got, b"echo:hello")
