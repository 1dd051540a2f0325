"""Key options (issue 12.1, 12.2): expiry-time, permitopen, permitlisten, no-port-forwarding,
pty/no-pty, restrict, command=, from= host names, and the admin ``keys`` view.

Table-driven unit tests of `nuttconch.policy` and the from= matcher, then the
same rules end to end with the real OpenSSH client against an in-process server.
"""

from __future__ import annotations

import calendar
import json
import os
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from nuttconch import authkeys
from nuttconch.hostnames import VerifiedNames, forward_confirmed_name
from nuttconch.policy import KeyPolicy, PolicyError, glob_match, parse_expiry

from .harness import SwitchboardTestMixin, listen_echo
from .test_threats import LogCapture

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def policy_of(options: str) -> KeyPolicy:
    entry = authkeys.parse_line(f"{options} {KEY} c" if options else f"{KEY} c")
    assert entry is not None
    return entry.policy


def utc_stamp(offset: float) -> str:
    """An expiry-time ``offset`` seconds from now, in UTC (``...Z``)."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + offset))


# (options, expected KeyPolicy fields) -- file order decides, as in sshd.
POLICY_TABLE: list[tuple[str, dict[str, Any]]] = [
    ("", {"port_forwarding": True, "pty": True, "permit_open": None, "command": None}),
    ('access="listen"', {"port_forwarding": True, "pty": True}),
    ("restrict", {"port_forwarding": False, "pty": False}),
    ("restrict,pty", {"port_forwarding": False, "pty": True}),
    ("pty,restrict", {"port_forwarding": False, "pty": False}),
    ("restrict,port-forwarding", {"port_forwarding": True, "pty": False}),
    ("no-port-forwarding", {"port_forwarding": False, "pty": True}),
    ("no-port-forwarding,port-forwarding", {"port_forwarding": True}),
    ("no-pty", {"pty": False, "port_forwarding": True}),
    ('no-agent-forwarding,no-x11-forwarding,no-user-rc,tunnel="0"', {"port_forwarding": True}),
    ('command="whoami"', {"command": "whoami"}),
    ('command="listeners --json"', {"command": "listeners --json"}),
    ('expiry-time="20300101Z"', {"expires": calendar.timegm((2030, 1, 1, 0, 0, 0))}),
    ('expiry-time="203001021304Z"', {"expires": calendar.timegm((2030, 1, 2, 13, 4, 0))}),
    ('expiry-time="20300102130405Z"', {"expires": calendar.timegm((2030, 1, 2, 13, 4, 5))}),
    ('permitopen="none"', {"permit_open": ()}),
    (
        'permitlisten="8080",permitlisten="localhost:9090"',
        {"permit_listen_text": "*:8080,localhost:9090"},
    ),
    ('permitopen="gw*:22",permitopen="db~1:*"', {"permit_open_text": "gw*:22,db~1:*"}),
]

# (options, substring of the PolicyError): the line must admit nobody.
POLICY_ERRORS: list[tuple[str, str]] = [
    ('environment="A=b"', "environment= cannot be honoured"),
    ("verify-required", "verify-required cannot be honoured"),
    ('command="ls -la"', "not a nuttconch command"),
    ('command="whoami \'unterminated"', "cannot be parsed"),
    ('command="whoami",command="listeners"', "given twice"),
    ('expiry-time="20301399"', "not a real date"),
    ('expiry-time="20300101",expiry-time="20310101"', "given twice"),
    ('permitopen="gw1"', "needs a port"),
    ('permitopen="gw1:99999"', "not 1-65535"),
    ('permitopen="gw1:0"', "not 1-65535"),
    ('permitopen="[::1]:22"', "does not name a switchboard name"),
    ('permitopen="a b:22"', "does not name a switchboard name"),
    ('permitopen="' + "x" * 200 + ':22"', "does not name a switchboard name"),
    ('permitopen="gw1:22,"', "empty entry"),
    ('permitlisten="http"', "not 1-65535"),
    ('permitlisten="0"', "not 1-65535"),
    ('permitopen="' + ",".join(f"h{i}:1" for i in range(300)) + '"', "more than 256"),
]

# (options, target as the client writes it, port, allowed)
OPEN_TABLE: list[tuple[str, str, int, bool]] = [
    ("", "anything", 1, True),
    ('permitopen="gw1:22"', "gw1", 22, True),
    ('permitopen="gw1:22"', "GW1", 22, True),
    ('permitopen="gw1:22"', "gw1", 23, False),
    ('permitopen="gw1:22"', "gw2", 22, False),
    ('permitopen="gw1:22"', "gw1~1", 22, True),
    ('permitopen="gw1~1:22"', "gw1~1", 22, True),
    ('permitopen="gw1~1:22"', "gw1", 22, False),
    ('permitopen="gw1~0:22"', "gw1", 22, True),
    ('permitopen="gw*:*"', "gw-lab", 5432, True),
    ('permitopen="gw*:*"', "db", 5432, False),
    ('permitopen="gw?:80"', "gw7", 80, True),
    ('permitopen="gw?:80"', "gw77", 80, False),
    ('permitopen="a:1",permitopen="b:2"', "b", 2, True),
    ('permitopen="a:1",permitopen="b:2"', "b", 1, False),
    ('permitopen="none"', "gw1", 22, False),
    ('permitopen="*:*"', "x", 9, True),
    ("no-port-forwarding", "gw1", 22, False),
    ('restrict,permitopen="gw1:22"', "gw1", 22, False),
    ('restrict,port-forwarding,permitopen="gw1:22"', "gw1", 22, True),
]

# (options, bind host, port, allowed, what -R 0 may get: None any, else the ports)
LISTEN_TABLE: list[tuple[str, str, int, bool, tuple[int, ...] | None]] = [
    ("", "localhost", 8080, True, None),
    ('permitlisten="8080"', "localhost", 8080, True, (8080,)),
    ('permitlisten="8080"', "myalias", 8080, True, (8080,)),
    ('permitlisten="8080"', "localhost", 8081, False, (8080,)),
    ('permitlisten="localhost:8080"', "localhost", 8080, True, (8080,)),
    ('permitlisten="localhost:8080"', "other", 8080, False, ()),
    ('permitlisten="*"', "localhost", 12345, True, None),
    ('permitlisten="8080",permitlisten="9090"', "localhost", 9090, True, (8080, 9090)),
    ('permitlisten="none"', "localhost", 8080, False, ()),
    ("no-port-forwarding", "localhost", 8080, False, None),
    ("restrict", "localhost", 8080, False, None),
]


class PolicyTableTests(unittest.TestCase):
    """KeyPolicy built from a line's options, and the questions the server asks it."""

    def test_policy_from_options(self) -> None:
        """Each options field gives the policy sshd would, applied in file order."""
        for options, expected in POLICY_TABLE:
            policy = policy_of(options)
            for name, value in expected.items():
                if name == "permit_listen_text":
                    got: Any = ",".join(map(str, policy.permit_listen or ()))
                elif name == "permit_open_text":
                    got = ",".join(map(str, policy.permit_open or ()))
                else:
                    got = getattr(policy, name)
                self.assertEqual(got, value, f"{options}: {name}")

    def test_unhonourable_options(self) -> None:
        """An option nuttconch cannot honour makes the line's policy an error, never a
        silent no-op; the grammar still reads the line (nothing is lost on rewrite)."""
        for options, message in POLICY_ERRORS:
            entry = authkeys.parse_line(f"{options} {KEY} c")
            assert entry is not None
            self.assertIsNotNone(entry.policy_error, options)
            self.assertIn(message, entry.policy_error or "", options)
            self.assertRaises(PolicyError, lambda e=entry: e.policy)
            self.assertEqual(authkeys.parse_line(authkeys.serialise(entry)), entry)

    def test_open_rules(self) -> None:
        """permitopen: name globs, name~N, * for any port, repeatable; restrict wins."""
        for options, target, port, allowed in OPEN_TABLE:
            why = policy_of(options).open_refusal(target, port)
            self.assertEqual(why is None, allowed, f"{options} {target}:{port}: {why}")

    def test_listen_rules(self) -> None:
        """permitlisten: ports (and bind names) an initiator may hold; -R 0 stays inside."""
        for options, host, port, allowed, choices in LISTEN_TABLE:
            policy = policy_of(options)
            why = policy.listen_refusal(host, port)
            self.assertEqual(why is None, allowed, f"{options} {host}:{port}: {why}")
            if policy.port_forwarding:
                self.assertEqual(policy.listen_choices(host), choices, options)

    def test_command_names_agree(self) -> None:
        """command= accepts exactly the commands the server has."""
        from nuttconch import commands, policy

        self.assertEqual(policy.COMMAND_NAMES, frozenset(commands.COMMANDS))

    def test_expiry(self) -> None:
        """expiry-time is local time unless it ends in Z; expired from that second on."""
        self.assertEqual(parse_expiry("20300101Z"), calendar.timegm((2030, 1, 1, 0, 0, 0)))
        self.assertEqual(parse_expiry("20300101"), time.mktime((2030, 1, 1, 0, 0, 0, 0, 0, -1)))
        policy = policy_of('expiry-time="20300101Z"')
        self.assertFalse(policy.expired(calendar.timegm((2029, 12, 31, 23, 59, 59))))
        self.assertTrue(policy.expired(calendar.timegm((2030, 1, 1, 0, 0, 0))))
        for bad in ("2030", "20300230", "203001012560", "20300101z"):
            self.assertRaises(PolicyError, parse_expiry, bad)

    def test_narrowed(self) -> None:
        """A certificate's options only ever narrow a cert-authority line's."""
        line = policy_of('permitopen="gw1:22",permitopen="gw2:22",expiry-time="20300101Z"')
        cert = policy_of('no-pty,permitopen="gw2:22",expiry-time="20290101Z",command="whoami"')
        both = line.narrowed(cert)
        self.assertEqual([str(r) for r in both.permit_open or ()], ["gw2:22"])
        self.assertFalse(both.pty)
        self.assertEqual(both.expires, calendar.timegm((2029, 1, 1, 0, 0, 0)))
        self.assertEqual(both.command, "whoami")
        self.assertRaises(PolicyError, policy_of('command="stats"').narrowed, cert)

    def test_glob_match(self) -> None:
        """* and ? only; linear time, so hostile patterns cost nothing."""
        table = [
            ("*", "", True),
            ("a*", "abc", True),
            ("*c", "abc", True),
            ("a?c", "abc", True),
            ("a?c", "ac", False),
            ("*.lan", "box.lan", True),
            ("*.lan", "box.lan.evil", False),
            ("a*b*c", "axxbyyc", True),
            ("a*b*c", "axxbyy", False),
            ("[ab]", "a", False),
        ]
        for pattern, text, expected in table:
            self.assertEqual(glob_match(pattern, text), expected, (pattern, text))

    def test_hostile_from_glob_is_cheap(self) -> None:
        """A from= glob of many ``*a`` against a long host name: a regex took 3.9 s of CPU
        for 7 stars (31 s for 8); matched without backtracking it takes microseconds."""
        started = time.process_time()
        self.assertFalse(authkeys.match_from("*a" * 7 + "b", "10.0.0.1", "a" * 63))
        self.assertFalse(authkeys.match_from("*a" * 400 + "b", "10.0.0.1", "a" * 253))
        self.assertLess(time.process_time() - started, 0.5)

    def test_hostname_patterns(self) -> None:
        """Only patterns that can match nothing but a name cost a DNS lookup."""
        table = [
            ("localhost", True),
            ("*.example", True),
            ("!*.evil.com", True),
            ("local*", True),
            ("127.0.0.1", False),
            ("10.0.0.0/8", False),
            ("192.168.*", False),
            ("fe80::*", False),
            ("*", False),
        ]
        for pattern, expected in table:
            self.assertEqual(authkeys.is_hostname_pattern(pattern), expected, pattern)

    def test_from_with_verified_name(self) -> None:
        """from= hostname globs match the verified name; without one they match nothing."""
        table = [
            ("localhost", "localhost", True),
            ("localhost", None, False),
            ("*.example,local*", "localhost", True),
            ("*.example,local*", None, False),
            ("127.0.0.1,!localhost", "localhost", False),
            ("127.0.0.1,!localhost", None, True),
            ("*.lan", "127.0.0.1", False),  # a PTR that is an address proves nothing
        ]
        for patterns, name, expected in table:
            self.assertEqual(authkeys.match_from(patterns, "127.0.0.1", name), expected, patterns)

    def test_policy_error_line_denies_the_key(self) -> None:
        """A key with an unhonourable line is denied even if another line admits it."""
        text = f'access="listen" {KEY} a\nenvironment="X=1" {KEY} b\n'
        entries, errors = authkeys.parse_text(text)
        self.assertEqual(errors, [])
        found = authkeys._resolve(entries, {}, entries[0].blob)
        assert found is not None
        self.assertEqual(found.lineno, 2)


class VerifiedNamesTests(unittest.TestCase):
    """Reverse name confirmed by a forward lookup: asynchronous, bounded, cached."""

    def test_localhost_from_etc_hosts(self) -> None:
        """127.0.0.1 is localhost in /etc/hosts, both ways."""
        self.assertEqual(forward_confirmed_name("127.0.0.1"), "localhost")
        self.assertEqual(forward_confirmed_name("::ffff:127.0.0.1"), "localhost")

    def test_unconfirmed_name_is_none(self) -> None:
        """An address whose name does not resolve back to it gets no name."""
        self.assertIsNone(forward_confirmed_name("192.0.2.1"))  # TEST-NET: no PTR

    @defer.inlineCallbacks
    def test_slow_lookup_times_out_and_is_cached(self) -> Any:
        """A resolver that hangs is given up on after the timeout; the miss is cached."""
        calls: list[str] = []

        def slow(address: str) -> str | None:
            calls.append(address)
            time.sleep(1.0)
            return "late.example"

        names = VerifiedNames(reactor, timeout=0.2, ttl=60.0, resolve=slow)
        self.addCleanup(names.stop)
        started = time.monotonic()
        results = yield defer.gatherResults([names.lookup("10.1.1.1"), names.lookup("10.1.1.1")])
        self.assertEqual(results, [None, None])
        self.assertLess(time.monotonic() - started, 0.9)
        again = yield names.lookup("10.1.1.1")
        self.assertIsNone(again)
        self.assertEqual(calls, ["10.1.1.1"])
        self.assertEqual(names.timeouts, 1)

    @defer.inlineCallbacks
    def test_cache_expires(self) -> Any:
        """A cached name is reused within its ttl and looked up again after it."""
        clock = task.Clock()
        calls: list[str] = []

        def resolve(address: str) -> str | None:
            calls.append(address)
            return "box.lan"

        names = VerifiedNames(reactor, ttl=10.0, resolve=resolve, clock=clock.seconds)
        self.addCleanup(names.stop)
        self.assertEqual((yield names.lookup("10.0.0.5")), "box.lan")
        self.assertEqual((yield names.lookup("10.0.0.5")), "box.lan")
        self.assertEqual(len(calls), 1)
        clock.advance(11)
        self.assertEqual((yield names.lookup("10.0.0.5")), "box.lan")
        self.assertEqual(len(calls), 2)


class OptionsEndToEndTests(SwitchboardTestMixin, unittest.TestCase):
    """Each option with the real OpenSSH client."""

    settings = {"allow_new_clients": "false"}

    def setUp(self) -> Any:
        d = super().setUp()
        self.logs = LogCapture().start(self)
        return d

    def readKeys(self) -> bytes:
        with open(self.akfile, "rb") as handle:
            return handle.read()

    @defer.inlineCallbacks
    def startInitiator(self, options: str = 'access="initiate"', port: int = 6100) -> Any:
        target = listen_echo(self, b"device:")
        key = self.key(f"init{port}", options=options)
        proc = yield self.initiator(key, "gw", f"{port}:127.0.0.1:{target}")
        return proc

    @defer.inlineCallbacks
    def test_expired_key_is_refused(self) -> Any:
        """A key past its expiry-time is refused with a message saying it expired."""
        key = self.key("old", options='access="listen",expiry-time="20200101Z"')
        out, err, code = yield self.ssh(key, "old", command=("whoami",))
        self.assertEqual(code, 255, err)
        self.assertIn(b"nuttconch: this key expired on 2020-01-01 00:00:00 UTC", err)
        fresh = self.key("fresh", options=f'access="listen",expiry-time="{utc_stamp(3600)}"')
        out, err, code = yield self.ssh(fresh, "fresh", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"restrictions: expires ", out)

    @defer.inlineCallbacks
    def test_connection_dropped_when_key_expires(self) -> Any:
        """An initiator whose key expires while connected is dropped and its port freed,
        without any change to the file."""
        key = self.key("soon", options=f'access="initiate",expiry-time="{utc_stamp(3)}"')
        target = listen_echo(self)
        proc = yield self.initiator(key, "soon", f"6200:127.0.0.1:{target}")
        out, err, code = yield defer.Deferred.addTimeout(proc.ended, 15, reactor)
        self.assertEqual(code, 255, err)
        self.assertIn(b"key expired", err)
        self.assertEqual(self.registry.listeners(), [])
        self.assertTrue(any("key expired" in line for line in self.logs.lines()))

    @defer.inlineCallbacks
    def test_permitopen(self) -> Any:
        """A client key with permitopen reaches only the names and ports it lists."""
        yield self.startInitiator()
        name = self.registry.listeners()[0].connect_name
        ok = self.key("ok", options='access="listen",permitopen="gw-*:6100"')
        wrongport = self.key("wp", options='access="listen",permitopen="gw-*:22"')
        other = self.key("other", options='access="listen",permitopen="db*:*"')
        client = self.spawn(ok, "c", "-W", f"{name}:6100", stdin=None)
        yield client.waitOutput(b"device:")
        assert client.transport is not None
        client.transport.write(b"ping")
        yield client.waitOutput(b"ping")
        for key in (wrongport, other):
            out, err, code = yield self.ssh(key, "c", "-W", f"{name}:6100")
            self.assertEqual(code, 255, err)
            self.assertIn(b"administratively prohibited", err)
            self.assertIn(b"(permitopen)", err)

    @defer.inlineCallbacks
    def test_permitlisten(self) -> Any:
        """An initiator key holds only the ports permitlisten lists; -R 0 gets one of them."""
        target = listen_echo(self)
        key = self.key("pl", options='access="initiate",permitlisten="6300",permitlisten="6301"')
        out, err, code = yield self.ssh(key, "pl", "-N", "-R", f"6999:127.0.0.1:{target}")
        self.assertEqual(code, 255, err)
        self.assertIn(b"remote port forwarding failed for listen port 6999", err)
        proc = self.spawn(key, "pl", "-N", "-R", f"0:127.0.0.1:{target}", stdin=None)
        yield proc.waitOutput(b"Allocated port 6300")
        yield self.waitPort(6300)
        self.assertTrue(any("permitlisten" in line for line in self.logs.lines()))

    @defer.inlineCallbacks
    def test_no_port_forwarding_and_restrict(self) -> Any:
        """no-port-forwarding and restrict refuse -R and -W whatever access= says;
        restrict,port-forwarding gives them back."""
        yield self.startInitiator()
        name = self.registry.listeners()[0].connect_name
        target = listen_echo(self)
        for i, options in enumerate(("no-port-forwarding", "restrict")):
            key = self.key(f"npf{i}", options=f'access="listen",access="initiate",{options}')
            out, err, code = yield self.ssh(key, "x", "-N", "-R", f"6400:127.0.0.1:{target}")
            self.assertEqual(code, 255, err)
            self.assertIn(b"remote port forwarding failed", err)
            out, err, code = yield self.ssh(key, "x", "-W", f"{name}:6100")
            self.assertEqual(code, 255, err)
            self.assertIn(b"this key may not open circuits (no-port-forwarding or restrict)", err)
        back = self.key("back", options='access="listen",restrict,port-forwarding')
        client = self.spawn(back, "c", "-W", f"{name}:6100", stdin=None)
        yield client.waitOutput(b"device:")

    @defer.inlineCallbacks
    def test_pty_options(self) -> Any:
        """no-pty and restrict refuse a pty (the admin shell needs one); restrict,pty gets it."""
        for options, gets in (("no-pty", False), ("restrict", False), ("restrict,pty", True)):
            key = self.key(f"pty-{options}", options=f'access="admin",{options}')
            proc = self.spawn(key, "adm", "-tt", stdin=None)
            if gets:
                yield proc.waitOutput(b"nuttconch> ")
            else:
                yield proc.waitOutput(b"PTY allocation request failed")
            yield proc.kill()

    @defer.inlineCallbacks
    def test_forced_command(self) -> Any:
        """command= is the only command a key's sessions run, for exec and shell alike."""
        key = self.key("forced", options='access="listen",command="whoami"')
        out, err, code = yield self.ssh(key, "f", command=("listeners",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: f\n", out)
        self.assertIn(b"restrictions: command 'whoami'", out)
        out, err, code = yield self.ssh(key, "f", "-T")
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: f\n", out)
        self.assertTrue(any("command= of the key" in line for line in self.logs.lines()))

    @defer.inlineCallbacks
    def test_unhonourable_option_denies_the_line(self) -> Any:
        """environment= (no process runs) refuses the key, logged with its line number."""
        self.key("env", options='access="listen",environment="X=1"')
        key = os.path.join(self.dir, "env")
        out, err, code = yield self.ssh(key, "e", command=("whoami",))
        self.assertEqual(code, 255, err)
        self.assertIn(b"has an option the server cannot honour", err)
        self.factory.checkKeys()
        lines = [x for x in self.logs.lines() if "line 1" in x and "environment=" in x]
        self.assertTrue(lines, self.logs.lines())

    @defer.inlineCallbacks
    def test_live_change_applies(self) -> Any:
        """A permitlisten added to a connected initiator's line that excludes its port
        drops it; an expiry-time in the past drops a client too."""
        target = listen_echo(self)
        key = self.key("live", options='access="initiate"')
        proc = yield self.initiator(key, "live", f"6500:127.0.0.1:{target}")
        other = self.key("cli", options='access="listen"')
        client = self.spawn(other, "cli", "-N", stdin=None)
        yield self.waitFor(lambda: len(self.factory.avatars) == 2, what="two logins")
        text = self.readKeys().decode()
        text = text.replace('access="initiate" ', 'access="initiate",permitlisten="6600" ')
        text = text.replace('access="listen" ', 'access="listen",expiry-time="20200101" ')
        with open(self.akfile + ".new", "w") as handle:
            handle.write(text)
        os.replace(self.akfile + ".new", self.akfile)
        self.factory.checkKeys()
        out, err, code = yield defer.Deferred.addTimeout(proc.ended, 15, reactor)
        self.assertIn(b"no longer allow virtual port 6500", err)
        out, err, code = yield defer.Deferred.addTimeout(client.ended, 15, reactor)
        self.assertIn(b"key expired", err)


class HostnameEndToEndTests(SwitchboardTestMixin, unittest.TestCase):
    """from= host names, with use_dns on (the default) and off."""

    settings = {"allow_new_clients": "false"}

    @defer.inlineCallbacks
    def test_from_localhost(self) -> Any:
        """from="localhost" and from="*.example,local*" admit 127.0.0.1 (localhost in
        /etc/hosts); a name that is not the client's refuses it."""
        cases = [
            ('from="localhost"', True),
            ('from="*.example,local*"', True),
            ('from="*.example"', False),
            ('from="127.0.0.1,!localhost"', False),
        ]
        for i, (options, allowed) in enumerate(cases):
            key = self.key(f"h{i}", options=f'access="listen",{options}')
            out, err, code = yield self.ssh(key, "h", command=("whoami",))
            if allowed:
                self.assertEqual(code, 0, f"{options}: {err!r}")
            else:
                self.assertEqual(code, 255, options)
                self.assertIn(b"this key is not allowed from 127.0.0.1", err, options)

    @defer.inlineCallbacks
    def test_lookups_only_for_hostname_patterns(self) -> Any:
        """Keys without a hostname pattern never cost a lookup; a name is looked up once
        and then served from the cache."""
        names = self.factory.checker.names
        plain = self.key("plain", options='access="listen"')
        addr = self.key("addr", options='access="listen",from="127.0.0.0/8,127.0.0.*"')
        named = self.key("named", options='access="listen",from="localhost"')
        for key in (plain, addr):
            out, err, code = yield self.ssh(key, "p", command=("whoami",))
            self.assertEqual(code, 0, err)
        self.assertEqual(names.lookups, 0)
        for _ in range(2):
            out, err, code = yield self.ssh(named, "n", command=("whoami",))
            self.assertEqual(code, 0, err)
        self.assertEqual(names.lookups, 1)

    @defer.inlineCallbacks
    def test_slow_reverse_lookup_blocks_nobody(self) -> Any:
        """THREATS 14: a PTR lookup that hangs stalls no other login; the key that needs
        it is refused once the lookup times out (an unconfirmed name matches nothing)."""
        names = self.factory.checker.names
        release: list[bool] = []

        def hanging(address: str) -> str | None:
            while not release and time.monotonic() - started < 20:
                time.sleep(0.05)
            return "box.lan"

        self.addCleanup(release.append, True)
        names.resolve = hanging
        names.timeout = 3.0
        started = time.monotonic()
        slow = self.key("slow", options='access="listen",from="*.lan"')
        fast = self.key("fast", options='access="listen"')
        waiting = self.ssh(slow, "s", command=("whoami",))
        yield self.waitFor(lambda: names.lookups == 1, what="the lookup to start")
        before = time.monotonic()
        out, err, code = yield self.ssh(fast, "f", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertLess(time.monotonic() - before, 2.5)
        self.assertFalse(waiting.called)
        out, err, code = yield waiting
        self.assertEqual(code, 255, err)
        self.assertIn(b"this key is not allowed from 127.0.0.1", err)
        self.assertEqual(names.timeouts, 1)

    @defer.inlineCallbacks
    def test_hostname_pattern_added_while_connected(self) -> Any:
        """A from= hostname pattern added to a connected key's line is judged on the
        looked-up name: localhost keeps the connection, *.example drops it."""
        key = self.key("live", options='access="listen"')
        proc = self.spawn(key, "live", "-N", stdin=None)
        yield self.waitFor(lambda: len(self.factory.avatars) == 1, what="the login")
        avatar = next(iter(self.factory.avatars))
        self.rewrite('access="listen"', 'access="listen",from="localhost"')
        yield self.waitFor(lambda: avatar.info.names_checked, what="the name lookup")
        yield self.waitFor(
            lambda: avatar.identity.peer_name == "localhost", what="the verified name"
        )
        self.assertIsNone(proc.code)
        self.rewrite('from="localhost"', 'from="*.example"')
        out, err, code = yield defer.Deferred.addTimeout(proc.ended, 15, reactor)
        self.assertIn(b"key no longer allowed from this address", err)

    def rewrite(self, old: str, new: str) -> None:
        with open(self.akfile) as handle:
            text = handle.read()
        with open(self.akfile + ".new", "w") as handle:
            handle.write(text.replace(old, new))
        os.replace(self.akfile + ".new", self.akfile)
        self.factory.checkKeys()

    @defer.inlineCallbacks
    def test_use_dns_off(self) -> Any:
        """With use_dns = false, hostname patterns match nothing (addresses still do)."""
        yield self.stopServer()
        self.startServer(use_dns="false")
        name = self.key("n", options='access="listen",from="localhost"')
        addr = self.key("a", options='access="listen",from="127.0.0.1"')
        out, err, code = yield self.ssh(name, "n", command=("whoami",))
        self.assertEqual(code, 255, err)
        self.assertIn(b"not allowed from 127.0.0.1", err)
        out, err, code = yield self.ssh(addr, "a", command=("whoami",))
        self.assertEqual(code, 0, err)


class KeysCommandTests(SwitchboardTestMixin, unittest.TestCase):
    """The admin keys view, and grant/ban keeping every other option."""

    settings = {"allow_new_clients": "false"}

    def setUp(self) -> Any:
        d = super().setUp()
        self.root = self.key("root", options='access="admin"')
        return d

    def admin(self, *argv: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        return self.ssh(self.root, "root", command=argv)

    @defer.inlineCallbacks
    def test_keys_shows_status(self) -> Any:
        """keys shows each line's options and whether it is in force."""
        self.key("exp", options='access="listen",expiry-time="20200101Z"')
        self.key("env", options='environment="A=b"')
        self.key("ok", options='access="listen",permitopen="gw1:22"')
        with open(self.akfile, "a") as handle:
            handle.write('access="listen ssh-ed25519 AAAA broken\n')
        out, err, code = yield self.admin("keys", "--json")
        self.assertEqual(code, 0, err)
        rows = {row["line"]: row for row in json.loads(out)}
        self.assertEqual(rows[1]["status"], "in force")
        self.assertEqual(rows[2]["status"], "expired 2020-01-01 00:00:00 UTC")
        self.assertIn("invalid: environment= cannot be honoured", rows[3]["status"])
        self.assertEqual(rows[4]["options"], 'access="listen",permitopen="gw1:22"')
        self.assertEqual(rows[4]["restrictions"], ["permitopen gw1:22"])
        self.assertIn("invalid:", rows[5]["status"])
        self.assertIn("line ignored", rows[5]["status"])
        out, err, code = yield self.admin("keys")
        self.assertIn(b"STATUS", out)
        self.assertIn(b"expired 2020-01-01", out)

    @defer.inlineCallbacks
    def test_grant_and_ban_keep_options(self) -> Any:
        """grant and ban change access= only; every other option (oddly quoted ones
        included) stays as written, and no line is lost."""
        from nuttconch.admin import _options_text  # noqa: F401 (the view under test)
        from nuttconch.authkeys import fingerprint_of

        opts = (
            'access="listen",permitopen="gw1:22",command="whoami",'
            'expiry-time="20300101Z",from="127.0.0.1,!10.*",alias="a\\"b"'
        )
        self.key("dev", options=opts)
        with open(self.akfile, "a") as handle:
            handle.write('# keep me\nno-pty,command="x \\ ssh-ed25519 AAAA odd\n')
        before = self.readLines()
        entry = authkeys.parse_line(before[1], 2)
        assert entry is not None
        fp = fingerprint_of(entry.blob)
        out, err, code = yield self.admin("grant", fp, "list")
        self.assertEqual(code, 0, err)
        granted = authkeys.parse_line(self.readLines()[1])
        assert granted is not None
        self.assertEqual(
            [o for o in granted.options if o[0] != "access"],
            [o for o in entry.options if o[0] != "access"],
        )
        self.assertEqual(granted.access, {"listen", "list"})
        out, err, code = yield self.admin("ban", fp)
        self.assertEqual(code, 0, err)
        after = self.readLines()
        banned = authkeys.parse_line(after[1])
        assert banned is not None
        self.assertTrue(banned.denied)
        self.assertEqual(
            [o for o in banned.options if o[0] != "access"],
            [o for o in entry.options if o[0] != "access"],
        )
        self.assertEqual(after[0], before[0])
        self.assertEqual(after[2:], before[2:])

    def readLines(self) -> list[str]:
        with open(self.akfile) as handle:
            return handle.read().splitlines()

    @defer.inlineCallbacks
    def test_hostile_option_values(self) -> Any:
        """Huge or oddly quoted option values are refused in words and lose nothing."""
        huge = "x" * 20000
        lines = [
            f'permitopen="{huge}:22" {KEY} huge',
            f'command="whoami\\" {KEY} quote',
            f'permitopen="gw1:22",,no-pty {KEY} comma',
        ]
        with open(self.akfile, "a") as handle:
            handle.write("\n".join(lines) + "\n")
        before = self.readLines()
        out, err, code = yield self.admin("keys", "--json")
        self.assertEqual(code, 0, err)
        rows = [r for r in json.loads(out) if r["line"] > 1]
        self.assertEqual(len(rows), 3)
        self.assertIn("line too long", rows[0]["status"])
        self.assertIn("unterminated quote", rows[1]["status"])
        self.assertIn("empty option name", rows[2]["status"])
        fp = authkeys.fingerprint_of(authkeys.parse_line(KEY).blob)  # type: ignore[union-attr]
        out, err, code = yield self.admin("grant", fp, "listen")
        self.assertEqual(code, 1, out)
        self.assertEqual(self.readLines(), before)
