"""One access policy (issue 10.3): the `Access` type and `keyrules.admits`.

`admits` decides whether an authorized_keys line admits a peer, both at
login (the checker) and when the file changes (the key watcher). One table
pins the decision and both sentences (the login refusal a client is shown,
the reason a live connection is closed with); the same rows are then run
through the checker and through the watcher, so the two paths cannot drift
apart again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from twisted.trial import unittest

from nuttconch import access, admin, auth, authkeys, commands
from nuttconch.access import Access, authenticated
from nuttconch.auth import AuthorizedKeysChecker, ConnectionInfo, Identity, Refused, login_names
from nuttconch.keyrules import ADMITTED, Decision, admits
from nuttconch.server import SwitchboardFactory

from .test_threats import LogCapture

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
LINENO = 7
NOW = time.time()
PEER = "192.0.2.1"


def line(options: str) -> authkeys.AuthorizedKey:
    entry = authkeys.parse_line(f"{options} {KEY} c" if options else f"{KEY} c", LINENO)
    assert entry is not None
    return entry


@dataclass(frozen=True)
class Row:
    """One case: the line (None: no line), the circumstances, the expected decision."""

    name: str
    options: str | None
    rule: str  # "" = admitted
    reason: str = ""
    message: str = ""
    live: str = ""
    kw: dict[str, Any] = field(default_factory=dict)

    def entry(self) -> authkeys.AuthorizedKey | None:
        return None if self.options is None else line(self.options)

    def decide(self) -> Decision:
        kw = {"peer": PEER, "peer_name": None, "now": NOW, **self.kw}
        return admits(self.entry(), **kw)

    @property
    def at_login(self) -> bool:
        """Rows a login can meet: it holds no ports and the file is its only source."""
        return not ({"holds_ports", "ports", "external"} & set(self.kw))


UNUSABLE_LIVE = f"authorized_keys line {LINENO} has an option that cannot be honoured"

TABLE: list[Row] = [
    Row(
        "no line",
        None,
        "unknown",
        "unknown key",
        "this key is not authorized",
        "key removed from authorized_keys",
    ),
    Row(
        "no CA line",
        None,
        "unknown",
        "unknown CA",
        "this certificate's authority is not trusted here",
        "its certificate authority removed from authorized_keys",
        kw={"ca": True},
    ),
    Row("no line, admitted by the key command", None, "", kw={"external": True}),
    Row(
        "no CA line; the key command never speaks for a certificate",
        None,
        "unknown",
        "unknown CA",
        "this certificate's authority is not trusted here",
        "its certificate authority removed from authorized_keys",
        kw={"ca": True, "external": True},
    ),
    Row("plain line", "", ""),
    Row('access="listen"', 'access="listen"', ""),
    Row(
        "denied",
        'access="denied"',
        "denied",
        "denied",
        "this key is denied",
        "key denied in authorized_keys",
    ),
    Row(
        "denied wins over other access values",
        'access="admin",access="denied"',
        "denied",
        "denied",
        "this key is denied",
        "key denied in authorized_keys",
    ),
    Row(
        "denied CA",
        'cert-authority,access="denied"',
        "denied",
        "denied",
        "this certificate's authority is denied",
        "key denied in authorized_keys",
        kw={"ca": True},
    ),
    Row(
        "a CA line found for a plain key",
        "cert-authority",
        "not-ca",
        "unknown key",
        "this key is not authorized",
        "its certificate authority removed from authorized_keys",
    ),
    Row(
        "an unusable plain line found for a certificate's authority",
        'permitopen="zz"',
        "not-ca",
        "unknown key",
        "this key is not authorized",
        UNUSABLE_LIVE,
        kw={"ca": True},
    ),
    Row(
        "option that cannot be honoured",
        'permitopen="zz"',
        "option",
        "bad option",
        f"this key's authorized_keys line {LINENO} has an option the server cannot honour;"
        " ask its operator",
        UNUSABLE_LIVE,
    ),
    Row(
        "CA line with an option that cannot be honoured",
        'cert-authority,permitlisten="x:y"',
        "option",
        "bad option",
        f"this key's authorized_keys line {LINENO} has an option the server cannot honour;"
        " ask its operator",
        UNUSABLE_LIVE,
        kw={"ca": True},
    ),
    Row(
        "from= does not match",
        'from="10.0.0.0/8"',
        "from",
        "from",
        f"this key is not allowed from {PEER}",
        "key no longer allowed from this address",
    ),
    Row("from= matches", 'from="10.0.0.0/8"', "", kw={"peer": "10.1.2.3"}),
    Row("from= negated elsewhere", 'from="!10.0.0.0/8,*"', ""),
    Row(
        "from= host name pattern, name confirmed",
        'from="*.example.com"',
        "",
        kw={"peer_name": "h.example.com"},
    ),
    Row(
        "from= host name pattern, no name",
        'from="*.example.com"',
        "from",
        "from",
        f"this key is not allowed from {PEER}",
        "key no longer allowed from this address",
    ),
    Row(
        "expired",
        'expiry-time="20200101Z"',
        "expired",
        "expired",
        "this key expired on 2020-01-01 00:00:00 UTC",
        "key expired",
    ),
    Row("expires later", 'expiry-time="29990101Z"', ""),
    Row(
        "holds ports without initiate",
        'access="listen"',
        "initiate",
        "refused",
        "this key lacks access=initiate",
        "key lost access=initiate while holding virtual ports",
        kw={"holds_ports": True},
    ),
    Row("holds ports with initiate", 'access="initiate"', "", kw={"holds_ports": True}),
    Row("no ports, no initiate", 'access="list"', "", kw={"holds_ports": False}),
    Row(
        "a held port permitlisten no longer allows",
        'access="initiate",permitlisten="8080"',
        "listen",
        "refused",
        "this key may not forward port 9090 (permitlisten)",
        "key's options no longer allow virtual port 9090",
        kw={"holds_ports": True, "ports": [(9090, "localhost"), (8080, "localhost")]},
    ),
    Row(
        "held ports permitlisten allows",
        'access="initiate",permitlisten="8080"',
        "",
        kw={"holds_ports": True, "ports": [(8080, "localhost")]},
    ),
    Row(
        "held ports under no-port-forwarding: the lowest port is named",
        'access="initiate",no-port-forwarding',
        "listen",
        "refused",
        "this key may not forward ports (no-port-forwarding or restrict)",
        "key's options no longer allow virtual port 22",
        kw={"holds_ports": True, "ports": [(80, "*"), (22, "*")]},
    ),
    Row(
        "a CA line that names hosts",
        'cert-authority,hostname="a"',
        "ca-names",
        "bad option",
        f"authorized_keys line {LINENO}: a cert-authority line cannot give hostname= or"
        " alias= (every certificate would share them)",
        "the certificate authority's line now gives hostname= or alias=",
        kw={"ca": True},
    ),
    Row("a plain line may name its host", 'hostname="a",alias="b"', ""),
    Row("a CA line", "cert-authority", "", kw={"ca": True}),
    # Order: the first rule that refuses is the one reported, on both paths.
    Row(
        "denied before from=",
        'access="denied",from="10.0.0.0/8"',
        "denied",
        "denied",
        "this key is denied",
        "key denied in authorized_keys",
    ),
    Row(
        "unusable option before from=",
        'from="10.0.0.0/8",permitopen="zz"',
        "option",
        "bad option",
        f"this key's authorized_keys line {LINENO} has an option the server cannot honour;"
        " ask its operator",
        UNUSABLE_LIVE,
    ),
    Row(
        "from= before expiry",
        'from="10.0.0.0/8",expiry-time="20200101Z"',
        "from",
        "from",
        f"this key is not allowed from {PEER}",
        "key no longer allowed from this address",
    ),
    Row(
        "expiry before held ports",
        'access="listen",expiry-time="20200101Z"',
        "expired",
        "expired",
        "this key expired on 2020-01-01 00:00:00 UTC",
        "key expired",
        kw={"holds_ports": True, "ports": [(1, "*")]},
    ),
    Row(
        "held ports before a CA line's names",
        'cert-authority,hostname="a",no-port-forwarding',
        "initiate",
        "refused",
        "this key lacks access=initiate",
        "key lost access=initiate while holding virtual ports",
        kw={"ca": True, "holds_ports": True, "ports": [(1, "*")]},
    ),
]


class AdmitsTableTests(unittest.TestCase):
    """`admits` against the table: decision, rule, and both sentences."""

    def test_table(self) -> None:
        """Every row gets exactly the decision and the words the table pins."""
        for row in TABLE:
            got = row.decide()
            self.assertEqual(
                (got.admitted, got.rule, got.reason, got.message, got.live),
                (row.rule == "", row.rule, row.reason, row.message, row.live),
                row.name,
            )

    def test_admitted_is_truthy_refused_is_not(self) -> None:
        """A Decision tests as its outcome, so callers can write ``if not decision``."""
        self.assertTrue(ADMITTED)
        self.assertFalse(Decision(False, "denied"))

    def test_table_covers_every_rule(self) -> None:
        """Each rule admits can report appears in the table at least once."""
        rules = {row.rule for row in TABLE} - {""}
        self.assertEqual(
            rules,
            {"unknown", "denied", "not-ca", "option", "from", "expired", "initiate", "listen"}
            | {"ca-names"},
        )


class LoginPathTests(unittest.TestCase):
    """The checker refuses a login with the decision's message and reason."""

    def test_checker_follows_the_table(self) -> None:
        """Every row a login can meet: refused with the row's words, or let through."""
        for row in TABLE:
            if not row.at_login:
                continue
            kw = row.kw
            info = ConnectionInfo(peer=kw.get("peer", PEER), peer_name=kw.get("peer_name"))
            enforce = AuthorizedKeysChecker._enforce
            if row.rule == "":
                enforce(row.entry(), info, NOW, ca=kw.get("ca", False))
                continue
            with self.assertRaises(Refused, msg=row.name) as caught:
                enforce(row.entry(), info, NOW, ca=kw.get("ca", False))
            self.assertEqual(
                (caught.exception.message, caught.exception.reason),
                (row.message, row.reason),
                row.name,
            )

    def test_unusable_option_is_logged_for_the_operator(self) -> None:
        """The client hears "ask its operator"; the operator's log says which option."""
        logs = LogCapture().start(self)
        info = ConnectionInfo(peer=PEER, conn_id=42)
        with self.assertRaises(Refused):
            AuthorizedKeysChecker._enforce(line('permitopen="zz"'), info, NOW)
        [logged] = [x for x in logs.lines() if "conn 42:" in x]
        self.assertIn(f"authorized_keys line {LINENO}: permitopen 'zz' needs a port", logged)
        self.assertTrue(logged.endswith("refused"), logged)


SECRET = b"s" * 32


class _Avatar:
    """What the key watcher reads of a live connection."""

    def __init__(self, row: Row, entry: authkeys.AuthorizedKey | None) -> None:
        kw = row.kw
        blob = line("").blob
        hostname, aliases = login_names(SECRET, "host", blob, None if kw.get("ca") else entry)
        self.identity = Identity(
            username="host",
            hostname=hostname,
            aliases=aliases,
            access=Access(),
            fingerprint="SHA256:x",
            key_blob=blob,
            peer=kw.get("peer", PEER),
            peer_name=kw.get("peer_name"),
            external=kw.get("external", False),
            certificate=object() if kw.get("ca") else None,  # type: ignore[arg-type]
        )
        self._holds = kw.get("holds_ports", False)
        ports = kw.get("ports")
        self.listener = None if ports is None else SimpleNamespace(ports=dict(ports))

    def holdsPorts(self) -> bool:
        return self._holds


class LivePathTests(unittest.TestCase):
    """The key watcher closes a live connection with the decision's live sentence."""

    def test_watcher_follows_the_table(self) -> None:
        """Every refusing row closes with the row's live words; admitted plain rows stay."""
        factory = SimpleNamespace(checker=SimpleNamespace(secret=SECRET))
        for row in TABLE:
            if row.rule == "" and row.kw.get("ca"):
                continue  # a certificate login's own policy needs a real certificate
            entry = row.entry()
            why = SwitchboardFactory._stillAuthorized(factory, _Avatar(row, entry), entry)  # type: ignore[arg-type]
            self.assertEqual(why, row.live or None, row.name)

    def test_watcher_still_compares_names(self) -> None:
        """Names are not a line rule: a hostname= change still closes the connection."""
        factory = SimpleNamespace(checker=SimpleNamespace(secret=SECRET))
        row = Row("plain", "", "")
        avatar = _Avatar(row, row.entry())
        why = SwitchboardFactory._stillAuthorized(factory, avatar, line('hostname="other"'))  # type: ignore[arg-type]
        self.assertEqual(why, "key's hostname changed")


class AccessTypeTests(unittest.TestCase):
    """One type and one list of access values, shared by every module."""

    def test_known_keeps_only_known_values(self) -> None:
        """Unknown values in a line grant nothing; order and repeats do not matter."""
        for values, expected in [
            ((), set()),
            (("initiate", "listen"), {"initiate", "listen"}),
            (("admin", "bogus", "admin"), {"admin"}),
            (("hop",), set()),
            (("denied", "list"), {"denied", "list"}),
        ]:
            got = Access.known(values)
            self.assertIsInstance(got, Access)
            self.assertEqual(got, frozenset(expected), values)

    def test_granted_drops_denied(self) -> None:
        """``denied`` marks a line; it is not something a login may do."""
        for values, granted, denied in [
            ({"denied"}, set(), True),
            ({"denied", "admin"}, {"admin"}, True),
            ({"initiate"}, {"initiate"}, False),
        ]:
            got = Access(values)
            self.assertEqual(got.denied, denied)
            self.assertEqual(got.granted(), frozenset(granted))
            self.assertIsInstance(got.granted(), Access)

    def test_describe_is_the_log_form(self) -> None:
        """Sorted, comma-joined, "none" when empty: what log lines always said."""
        self.assertEqual(Access({"listen", "admin"}).describe(), "admin,listen")
        self.assertEqual(Access().describe(), "none")

    def test_behaves_as_a_frozenset(self) -> None:
        """Equality, hashing, membership and sorting are a frozenset's."""
        a = Access({"list", "admin"})
        self.assertEqual(a, frozenset({"admin", "list"}))
        self.assertEqual(hash(a), hash(frozenset({"admin", "list"})))
        self.assertIn("list", a)
        self.assertEqual(sorted(a), ["admin", "list"])

    def test_one_list_everywhere(self) -> None:
        """auth, authkeys, admin and commands use access's values, not their own copies."""
        self.assertIs(authkeys.ACCESS_VALUES, access.VALUES)
        self.assertIs(authkeys.TOFU_ACCESS, access.TOFU)
        self.assertIs(auth.ALL_ACCESS, access.ALL)
        self.assertIs(admin.GRANTABLE, access.GRANTABLE)
        self.assertEqual(access.GRANTABLE, ("admin", "initiate", "list", "listen"))
        self.assertEqual(access.VALUES, access.ALL | {"denied"})
        for command in commands.COMMANDS.values():
            self.assertIsInstance(command.needs, Access)
            self.assertLessEqual(command.needs, access.ALL)

    def test_a_line_gives_access(self) -> None:
        """An authorized_keys line's ``access`` is an Access."""
        entry = line('access="list",access="admin"')
        self.assertIsInstance(entry.access, Access)
        self.assertEqual(entry.access, {"list", "admin"})


class AuthenticatedTests(unittest.TestCase):
    """One spelling of "this transport finished user authentication"."""

    def test_authenticated(self) -> None:
        """True exactly when Conch has set ``avatar`` on the transport."""

        class T:
            pass

        t = T()
        self.assertFalse(authenticated(t))
        t.avatar = object()  # type: ignore[attr-defined]
        self.assertTrue(authenticated(t))
        self.assertFalse(authenticated(object()))  # no __dict__ at all

    def test_transport_property(self) -> None:
        """SwitchboardTransport.isAuthenticated says the same."""
        from nuttconch.transport import SwitchboardTransport

        t = SwitchboardTransport()
        self.assertFalse(t.isAuthenticated)
        t.avatar = object()
        self.assertTrue(t.isAuthenticated)
