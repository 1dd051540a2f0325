"""authorized_keys_command (issue 12 point 4): keys from an external program.

Unit tables for the argv template and the reading of the output; then the
real ``ssh`` against a server whose command is a shell script in the
test's directory that prints a line, prints megabytes, sleeps forever,
exits 1 or prints garbage.  Each hostile command refuses only its own
login, with the reason in the log, and never holds up another login.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from typing import Any

from twisted.conch.ssh.keys import Key
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from nuttconch import authkeys, keycommand
from nuttconch import config as configmod
from nuttconch.keycommand import KeyCommand, KeyCommandError, expand, parse_command

from .harness import SwitchboardTestMixin, _timeout, make_key

ED_A = Key.fromString(
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFq0b2xJ8yyJ3dJ4rO4U0Q2p4mGnU0bJ8Qm0b1m6wNnE"
)


def figure(text: str) -> None:
    """Print a measured figure when asked to (NUTT_FIGURES=1)."""
    if os.environ.get("NUTT_FIGURES"):
        print(f"\nFIGURE: {text}")


# -- the argv template --------------------------------------------------------------------

PARSE_TABLE: list[tuple[str, tuple[str, ...] | str]] = [
    ("", ()),
    ("   ", ()),
    ("/usr/bin/curl -sf https://forge/%u.keys", ("/usr/bin/curl", "-sf", "https://forge/%u.keys")),
    ("/bin/x '%f %t' \"a b\"", ("/bin/x", "%f %t", "a b")),
    ("/bin/x 100%%", ("/bin/x", "100%%")),
    ("/bin/x %u%k", ("/bin/x", "%u%k")),
    ("curl https://x", "must be an absolute path"),
    ("./keys.sh", "must be an absolute path"),
    ("/bin/x 'open", "cannot split into arguments"),
    ("/bin/x %h", "unknown token '%h'"),
    ("/bin/x 50%", "unknown token '%'"),
    ("/bin/x %U", "unknown token '%U'"),
]

EXPAND_VALUES = {"%u": "dev", "%t": "ssh-ed25519", "%f": "SHA256:abc", "%k": "AAAA"}
EXPAND_TABLE: list[tuple[tuple[str, ...], list[str]]] = [
    (("/bin/x", "%u"), ["/bin/x", "dev"]),
    (("/bin/x", "%t %f", "%k"), ["/bin/x", "ssh-ed25519 SHA256:abc", "AAAA"]),
    (("/bin/x", "https://f/%u.keys"), ["/bin/x", "https://f/dev.keys"]),
    (("/bin/x", "%%u", "100%%"), ["/bin/x", "%u", "100%"]),
    # A value is never expanded again, whatever it holds.
    (("/bin/x", "%u"), ["/bin/x", "%k"]),
]


class TemplateTests(unittest.TestCase):
    """Parsing and expanding the command line."""

    def test_parse_table(self) -> None:
        """Each config value gives its argv template or a refusal naming the problem."""
        for text, expected in PARSE_TABLE:
            if isinstance(expected, tuple):
                self.assertEqual(parse_command(text), expected, text)
            else:
                exc = self.assertRaises(ValueError, parse_command, text)
                self.assertIn(expected, str(exc), text)

    def test_expand_table(self) -> None:
        """Tokens are replaced inside their own argument only, in one pass."""
        for template, expected in EXPAND_TABLE:
            values = dict(EXPAND_VALUES)
            if expected == ["/bin/x", "%k"]:
                values["%u"] = "%k"
            self.assertEqual(expand(template, values), expected, template)

    def test_config_key_is_read_raw(self) -> None:
        """In nuttssh.ini the tokens are written as in sshd_config (%u, not %%u), and a
        bad value stops start-up with the key's name."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("[keys]\nauthorized_keys_command = /usr/bin/curl -sf https://f/%u.keys\n")
        cfg = configmod.load(path)
        self.assertEqual(cfg.authorized_keys_command, ("/usr/bin/curl", "-sf", "https://f/%u.keys"))
        with open(path, "w") as handle:
            handle.write("[keys]\nauthorized_keys_command = curl %u\n")
        exc = self.assertRaises(configmod.ConfigError, configmod.load, path)
        self.assertIn("authorized_keys_command", str(exc))
        self.assertIn("absolute path", str(exc))
        with open(path, "w") as handle:
            handle.write("[keys]\nauthorized_keys_command_timeout = 0\n")
        exc = self.assertRaises(configmod.ConfigError, configmod.load, path)
        self.assertIn("above 0", str(exc))


# -- reading the output -------------------------------------------------------------------

A_LINE = ED_A.toString("openssh").decode()
OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOVxwJ2gnxX9Ya3zvJqz2nKwzSb6oCDuoEZ5QJ8WJ2Lk other"
OUTPUT_TABLE: list[tuple[str, bytes, str | None, int]] = [
    # (name, output, access of the entry chosen ("none" = no access=, None = no entry), bad)
    ("empty", b"", None, 0),
    ("bare key", f"{A_LINE} me\n".encode(), "none", 0),
    ("with options", f'access="listen",from="127.0.0.1" {A_LINE}\n'.encode(), "listen", 0),
    ("other key only", f"{OTHER}\n".encode(), None, 0),
    ("garbage", b"\x00\xff<html>Not Found</html>\n", None, 1),
    ("garbage then key", f"not a key\n{A_LINE}\n".encode(), "none", 1),
    ("denial wins", f'access="admin" {A_LINE}\naccess="denied" {A_LINE}\n'.encode(), "denied", 0),
    # A line about this key that cannot be parsed denies it, as in the file.
    ("bad line for key", f'bogus-option="1 {A_LINE}\n'.encode(), "denied", 1),
    ("CRLF and BOM", f'\ufeffaccess="list" {A_LINE}\r\n'.encode(), "list", 0),
    ("comments", f"# keys\n\n{A_LINE}\n".encode(), "none", 0),
]


class OutputTests(unittest.TestCase):
    """What a command's output means, line by line, as authorized_keys would."""

    def test_output_table(self) -> None:
        """Each output gives the entry (and access) authorized_keys would give."""
        for name, output, access, bad in OUTPUT_TABLE:
            entry, got_bad = KeyCommand._parse(output, ED_A.blob())
            got = None if entry is None else ",".join(sorted(entry.access)) or "none"
            self.assertEqual((got, got_bad), (access, bad), name)


# -- the process, without ssh ------------------------------------------------------------


class ProcessMixin:
    def script(self, body: str) -> tuple[str, ...]:
        """A shell script in the test's directory; returns the argv template."""
        directory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(directory)
        path = os.path.join(directory, "keys.sh")
        with open(path, "w") as handle:
            handle.write("#!/bin/sh\n" + body + "\n")
        os.chmod(path, 0o755)
        self.scriptDir = directory
        return (path, "%u", "%t", "%f", "%k")


class ProcessTests(ProcessMixin, unittest.TestCase):
    """KeyCommand against real child processes."""

    @defer.inlineCallbacks
    def test_arguments_and_answer(self) -> Any:
        """The command gets user, type, fingerprint and key as four arguments."""
        argsFile = os.path.abspath(self.mktemp())
        template = self.script(f'printf "%s\\n" "$@" > {argsFile}\necho \'access="list" {A_LINE}\'')
        kc = KeyCommand(template, reactor)
        entry = yield kc.lookup("dev", "ssh-ed25519", ED_A.blob())
        self.assertEqual(entry.access, frozenset({"list"}))
        with open(argsFile) as handle:
            args = handle.read().splitlines()
        self.assertEqual(
            args,
            [
                "dev",
                "ssh-ed25519",
                authkeys.fingerprint_of(ED_A.blob()),
                base64.b64encode(ED_A.blob()).decode(),
            ],
        )

    @defer.inlineCallbacks
    def test_cache_and_shared_run(self) -> Any:
        """Five concurrent lookups of one key share one run; later ones hit the cache
        until it expires; another user name is another run."""
        template = self.script(f"sleep 0.2\necho '{A_LINE}'")
        kc = KeyCommand(template, reactor, cache_time=60)
        results = yield defer.gatherResults(
            [kc.lookup("dev", "ssh-ed25519", ED_A.blob()) for _ in range(5)]
        )
        self.assertEqual(len({id(r) for r in results}), 1)
        self.assertEqual(kc.runs, 1)
        yield kc.lookup("dev", "ssh-ed25519", ED_A.blob())
        self.assertEqual(kc.runs, 1)
        yield kc.lookup("other", "ssh-ed25519", ED_A.blob())
        self.assertEqual(kc.runs, 2)
        kc.cache_time = 0
        kc.cache.clear()
        yield kc.lookup("dev", "ssh-ed25519", ED_A.blob())
        yield kc.lookup("dev", "ssh-ed25519", ED_A.blob())
        self.assertEqual(kc.runs, 4)

    @defer.inlineCallbacks
    def test_failures(self) -> Any:
        """Exit 1, output past the limit, a run past the timeout and a missing program
        each fail with the reason; none is cached."""
        table = [
            ("echo oops >&2; exit 1", "exited with status 1 (stderr: oops)"),
            ("exec /usr/bin/yes " + A_LINE, "printed more than 65536 bytes"),
            ("exec sleep 1000", "did not finish within 0.5 s"),
            ("kill -9 $$", "killed by signal 9"),
        ]
        for body, reason in table:
            kc = KeyCommand(self.script(body), reactor, timeout=0.5)
            started = time.monotonic()
            failure = yield self.assertFailure(
                kc.lookup("dev", "ssh-ed25519", ED_A.blob()), KeyCommandError
            )
            self.assertIn(reason, str(failure), body)
            self.assertLess(time.monotonic() - started, 10, body)
            self.assertEqual(kc.cache, {}, body)
        kc = KeyCommand(("/nonexistent/keys",), reactor, timeout=2)
        failure = yield self.assertFailure(
            kc.lookup("dev", "ssh-ed25519", ED_A.blob()), KeyCommandError
        )
        self.assertIn("exited with status", str(failure))

    @defer.inlineCallbacks
    def test_orphan_holding_the_pipe(self) -> Any:
        """A command whose child keeps stdout open is given up at the timeout all the
        same (the login does not wait for the orphan)."""
        pidFile = os.path.join(os.path.abspath(self.mktemp()))
        template = self.script(f"sleep 1000 &\necho $! > {pidFile}\nwait")

        def killOrphan() -> None:
            try:
                with open(pidFile) as handle:
                    os.kill(int(handle.read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass

        self.addCleanup(killOrphan)
        kc = KeyCommand(template, reactor, timeout=0.5)
        started = time.monotonic()
        failure = yield self.assertFailure(
            kc.lookup("dev", "ssh-ed25519", ED_A.blob()), KeyCommandError
        )
        elapsed = time.monotonic() - started
        figure(f"key command with an orphan holding stdout: refused after {elapsed:.2f}s")
        self.assertIn("did not finish within 0.5 s", str(failure))
        self.assertLess(elapsed, 10)

    def test_waiting_bound(self) -> None:
        """Past MAX_WAITING queued lookups, a new one is refused at once."""
        kc = KeyCommand(("/bin/true",), reactor)
        self.patch(keycommand, "MAX_WAITING", 0)
        kc.slots.tokens = 0
        kc.slots.waiting.append(defer.Deferred())
        d = kc.lookup("dev", "ssh-ed25519", ED_A.blob())
        self.failureResultOf(d, KeyCommandError)


# -- end to end with the real ssh -------------------------------------------------------


class KeyCommandE2EMixin(ProcessMixin, SwitchboardTestMixin):
    settings = {"allow_new_clients": "false"}
    timeout_setting = "3"

    def writeConfig(self, **overrides: str) -> str:
        path = super().writeConfig(**overrides)
        self.commandPath = os.path.join(self.dir, "keys.sh")
        self.argsFile = os.path.join(self.dir, "args")
        self.setScript("exit 0")
        with open(path, "a") as handle:  # [keys] is the last section
            handle.write(
                f"authorized_keys_command = {self.commandPath} %u %t %f %k\n"
                f"authorized_keys_command_timeout = {self.timeout_setting}\n"
            )
        return path

    def setScript(self, body: str) -> None:
        with open(self.commandPath, "w") as handle:
            handle.write(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {self.argsFile}\n{body}\n')
        os.chmod(self.commandPath, 0o755)

    def setUp(self) -> Any:
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)  # type: ignore[attr-defined]
        return super().setUp()

    def logText(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.logged)

    def newKey(self, name: str) -> tuple[str, str]:
        return make_key(self.dir, name)


class KeyCommandE2ETests(KeyCommandE2EMixin, unittest.TestCase):
    """The real ssh against a server with authorized_keys_command."""

    def readKeys(self) -> bytes:
        with open(self.akfile, "rb") as handle:
            return handle.read()

    @defer.inlineCallbacks
    def test_line_from_command_admits_key(self) -> Any:
        """A key only the command knows logs in with the command's access, the file is
        untouched, and the command ran once for probe and signature together."""
        path, public = self.newKey("forge")
        self.setScript(f'echo \'access="list",hostname="laptop" {public}\'')
        before = self.readKeys()
        out, err, code = yield self.ssh(path, "alice", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: laptop\n", out)
        self.assertIn(b"access: list\n", out)
        self.assertEqual(self.readKeys(), before)
        with open(self.argsFile) as handle:
            args = handle.read().splitlines()
        key = Key.fromString(public)
        self.assertEqual(
            args,
            ["alice", "ssh-ed25519", authkeys.fingerprint_of(key.blob()), public.split()[1]],
        )
        self.assertIn("authorized_keys_command gave line 1 for alice", self.logText())

    @defer.inlineCallbacks
    def test_file_line_wins(self) -> Any:
        """A key the file lists (here denied) never reaches the command."""
        path = self.key("listed", options='access="denied"')
        self.setScript("echo should-not-run >&2; exit 1")
        out, err, code = yield self.ssh(path, "bob", command=("whoami",))
        self.assertEqual(code, 255)
        self.assertIn(b"nuttconch: this key is denied", err)
        self.assertFalse(os.path.exists(self.argsFile))

    @defer.inlineCallbacks
    def test_hostile_commands_refuse_only_that_login(self) -> Any:
        """Prints megabytes, exits 1, prints garbage, killed: each refuses the login
        with a sentence for the user and the reason in the log."""
        path, public = self.newKey("victim")
        table = [
            (f"exec /usr/bin/yes '{public}'", b"the server could not look up your key", "printed more than"),  # noqa: E501
            ("echo 'forge down' >&2; exit 1", b"the server could not look up your key", "exited with status 1 (stderr: forge down)"),  # noqa: E501
            ("head -c 3000 /dev/urandom", b"this key is not authorized", "gave no line"),
            ("printf '<html>404</html>\\n'", b"this key is not authorized", "1 unreadable lines ignored"),  # noqa: E501
            ("kill -9 $$", b"the server could not look up your key", "killed by signal 9"),
        ]  # fmt: skip
        before = self.readKeys()
        for body, shown, logged in table:
            self.logged.clear()
            self.setScript(body)
            # A new user name each time: answers are cached per user and key.
            user = f"u{len(body)}"
            started = time.monotonic()
            out, err, code = yield self.ssh(path, user, command=("whoami",))
            elapsed = time.monotonic() - started
            figure(f"key command {body[:30]!r}: refused in {elapsed:.2f}s")
            self.assertEqual((out, code), (b"", 255), body)
            self.assertIn(b"nuttconch: " + shown, err, (body, err))
            self.assertIn(logged, self.logText(), body)
        self.assertEqual(self.readKeys(), before, "nothing is added to or lost from the file")
        # The server is fine: a file key logs in.
        out, err, code = yield self.ssh(self.key("ok", options=""), "ok", command=("whoami",))
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_slow_command_blocks_no_other_login(self) -> Any:
        """While one login waits for a command that sleeps forever, another logs in at
        once; the slow one is refused at the timeout."""
        path, public = self.newKey("slow")
        self.setScript("exec sleep 1000")
        started = time.monotonic()
        slow = self.spawn(path, "slowpoke", command=("whoami",))
        yield self.waitFor(lambda: os.path.exists(self.argsFile), 10, "the command to start")
        fast = self.key("fast", options='access="list"')
        t0 = time.monotonic()
        out, err, code = yield self.ssh(fast, "fast", command=("whoami",))
        fastElapsed = time.monotonic() - t0
        self.assertEqual(code, 0, err)
        self.assertIsNone(slow.code, "the slow login ended before the fast one")
        out, err, code = yield _timeout(slow.ended, 20, "the slow login to be refused")
        slowElapsed = time.monotonic() - started
        figure(
            f"sleeping key command (timeout 3 s): other login {fastElapsed:.2f}s,"
            f" slow login refused after {slowElapsed:.2f}s"
        )
        self.assertEqual(code, 255)
        self.assertIn(b"could not look up your key", err)
        self.assertGreaterEqual(slowElapsed, 2.5)
        self.assertIn("did not finish within 3 s", self.logText())

    @defer.inlineCallbacks
    def test_command_initiator_survives_file_change(self) -> Any:
        """An initiator admitted by the command keeps its port when authorized_keys
        changes (the file never had its key)."""
        path, public = self.newKey("gw")
        self.setScript(f"echo 'access=\"initiate\" {public}'")
        proc = yield self.initiator(path, "gw", "7600:127.0.0.1:9")
        self.addAuthorized(make_key(self.dir, "another")[1], 'access="list"')
        self.factory.checkKeys()
        d: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0.5, d.callback, None)
        yield d
        self.assertIsNone(proc.code)
        self.assertTrue(self.registry.listeners())
        self.assertTrue(any(7600 in entry.ports for entry in self.registry.listeners()))
