"""End-to-end user flows: -L, -J, -D, shared aliases, forwards, half-close, shell.

Every test drives the real OpenSSH client (and, for -J, a real sshd and for
-D, curl) against an in-process server and asserts only what a user sees:
bytes through the circuit, exit codes and printed text.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.procutils import which
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from .harness import SSH, SSHProcess, SwitchboardTestMixin, listen_echo, missing

SSHD = "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None
CURL = (which("curl") or [None])[0]
SSH_KEYGEN = (which("ssh-keygen") or [None])[0]
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def require(tool: str | None, what: str) -> str:
    """A tool a test needs; missing in CI is a failure, elsewhere a skip."""
    if tool is None:
        missing(what, "see the README's first paragraph; .ci/run installs it")
    return tool


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_listening(port: int) -> bool:
    """Whether something listens on ``port``, without connecting to it."""
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    if found_table:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def tcp_exchange(port: int, payload: bytes, timeout: float = 15) -> bytes:
    """Blocking: connect, send ``payload``, half-close, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def within(d: defer.Deferred[Any], seconds: float, what: str) -> defer.Deferred[Any]:
    """A new Deferred with ``d``'s result, or a failure after ``seconds``."""
    out: defer.Deferred[Any] = defer.Deferred()

    def expired() -> None:
        if not out.called:
            out.errback(AssertionError(f"timed out after {seconds}s waiting for {what}"))

    call = reactor.callLater(seconds, expired)

    def fire(result: Any) -> Any:
        if call.active():
            call.cancel()
        if not out.called:
            out.callback(result)
        return result

    d.addBoth(fire)
    return out


@implementer(IHalfCloseableProtocol)
class AnswerAfterEOF(protocol.Protocol):
    """A device that answers only once the client has finished sending."""

    def connectionMade(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.write(b"bye after " + self.received)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Page(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from the device " + request.getHeader(b"host") + b"\n"


class FlowTestBase(SwitchboardTestMixin, unittest.TestCase):
    """Shared helpers for flows that need more than one initiator or local port."""

    def listenDevice(self, factory: protocol.Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def startInitiator(self, key: str, user: str, *forwards: str, count: int = 1) -> Any:
        """``ssh -N -R`` and wait until ``count`` listeners (this one included) are up."""
        args: list[str] = ["-N"]
        for fwd in forwards:
            args += ["-R", fwd]
        proc = self.spawn(key, user, *args, stdin=None)
        what = f"{count} listener(s) holding {len(forwards)} port(s)"

        def ready() -> Any:
            listeners = self.registry.listeners()
            if len(listeners) >= count and len(listeners[0].ports) == len(forwards):
                return listeners[0]
            if proc.code is not None:
                raise AssertionError(f"initiator exited {proc.code}: {bytes(proc.err)!r}")
            return None

        listener = yield self.waitFor(ready, 10, what)
        return proc, listener

    @defer.inlineCallbacks
    def localForward(self, key: str, user: str, flag: str, spec: Any) -> Any:
        """Start ``ssh -N <flag> spec(port)`` on a free local port; retry once if taken."""
        err = b""
        for _ in range(2):
            lport = free_port()
            proc = self.spawn(key, user, "-N", flag, spec(lport), stdin=None)
            yield self.waitFor(
                lambda proc=proc, lport=lport: proc.code is not None or is_listening(lport),
                10,
                f"ssh {flag} to listen on {lport}",
            )
            if proc.code is None:
                return proc, lport
            err = bytes(proc.err)
        raise AssertionError(f"ssh {flag} could not listen twice: {err!r}")

    def gone(self, name: str) -> Any:
        return self.waitFor(
            lambda: all(name not in entry.aliases for entry in self.registry.listeners()),
            5,
            f"{name} to leave the registry",
        )


class CircuitFlowTests(FlowTestBase):
    """Circuits made with -L, -D and -W, and how they end."""

    @defer.inlineCallbacks
    def test_local_forward_carries_bytes(self) -> defer.Generator:
        """ssh -N -L LOCAL:alias:PORT gives a local TCP port that reaches the device, intact."""
        target = listen_echo(self)
        _, listener = yield self.startInitiator(self.key("k1"), "user1", f"6379:localhost:{target}")
        name = listener.connect_name
        _, lport = yield self.localForward(
            self.key("k2"), "user2", "-L", lambda p: f"127.0.0.1:{p}:{name}:6379"
        )
        payload = os.urandom(256 * 1024)
        got = yield threads.deferToThread(tcp_exchange, lport, payload)
        self.assertEqual(len(got), len(payload))
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
        # A second connection through the same -L works as well.
        got = yield threads.deferToThread(tcp_exchange, lport, b"again")
        self.assertEqual(got, b"again")

    @defer.inlineCallbacks
    def test_dynamic_forward_with_curl(self) -> defer.Generator:
        """ssh -N -D plus curl --socks5-hostname fetches a page from the device by its alias."""
        curl = require(CURL, "curl")
        http = self.listenDevice(server.Site(Page()))
        _, listener = yield self.startInitiator(self.key("k1"), "web", f"8080:localhost:{http}")
        name = listener.connect_name
        _, lport = yield self.localForward(
            self.key("k2"), "user2", "-D", lambda p: f"127.0.0.1:{p}"
        )
        out, err, code = yield within(
            getProcessOutputAndValue(
                curl,
                [
                    "-sS",
                    "--max-time",
                    "10",
                    "--noproxy",
                    "",
                    "--socks5-hostname",
                    f"127.0.0.1:{lport}",
                    f"http://{name}:8080/",
                ],
                env=ENV,
            ),
            15,
            "curl",
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, f"hello from the device {name}:8080\n".encode())

    @defer.inlineCallbacks
    def test_half_close_lets_the_answer_through(self) -> defer.Generator:
        """The client's EOF reaches the device, and the device's answer sent after it arrives."""
        device = self.listenDevice(protocol.Factory.forProtocol(AnswerAfterEOF))
        _, listener = yield self.startInitiator(self.key("k1"), "dev", f"5000:localhost:{device}")
        out, err, code = yield self.ssh(
            self.key("k2"), "user2", "-W", f"{listener.connect_name}:5000", stdin=b"hello"
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"bye after hello")

    @defer.inlineCallbacks
    def test_initiator_death_ends_circuit_and_name(self) -> defer.Generator:
        """Killing the initiator ends a live -W circuit within seconds and drops its name."""
        target = listen_echo(self, tag=b"T:")
        init, listener = yield self.startInitiator(
            self.key("k1"), "dev", f"5000:localhost:{target}"
        )
        name = listener.connect_name
        client = self.spawn(self.key("k2"), "user2", "-W", f"{name}:5000", stdin=None)
        client.transport.write(b"ping")
        yield client.waitOutput(b"T:ping")
        init.transport.signalProcess("KILL")
        yield within(client.ended, 5, "the client ssh to exit after the initiator died")
        yield self.gone(name)
        self.assertEqual(self.registry.listeners(), [])
        out, err, code = yield self.ssh(self.key("k3"), "user3", "-W", f"{name}:5000", stdin=b"x")
        self.assertEqual(code, 255)
        self.assertIn(f"no such listener: {name}".encode(), err)

    @defer.inlineCallbacks
    def test_initiator_refusal_is_an_open_failure(self) -> defer.Generator:
        """When the initiator cannot reach its target, -W exits 255 with 'initiator refused'."""
        dead = free_port()
        _, listener = yield self.startInitiator(self.key("k1"), "dev", f"7002:localhost:{dead}")
        out, err, code = yield self.ssh(
            self.key("k2"), "user2", "-W", f"{listener.connect_name}:7002", stdin=b"x"
        )
        self.assertEqual(code, 255, err)
        self.assertEqual(out, b"")
        self.assertIn(b"open failed", err)
        self.assertIn(b"initiator refused", err)

    @defer.inlineCallbacks
    def test_32mib_each_way_at_once(self) -> defer.Generator:
        """32 MiB up and its 32 MiB echo down share one -W circuit, byte for byte."""
        target = listen_echo(self)
        _, listener = yield self.startInitiator(self.key("k1"), "bulk", f"9000:localhost:{target}")
        payload = os.urandom(32 * 1024 * 1024)
        out, err, code = yield self.ssh(
            self.key("k2"),
            "user2",
            "-W",
            f"{listener.connect_name}:9000",
            stdin=payload,
            timeout=45,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out), len(payload))
        self.assertEqual(hashlib.sha256(out).hexdigest(), hashlib.sha256(payload).hexdigest())


class JumpHostTests(FlowTestBase):
    """ssh -J through the switchboard to a real OpenSSH sshd behind an initiator."""

    @defer.inlineCallbacks
    def startSshd(self, userKeyPub: str) -> Any:
        sshd = require(SSHD, "openssh-server (/usr/sbin/sshd)")
        keygen = require(SSH_KEYGEN, "ssh-keygen")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        home = os.path.join(self.dir, "sshd")
        os.makedirs(home)
        hostkey = os.path.join(home, "ssh_host_ed25519_key")
        out, err, code = yield getProcessOutputAndValue(
            keygen, ["-q", "-t", "ed25519", "-N", "", "-f", hostkey], env=ENV
        )
        self.assertEqual(code, 0, err)
        authorized = os.path.join(home, "authorized_keys")
        shutil.copy(userKeyPub, authorized)
        last = b""
        for _ in range(2):
            port = free_port()
            cfg = os.path.join(home, "sshd_config")
            with open(cfg, "w") as handle:
                handle.write(
                    f"ListenAddress 127.0.0.1:{port}\n"
                    f"HostKey {hostkey}\n"
                    f"AuthorizedKeysFile {authorized}\n"
                    "PidFile none\nUsePAM no\nStrictModes no\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUseDNS no\n"
                )
            proc = self.spawn(None, "", stdin=None, argv=[sshd, "-D", "-e", "-f", cfg])
            try:
                yield proc.waitOutput(b"Server listening on", timeout=10)
            except AssertionError:
                last = bytes(proc.err)
                yield proc.kill()
                continue
            return port
        raise AssertionError(f"sshd did not start: {last!r}")

    @defer.inlineCallbacks
    def test_jump_to_sshd_behind_initiator(self) -> defer.Generator:
        """ssh -J switchboard root@alias runs a command on the sshd behind the initiator."""
        inner = self.key("inner")
        sshdPort = yield self.startSshd(inner + ".pub")
        _, listener = yield self.startInitiator(self.key("k1"), "box", f"22:localhost:{sshdPort}")
        name = listener.connect_name
        cfg = os.path.join(self.dir, "jump_config")
        with open(cfg, "w") as handle:
            handle.write(
                "Host switch\n"
                "    HostName 127.0.0.1\n"
                f"    Port {self.port}\n"
                "    User user2\n"
                f"    IdentityFile {self.key('k2')}\n"
                f"    UserKnownHostsFile {os.path.join(self.dir, 'known_hosts')}\n"
                "    HostKeyAlias nuttconch-test\n"
                "Host *\n"
                "    BatchMode yes\n"
                "    IdentitiesOnly yes\n"
                "    IdentityAgent none\n"
                "    StrictHostKeyChecking accept-new\n"
                f"    UserKnownHostsFile {os.path.join(self.dir, 'known_hosts_inner')}\n"
                "    ControlMaster no\n"
                "    ConnectTimeout 5\n"
            )
        argv = [SSH or "ssh", "-F", cfg, "-J", "switch", "-i", inner, "-l", "root", name]
        proc = self.spawn(None, "", argv=[*argv, "echo", "jumped"])
        out, err, code = yield within(proc.ended, 20, "ssh -J to finish")
        self.assertEqual((out, code), (b"jumped\n", 0), err)


class SharedAliasTests(FlowTestBase):
    """Several initiators holding one alias: name~N picks among them, newest first."""

    @defer.inlineCallbacks
    def test_shared_alias_indexes_and_failover(self) -> defer.Generator:
        """shared and shared~0 reach the newest, shared~1 the older, and the older takes over."""
        keyA = self.key("ka", options='access="initiate",alias="shared"')
        keyB = self.key("kb", options='access="initiate",alias="shared"')
        client = self.key("kc")
        procA, _ = yield self.startInitiator(
            keyA, "alpha", f"4000:localhost:{listen_echo(self, b'A:')}"
        )
        procB, newest = yield self.startInitiator(
            keyB, "beta", f"4000:localhost:{listen_echo(self, b'B:')}", count=2
        )
        self.assertTrue(newest.connect_name.startswith("beta-"))

        @defer.inlineCallbacks
        def reach(target: str) -> Any:
            out, err, code = yield self.ssh(client, "user2", "-W", f"{target}:4000", stdin=b"hi")
            return out, err, code

        for target, expected in (("shared", b"B:hi"), ("shared~0", b"B:hi"), ("shared~1", b"A:hi")):
            out, err, code = yield reach(target)
            self.assertEqual((out, code), (expected, 0), f"{target}: {err!r}")
        out, err, code = yield reach("shared~2")
        self.assertEqual(code, 255)
        self.assertIn(b"no such listener: shared~2", err)
        procB.transport.signalProcess("KILL")
        yield self.waitFor(lambda: len(self.registry.listeners()) == 1, 5, "beta to leave")
        out, err, code = yield reach("shared")
        self.assertEqual((out, code), (b"A:hi", 0), err)
        out, err, code = yield reach("shared~1")
        self.assertEqual(code, 255)
        self.assertIn(b"no such listener: shared~1", err)


class ForwardRequestTests(FlowTestBase):
    """tcpip-forward and cancel-tcpip-forward as OpenSSH clients use them."""

    @defer.inlineCallbacks
    def test_port_zero_is_allocated(self) -> defer.Generator:
        """-R 0:host:port prints 'Allocated port N' and -W alias:N reaches the device."""
        target = listen_echo(self, tag=b"Z:")
        proc = self.spawn(self.key("k1"), "dyn", "-N", "-R", f"0:localhost:{target}", stdin=None)
        yield proc.waitOutput(b"for remote forward")
        match = re.search(rb"Allocated port (\d+) for remote forward", bytes(proc.err))
        self.assertIsNotNone(match, bytes(proc.err))
        port = int(match.group(1))
        self.assertTrue(0 < port <= 65535)
        listener = yield self.waitPort(port)
        out, err, code = yield self.ssh(
            self.key("k2"), "user2", "-W", f"{listener.connect_name}:{port}", stdin=b"x"
        )
        self.assertEqual((out, code), (b"Z:x", 0), err)

    @defer.inlineCallbacks
    def test_duplicate_port_on_one_connection_refused(self) -> defer.Generator:
        """One connection asking twice for port 7000 fails; two initiators may share 7000."""
        t1, t2 = listen_echo(self, b"1:"), listen_echo(self, b"2:")
        out, err, code = yield self.ssh(
            self.key("k0"),
            "dup",
            "-N",
            "-R",
            f"7000:localhost:{t1}",
            "-R",
            f"7000:localhost:{t2}",
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"remote port forwarding failed", err)
        yield self.waitFor(lambda: not self.registry.listeners(), 5, "dup to leave")
        _, first = yield self.startInitiator(self.key("k1"), "one", f"7000:localhost:{t1}")
        _, second = yield self.startInitiator(
            self.key("k2"), "two", f"7000:localhost:{t2}", count=2
        )
        client = self.key("k3")
        for listener, tag in ((first, b"1:"), (second, b"2:")):
            out, err, code = yield self.ssh(
                client, "user3", "-W", f"{listener.connect_name}:7000", stdin=b"x"
            )
            self.assertEqual((out, code), (tag + b"x", 0), err)

    @defer.inlineCallbacks
    def test_cancel_forward_via_control_master(self) -> defer.Generator:
        """ssh -O cancel -R removes the virtual port; a circuit to it then finds no such port."""
        target = listen_echo(self, tag=b"C:")
        sockdir = tempfile.mkdtemp(prefix="nc-cm-")
        self.addCleanup(shutil.rmtree, sockdir, True)
        sock = os.path.join(sockdir, "s")
        argv = self.sshArgs(
            self.key("k1"),
            "ctl",
            "-N",
            "-S",
            sock,
            "-R",
            f"7001:localhost:{target}",
            "-R",
            f"7003:localhost:{target}",
        )
        argv[argv.index("ControlMaster=no")] = "ControlMaster=yes"
        master = self.spawn(None, "", stdin=None, argv=argv)
        listener = yield self.waitFor(
            lambda: next((e for e in self.registry.listeners() if len(e.ports) == 2), None),
            10,
            "both ports of the master",
        )
        yield self.waitFor(lambda: os.path.exists(sock), 10, "the control socket")
        name = listener.connect_name
        client = self.key("k2")
        out, err, code = yield self.ssh(client, "user2", "-W", f"{name}:7001", stdin=b"x")
        self.assertEqual((out, code), (b"C:x", 0), err)
        cancel = [
            SSH or "ssh",
            "-F",
            "/dev/null",
            "-S",
            sock,
            "-O",
            "cancel",
            "-R",
            f"7001:localhost:{target}",
            "dummy",
        ]
        out, err, code = yield within(self.spawn(None, "", argv=cancel).ended, 10, "ssh -O")
        self.assertEqual(code, 0, err)
        yield self.waitFor(lambda: 7001 not in listener.ports, 5, "port 7001 to go")
        self.assertEqual(sorted(listener.ports), [7003])
        self.assertIsNone(master.code)
        out, err, code = yield self.ssh(client, "user2", "-W", f"{name}:7001", stdin=b"x")
        self.assertEqual(code, 255)
        self.assertIn(f"no such port: {name} has no port 7001".encode(), err)
        out, err, code = yield self.ssh(client, "user2", "-W", f"{name}:7003", stdin=b"y")
        self.assertEqual((out, code), (b"C:y", 0), err)

    @defer.inlineCallbacks
    def test_quiet_initiator_and_whoami(self) -> defer.Generator:
        """ssh -N -R registers without printing; ssh host whoami by that key prints its names."""
        target = listen_echo(self)
        key = self.key("k1")
        proc, listener = yield self.startInitiator(key, "quiet", f"7000:localhost:{target}")
        self.assertEqual(bytes(proc.out), b"")
        self.assertNotIn(b"Welcome", bytes(proc.err))
        self.assertRegex(listener.connect_name, r"^quiet-[0-9a-z]{7}$")
        out, err, code = yield self.ssh(key, "quiet", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: quiet\n", out)
        self.assertIn(f"names: {listener.connect_name}\n".encode(), out)
        self.assertEqual(bytes(proc.out), b"")


class ListenersCommandTests(FlowTestBase):
    """The listeners command, with and without access=list."""

    @defer.inlineCallbacks
    def test_listeners_needs_list_access(self) -> defer.Generator:
        """A list key sees the initiator's name and port; a key without list is denied."""
        target = listen_echo(self)
        _, listener = yield self.startInitiator(self.key("k1"), "dev", f"6379:localhost:{target}")
        lister = self.key("lister", options='access="list"')
        out, err, code = yield self.ssh(lister, "ops", command=("listeners",))
        self.assertEqual(code, 0, err)
        rows = [line.split() for line in out.decode().splitlines()]
        self.assertEqual(rows[0], ["NAME", "ADDRESS", "ALIASES", "PORTS"])
        self.assertIn([listener.connect_name, "127.0.0.1", "-", "6379"], rows[1:])
        out, err, code = yield self.ssh(self.key("k2"), "user2", command=("listeners",))
        self.assertEqual(code, 1)
        self.assertEqual(out, b"")
        self.assertIn(b"Permission denied", err)


class AdminShellTests(FlowTestBase):
    """The interactive admin shell over ssh -tt."""

    @defer.inlineCallbacks
    def test_shell_help_whoami_exit(self) -> defer.Generator:
        """help and whoami print their text in the shell, and exit leaves with status 0."""
        admin = self.key("adm", options='access="admin"')
        out, err, code = yield self.ssh(admin, "boss", "-tt", stdin=b"help\rwhoami\rexit\r")
        self.assertEqual(code, 0, err)
        self.assertIn(b"Welcome to nuttconch, boss.", out)
        self.assertIn(b"Commands:", out)
        self.assertIn(b"quit, exit", out)
        self.assertRegex(out, rb"hostname: boss\r+\n")
        self.assertRegex(out, rb"access: admin\r+\n")

    @defer.inlineCallbacks
    def test_ctrl_c_does_not_end_shell(self) -> defer.Generator:
        """Ctrl-C in the shell clears the line; the next command still runs."""
        admin = self.key("adm", options='access="admin"')
        out, err, code = yield self.ssh(admin, "boss", "-tt", stdin=b"who\x03whoami\rexit\r")
        self.assertEqual(code, 0, err)
        self.assertIn(b"^C", out)
        self.assertRegex(out, rb"hostname: boss\r+\n")
        self.assertNotIn(b"unknown command", out)

    @defer.inlineCallbacks
    def test_shell_lines_end_in_a_single_crlf(self) -> defer.Generator:
        """Shell output lines end in one CR LF, as a terminal expects, never CR CR LF."""
        admin = self.key("adm", options='access="admin"')
        out, err, code = yield self.ssh(admin, "boss", "-tt", stdin=b"whoami\rexit\r")
        self.assertEqual(code, 0, err)
        self.assertIn(b"Your connect name is boss-", out)
        self.assertIn(b"hostname: boss\r\nnames: boss-", out)
        self.assertNotIn(b"\r\r\n", out)


class ShellDisabledTests(FlowTestBase):
    """enable_shell = false: the admin key gets a message, exec commands still work."""

    settings = {"enable_shell": "false"}

    @defer.inlineCallbacks
    def test_shell_disabled_message(self) -> defer.Generator:
        """ssh -tt by an admin key says the interactive shell is disabled and, holding no
        virtual port, ends with status 1 (issue 12.5); whoami still works."""
        admin = self.key("adm", options='access="admin"')
        proc = self.spawn(admin, "boss", "-tt", stdin=None)
        yield proc.waitOutput(b"interactive shell is disabled")
        out, err, code = yield within(proc.ended, 5, "the refused session to end")
        self.assertNotIn(b"nuttconch> ", out + err)
        self.assertEqual(code, 1, err)
        out, err, code = yield self.ssh(admin, "boss", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: boss\n", out)


class PtyRefusedTests(FlowTestBase):
    """allow_pty = false: the pty request fails but the session goes on."""

    settings = {"allow_pty": "false"}

    @defer.inlineCallbacks
    def greetOnTerminal(self) -> Any:
        """Run ssh on a real terminal (RequestTTY=auto) until the greeting shows."""
        admin = self.key("adm", options='access="admin"')
        proc = SSHProcess(None)
        argv = self.sshArgs(admin, "boss")
        reactor.spawnProcess(proc, argv[0], argv, env=ENV, usePTY=True)
        self.processes.append(proc)
        yield proc.waitOutput(b"Welcome to nuttconch, boss.")
        self.assertIn(b"PTY allocation request failed", bytes(proc.out))
        self.assertIsNone(proc.code)
        yield proc.kill()

    @defer.inlineCallbacks
    def test_pty_refused_session_still_greets(self) -> defer.Generator:
        """A terminal user whose pty request is refused still gets the greeting session.

        OpenSSH treats a refused pty as fatal only when -t/-tt forced it, so
        ssh runs on a real terminal (RequestTTY=auto) as an interactive user's does.
        """
        yield self.greetOnTerminal()
        # The server's log noise is checked separately, below.
        self.flushLoggedErrors(PermissionError)

    @defer.inlineCallbacks
    def test_pty_refusal_is_not_an_unhandled_error(self) -> defer.Generator:
        """Refusing a pty by configuration logs no 'Unhandled Error' traceback."""
        yield self.greetOnTerminal()
        refusals = self.flushLoggedErrors(PermissionError)
        self.assertEqual(
            [str(f.value) for f in refusals], [], "a refused pty was logged as an unhandled error"
        )
