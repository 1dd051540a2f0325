# -*- test-case-name: tests.test_e2e -*-
"""Session channels: the initiator greeting, exec commands, and the admin shell.

Nothing here spawns a process; every command is answered in-process.
Each session hands Conch a connected protocol before any input can
arrive, because Conch asserts (and drops the connection) when stdin
reaches a session that has no protocol yet.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch import recvline
from twisted.conch.insults import insults
from twisted.conch.interfaces import ISession
from twisted.conch.ssh import session as conch_session
from twisted.internet import protocol
from twisted.logger import Logger
from zope.interface import implementer

from . import commands
from .access import ADMIN
from .logs import conch_logger
from .names import escape

log = Logger()
MAX_PENDING_INPUT = 64 * 1024
MAX_LINE = 1024
# Output a session may hold beyond what the client's window lets us send. Conch appends
# to one bytes buffer (each write copies all of it), so a client that never reads would
# otherwise make every greeting line or echoed key cost memory and CPU without bound.
MAX_PENDING_OUTPUT = 64 * 1024
# Greeting sessions (shell without the admin shell) per connection; each is told of
# every new virtual port, so their number multiplies the cost of a forward.
MAX_GREETING_SESSIONS = 16


class SwitchboardSession(conch_session.SSHSession):
    """A session channel whose early input is bounded."""

    _log = conch_logger("nuttconch.session.SwitchboardSession")

    def request_pty_req(self, data: bytes) -> int:
        """Refuse ptys quietly when allow_pty is off (Conch would log a traceback)."""
        avatar: Any = self.avatar
        if not avatar.config.allow_pty:
            log.info("pty request refused: allow_pty is off")
            return 0
        if not avatar.identity.policy.pty:
            log.info(
                "conn {conn_id}: pty request refused: key {fingerprint} has no-pty or"
                " restrict{cert}",
                conn_id=avatar.info.conn_id,
                fingerprint=avatar.identity.fingerprint,
                cert=_certificate_note(avatar.identity),
            )
            return 0
        return int(super().request_pty_req(data))

    def request_exec(self, data: bytes) -> int:
        if self._repeated(b"exec"):
            return 0
        return int(super().request_exec(data))

    def request_shell(self, data: bytes) -> int:
        if self._repeated(b"shell"):
            return 0
        return int(super().request_shell(data))

    def request_subsystem(self, data: bytes) -> int:
        if self._repeated(b"subsystem"):
            return 0
        return int(super().request_subsystem(data))

    def _repeated(self, kind: bytes) -> bool:
        """A session runs one shell, exec or subsystem.  Conch refuses a second one with
        an error line each time; here it is refused as the connection's other bad
        requests are: the first is logged at info, the rest only counted."""
        if self.client is None:
            return False
        note = getattr(self.conn, "noteBadRequest", None)
        if note is not None:
            note(f"second {kind.decode()} request on one session refused")
        return True

    def dataReceived(self, data: bytes) -> None:
        if self.client is None:
            if len(self.buf) + len(data) <= MAX_PENDING_INPUT:
                self.buf += data
            return
        if self.client.transport is not None:
            self.client.transport.write(data)

    def eofReceived(self) -> None:
        if self.session is not None:
            self.session.eofReceived()

    def write(self, data: bytes) -> None:
        if not self._overflows(len(data)):
            super().write(data)

    def writeExtended(self, dataType: int, data: bytes) -> None:
        if not self._overflows(len(data)):
            super().writeExtended(dataType, data)

    def _overflows(self, size: int) -> bool:
        """Close the channel, dropping its output, when a client that is not reading
        would leave more than MAX_PENDING_OUTPUT bytes queued on the server."""
        if self.localClosed:
            return True
        pending = len(self.buf) + sum(len(chunk) for _, chunk in self.extBuf)
        if pending:
            queued = pending + size
        else:
            queued = size - max(0, self.remoteWindowLeft)
        if queued <= MAX_PENDING_OUTPUT:
            return False
        avatar: Any = self.avatar
        log.info(
            "conn {conn_id}: session channel closed: its client read none of"
            " {pending} bytes of output",
            conn_id=avatar.info.conn_id,
            pending=pending,
        )
        self.buf = b""
        self.extBuf = []
        self.closing = 1
        if self.conn is not None:
            self.conn.sendClose(self)
        return True


def _finish(proto: Any, code: int) -> None:
    """Send exit-status, EOF (once the output is out) and close."""
    chan = proto.session
    if chan.localClosed:
        return
    chan.conn.sendRequest(chan, b"exit-status", struct.pack(">L", code))
    if not chan.buf:
        chan.conn.sendEOF(chan)
    chan.loseConnection()


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


class _Sink(protocol.Protocol):
    """Takes and discards input for sessions that read none."""

    def __init__(self, onData: Any = None) -> None:
        self.onData = onData

    def dataReceived(self, data: bytes) -> None:
        if self.onData is not None:
            self.onData(data)


def _certificate_note(identity: Any) -> str:
    login = getattr(identity, "certificate", None)
    if login is None or login.permit_pty:
        return ""
    return " (its certificate lacks permit-pty)"


@implementer(ISession)
class SessionHandler:
    """One session channel's behaviour; adapted from the avatar per channel."""

    def __init__(self, avatar: Any) -> None:
        self.avatar = avatar
        self.pty = False
        self.proto: Any = None
        self.terminal: Any = None
        self.greeting = False
        self._pending: Any = None

    @property
    def _serverName(self) -> tuple[str, int]:
        config = self.avatar.config
        port = config.listen_port
        if port == 0:
            port = self.avatar.conn.transport.transport.getHost().port
        return config.server_fqdn, port

    def getPty(self, term: bytes, windowSize: Any, modes: Any) -> None:
        avatar: Any = self.avatar
        if not avatar.config.allow_pty:
            raise PermissionError("pty requests are disabled on this server")
        self.pty = True

    def windowChanged(self, newWindowSize: Any) -> None:
        if self.terminal is not None:
            rows, cols = newWindowSize[0], newWindowSize[1]
            self.terminal.terminalProtocol.terminalSize(cols or 80, rows or 24)

    def _connect(self, proto: Any, inner: protocol.Protocol) -> None:
        inner.makeConnection(proto)
        proto.makeConnection(conch_session.wrapProtocol(inner))
        self.proto = proto

    def _afterReply(self, action: Any, *args: Any) -> None:
        """Run ``action`` once the reply to the current channel request is out.

        Conch answers an exec or shell request only after its handler returns; output
        and a close written inside the handler would reach the client before that
        answer, and clients that wait for it (paramiko, hence Fabric, Ansible and
        Netmiko) then fail with "Channel closed".  The reply is sent in the same call
        as the handler, so a zero-delay call lands after it.
        """

        def run() -> None:
            self._pending = None
            if self.proto is not None and not self.proto.session.localClosed:
                action(*args)

        self._pending = self.avatar.conn.transport.clock.callLater(0, run)

    def execCommand(self, proto: Any, command: bytes) -> None:
        self._connect(proto, _Sink())
        self._afterReply(self._runCommand, proto, command)

    def _runCommand(self, proto: Any, command: bytes) -> None:
        forced = self.avatar.identity.policy.command
        log.info(
            "conn {conn_id}: {hostname} runs {command}{asked}",
            conn_id=self.avatar.info.conn_id,
            hostname=self.avatar.identity.hostname,
            command=escape((forced.encode() if forced is not None else command)[:80]),
            asked="" if forced is None else f" (command= of the key; asked {escape(command[:80])})",
        )
        if forced is not None:
            command = forced.encode("utf-8")
        result = commands.run(self.avatar, command)
        out = _crlf(result.out) if self.pty else result.out.encode("utf-8")
        err = _crlf(result.err) if self.pty else result.err.encode("utf-8")
        if out:
            proto.write(out)
        if err:
            proto.session.writeExtended(1, err)
        _finish(proto, result.code)

    def openShell(self, proto: Any) -> None:
        identity = self.avatar.identity
        if identity.policy.command is not None:
            # As sshd: a key's command= replaces the shell too.
            self.execCommand(proto, b"")
            return
        if self.pty and ADMIN in identity.access and self.avatar.config.enable_shell:
            server, port = self._serverName
            terminal = insults.ServerProtocol(AdminShell, self.avatar, server, port)
            self._connect(proto, terminal)
            self.terminal = terminal
            return
        if self.pty and not self.avatar.holdsPorts():
            # A terminal user with nothing to see: a greeting that sits there looks like a
            # hung login.  An initiator's session (ssh -R without -N) holds its ports by
            # now, since OpenSSH sends its forwards before it opens the session.
            self._connect(proto, _Sink())
            self._afterReply(self._refuse, proto, self._noShellReason())
            return
        self._connect(proto, _Sink(self._greetingInput))
        if len(self.avatar.sessions) >= MAX_GREETING_SESSIONS:
            message = (
                f"nuttconch: too many sessions on this connection"
                f" (at most {MAX_GREETING_SESSIONS}); close one first\n"
            )
            self._afterReply(self._refuse, proto, message)
            return
        self.greeting = True
        server, port = self._serverName
        text = commands.greeting(self.avatar, server, port)
        if self.pty and ADMIN in identity.access:
            text += "The interactive shell is disabled on this server; exec commands work.\n"
        proto.write(_crlf(text) if self.pty else text.encode("utf-8"))
        self.avatar.sessions.append(self)

    def _noShellReason(self) -> str:
        """Why a terminal session gets no shell, and what the user can do instead."""
        server, port = self._serverName
        if ADMIN not in self.avatar.identity.access:
            why = "this key has no interactive shell (that needs access=admin)"
        else:
            why = "the interactive shell is disabled on this server (enable_shell = false)"
        return (
            f"nuttconch: {why}, and this connection holds no virtual port.\n"
            f"Run a command instead (ssh -p {port} {server} help), offer a port with"
            f" ssh -R PORT:HOST:PORT, or reach one with ssh -W NAME:PORT.\n"
        )

    def _refuse(self, proto: Any, message: str) -> None:
        """End a session that cannot be served: the reason on stderr, exit status 1.

        Logged at debug only: a client may open a session per channel it is allowed, and
        each refusal is its own fault, not news to the operator."""
        log.debug(
            "conn {conn_id}: shell session of {hostname} ended: {why}",
            conn_id=self.avatar.info.conn_id,
            hostname=self.avatar.identity.hostname,
            why=message.splitlines()[0],
        )
        proto.session.writeExtended(1, _crlf(message) if self.pty else message.encode())
        _finish(proto, 1)

    def _greetingInput(self, data: bytes) -> None:
        """With a terminal, Ctrl-C or Ctrl-D leaves; other input is ignored."""
        if self.pty and (b"\x03" in data or b"\x04" in data):
            _finish(self.proto, 0)

    def portAdded(self, port: int) -> None:
        if self.proto is None or self.proto.session.localClosed:
            return
        server, listen_port = self._serverName
        text = commands.port_line(server, listen_port, self.avatar.identity.connect_name, port)
        self.proto.write(_crlf(text + "\n") if self.pty else (text + "\n").encode("utf-8"))

    def eofReceived(self) -> None:
        """``ssh -n`` sends EOF at once: the greeting session stays open regardless."""
        if self.terminal is not None:
            _finish(self.proto, 0)

    def closed(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self in self.avatar.sessions:
            self.avatar.sessions.remove(self)


class AdminShell(recvline.HistoricRecvLine):
    """The interactive shell for ``admin`` keys: line editing, history, bounded input."""

    ps = (b"nuttconch> ", b"... ")

    def __init__(self, avatar: Any, server: str, port: int) -> None:
        self.avatar = avatar
        self.server = server
        self.port = port

    def connectionMade(self) -> None:
        super().connectionMade()
        self.keyHandlers[b"\x03"] = self.handle_INT
        self.keyHandlers[b"\x04"] = self.handle_EOF
        self.keyHandlers[b"\x1c"] = self.handle_INT

    def initializeScreen(self) -> None:
        # insults.ServerProtocol.write already turns "\n" into "\r\n".
        self.terminal.write(commands.greeting(self.avatar, self.server, self.port).encode("utf-8"))
        self.terminal.write(b"Type help for commands.\n")
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def characterReceived(self, ch: bytes, moreCharactersComing: bool) -> None:
        if len(self.lineBuffer) >= MAX_LINE:
            self.terminal.write(b"\x07")
            return
        super().characterReceived(ch, moreCharactersComing)

    def keystrokeReceived(self, keyID: Any, modifier: Any) -> None:
        handler = self.keyHandlers.get(keyID)
        if handler is not None:
            handler()
        elif isinstance(keyID, bytes) and keyID in self._printableChars:
            self.characterReceived(keyID, False)

    def handle_INT(self) -> None:
        self.lineBuffer = []
        self.lineBufferIndex = 0
        self.terminal.write(b"^C")
        self.terminal.nextLine()
        self.terminal.write(self.ps[self.pn])

    def handle_EOF(self) -> None:
        if self.lineBuffer:
            return
        self.terminal.nextLine()
        self._leave()

    def _leave(self) -> None:
        _finish(self.terminal.transport, 0)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if text in ("quit", "exit", "logout"):
            self._leave()
            return
        if text == "help":
            result = commands.help_text(self.avatar, shell=True)
        else:
            result = commands.run(self.avatar, text)
        output = result.out + result.err
        if output:
            self.terminal.write(output.encode("utf-8"))
        self.terminal.write(self.ps[self.pn])
