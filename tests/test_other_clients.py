"""Dropbear's dbclient and PuTTY's plink as initiators and clients (SPEC: Clients)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess

from twisted.conch.ssh.keys import Key
from twisted.internet import defer
from twisted.trial import unittest

from .harness import SSHProcess, SwitchboardTestMixin, _timeout, listen_echo, missing

DBCLIENT = shutil.which("dbclient")
PLINK = shutil.which("plink")


def _need(tool: str | None, package: str) -> str:
    if tool is None:
        missing(package, f"apt-get install {package}")
    return tool


class OtherClientsMixin(SwitchboardTestMixin):
    def hostFingerprint(self) -> str:
        """The server's Ed25519 host key as plink's -hostkey wants it."""
        key = Key.fromFile(os.path.join(self.keydir, "ssh_host_ed25519_key"))
        digest = hashlib.sha256(key.public().blob()).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def runTool(
        self, argv: list[str], stdin: bytes | None = b"", env: dict[str, str] | None = None
    ) -> SSHProcess:
        from twisted.internet import reactor

        proc = SSHProcess(stdin)
        environment = {"PATH": os.environ.get("PATH", ""), "HOME": self.dir}
        environment.update(env or {})
        reactor.spawnProcess(proc, argv[0], argv, env=environment)
        self.processes.append(proc)
        return proc

    def dropbearKey(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        subprocess.run(
            ["dropbearkey", "-t", "ed25519", "-f", path], check=True, capture_output=True
        )
        return path

    def puttyKey(self, name: str) -> str:
        path = os.path.join(self.dir, name + ".ppk")
        subprocess.run(
            [
                "puttygen",
                "-q",
                "-t",
                "ed25519",
                "-O",
                "private",
                "-o",
                path,
                "--new-passphrase",
                "/dev/null",
            ],
            check=True,
            capture_output=True,
        )
        return path

    def dbclient(self, key: str, user: str, *args: str) -> list[str]:
        return [
            _need(DBCLIENT, "dropbear-bin"),
            "-y",
            "-i",
            key,
            "-p",
            str(self.port),
            *args,
            f"{user}@127.0.0.1",
        ]

    def plink(self, key: str, user: str, *args: str) -> list[str]:
        return [
            _need(PLINK, "putty-tools"),
            "-batch",
            "-ssh",
            "-hostkey",
            self.hostFingerprint(),
            "-P",
            str(self.port),
            "-i",
            key,
            "-l",
            user,
            *args,
            "127.0.0.1",
        ]


class DropbearTests(OtherClientsMixin, unittest.TestCase):
    """dbclient, as found on embedded gateways."""

    @defer.inlineCallbacks
    def test_dbclient_initiator_and_stdio_client(self) -> defer.Generator:
        """dbclient -R registers a virtual port, and dbclient -B reaches it with bytes intact."""
        target = listen_echo(self)
        self.runTool(
            self.dbclient(self.dropbearKey("gw"), "gw1", "-N", "-R", f"7000:127.0.0.1:{target}"),
            stdin=None,
        )
        listener = yield self.waitPort(7000)
        payload = os.urandom(200_000)
        client = self.runTool(
            self.dbclient(self.dropbearKey("cl"), "cl", "-B", f"{listener.connect_name}:7000"),
            stdin=None,
        )
        client.transport.write(payload)
        yield self.waitFor(
            lambda: len(client.out) >= len(payload), 20, "the echo through dbclient -B"
        )
        self.assertEqual(bytes(client.out[: len(payload)]), payload)


class PlinkTests(OtherClientsMixin, unittest.TestCase):
    """plink, as Windows users run it."""

    @defer.inlineCallbacks
    def test_plink_initiator_and_nc_client(self) -> defer.Generator:
        """plink -R registers a virtual port, and plink -nc reaches it with bytes intact."""
        target = listen_echo(self)
        self.runTool(
            self.plink(self.puttyKey("gw"), "gw2", "-N", "-R", f"7001:127.0.0.1:{target}"),
            stdin=None,
        )
        listener = yield self.waitPort(7001)
        payload = os.urandom(200_000)
        argv = self.plink(self.puttyKey("cl"), "cl2", "-nc", f"{listener.connect_name}:7001")
        out, err, code = yield _timeout(self.runTool(argv, stdin=payload).ended, 30, "plink -nc")
        self.assertEqual(out, payload, err)
