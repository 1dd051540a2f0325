"""Which shell session a login gets (issue 12 point 5), with the real ``ssh``.

A terminal session (``ssh -t``) that can be neither the admin shell nor a
greeting with something on it (the connection holds no virtual port) says
why on stderr and exits 1; everything else behaves as before.  Each table
row is one ``ssh`` run against one server configuration.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from .harness import SwitchboardTestMixin, _timeout

# (name, access options, ssh arguments, expected): "refused" is exit status 1 with the
# reason on stderr; "shell" the admin prompt; "greeting" a greeting that stays open.
ENABLED_ROWS: tuple[tuple[str, str, tuple[str, ...], str, bytes], ...] = (
    ("listen key, -tt", 'access="listen"', ("-tt",), "refused", b"no interactive shell"),
    ("no access, -tt", "", ("-tt",), "refused", b"needs access=admin"),
    ("admin key, -tt", 'access="admin"', ("-tt",), "shell", b"nuttconch> "),
    (
        "initiator, -tt -R",
        'access="initiate"',
        ("-tt", "-R", "7501:127.0.0.1:9"),
        "greeting",
        b"Virtual port 7501 is open",
    ),
    (
        "initiator, -T -R",
        'access="initiate"',
        ("-T", "-R", "7502:127.0.0.1:9"),
        "greeting",
        b"Virtual port 7502 is open",
    ),
    ("listen key, -T", 'access="listen"', ("-T",), "greeting", b"no virtual ports yet"),
)
DISABLED_ROWS: tuple[tuple[str, str, tuple[str, ...], str, bytes], ...] = (
    ("admin key, -tt", 'access="admin"', ("-tt",), "refused", b"interactive shell is disabled"),
    ("listen key, -tt", 'access="listen"', ("-tt",), "refused", b"no interactive shell"),
    (
        "admin initiator, -tt -R",
        'access="admin",access="initiate"',
        ("-tt", "-R", "7503:127.0.0.1:9"),
        "greeting",
        b"The interactive shell is disabled on this server; exec commands work.",
    ),
)


class SessionTableMixin(SwitchboardTestMixin):
    rows: tuple[tuple[str, str, tuple[str, ...], str, bytes], ...] = ()

    @defer.inlineCallbacks
    def runRow(self, index: int, row: tuple[str, str, tuple[str, ...], str, bytes]) -> Any:
        """One ssh run; returns a mismatch description or None."""
        name, options, args, expected, needle = row
        user = f"user{index}"
        key = self.key(user, options=options)
        proc = self.spawn(key, user, *args, stdin=None)
        if expected == "refused":
            out, err, code = yield _timeout(proc.ended, 20, f"{name}: ssh to exit")
            both = out + err
            if code != 1 or needle not in both or b"Welcome to nuttconch" in both:
                return f"{name}: exit {code}, output {both!r}"
            return None
        try:
            yield proc.waitOutput(needle, timeout=20)
        except AssertionError as exc:
            return f"{name}: {exc}"
        # Still open: a greeting or shell ends only when the user leaves.
        still = proc.code is None
        yield proc.kill()
        return None if still else f"{name}: ended with {proc.code}"

    @defer.inlineCallbacks
    def checkTable(self) -> Any:
        problems = []
        for index, row in enumerate(self.rows):
            problem = yield self.runRow(index, row)
            if problem:
                problems.append(problem)
        self.assertEqual(problems, [])  # type: ignore[attr-defined]


class ShellEnabledTableTests(SessionTableMixin, unittest.TestCase):
    """enable_shell = true (the default)."""

    rows = ENABLED_ROWS

    def test_table(self) -> Any:
        """Each row's key and ssh arguments get the admin shell, a greeting that stays,
        or the reason and exit status 1."""
        return self.checkTable()

    @defer.inlineCallbacks
    def test_refusal_names_the_way_out(self) -> Any:
        """The refusal tells the user what works instead: a command, -R or -W."""
        key = self.key("laptop", options='access="listen"')
        out, err, code = yield self.ssh(key, "laptop", "-tt", command=())
        self.assertEqual(code, 1)
        text = (out + err).decode()
        self.assertIn(f"ssh -p {self.port} switchboard help", text)
        self.assertIn("ssh -R PORT:HOST:PORT", text)
        self.assertIn("ssh -W NAME:PORT", text)


class ShellDisabledTableTests(SessionTableMixin, unittest.TestCase):
    """enable_shell = false."""

    settings = {"enable_shell": "false"}
    rows = DISABLED_ROWS

    def test_table(self) -> Any:
        """With the shell disabled, an admin key on a terminal is told so and exits 1,
        unless its connection holds a virtual port (then the greeting stays)."""
        return self.checkTable()
