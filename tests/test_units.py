"""
In-process unit tests of the switchboard's parts: configuration, names,
the registry, the key checker, the commands and the host keys.
"""

from __future__ import annotations

import os
import stat
import textwrap

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh.keys import Key
from twisted.cred.credentials import SSHPrivateKey
from twisted.internet import endpoints, reactor
from twisted.trial import unittest

from nuttconch import commands, config, hostkeys, names
from nuttconch.auth import (
    ALL_ACCESS,
    AuthorizedKeysChecker,
    ConnectionInfo,
    Identity,
    Refused,
    fingerprint,
)
from nuttconch.authkeys import AuthorizedKeysFile
from nuttconch.names import InvalidName
from nuttconch.registry import InMemoryRegistry, Listener

SECRET = b"s" * 32
SIG_DATA = b"\x00\x00\x00\x20session-identifier-for-the-tests\x32userauth-request"

DEFAULT_VALUES = {
    "listen_host": "0.0.0.0",
    "listen_port": 2222,
    "server_fqdn": "localhost",
    "enable_auth": True,
    "allow_new_clients": True,
    "first_use_per_source": 60,
    "first_use_per_minute": 300,
    "first_use_max_keys": 10000,
    "allow_pty": True,
    "enable_shell": True,
    "use_dns": True,
    "host_key_dir": "keys",
    "host_key_ecdsa": "keys/ssh_host_ecdsa_key",
    "host_key_ed25519": "keys/ssh_host_ed25519_key",
    "host_key_rsa": "keys/ssh_host_rsa_key",
    "authorized_keys_file": "keys/authorized_keys",
    "revoked_keys_file": "",
    "login_grace_time": 30.0,
    "max_auth_tries": 6,
    "max_startups": (1000, 30, 4000),
    "per_source_max_startups": 64,
    "reuse_port": False,
    "proxy_protocol": False,
    "proxy_protocol_from": "",
    "client_alive_interval": 15.0,
    "client_alive_count_max": 3,
    "unused_connection_timeout": 0.0,
    "channel_open_timeout": 15.0,
    "max_forwards": 64,
    "max_channels": 1024,
    "channel_window": 2097152,
    "memory_per_connection": 64 * 1024 * 1024,
    "memory_total": 1024 * 1024 * 1024,
    "max_connections_per_key": 1024,
    "max_connections_per_source": 1024,
    "per_source_penalties": True,
    "per_source_penalty_exempt_list": "",
    "ciphers": (
        b"chacha20-poly1305@openssh.com",
        b"aes128-ctr",
        b"aes192-ctr",
        b"aes256-ctr",
        b"aes128-gcm@openssh.com",
        b"aes256-gcm@openssh.com",
    ),
    "macs": (
        b"hmac-sha2-256-etm@openssh.com",
        b"hmac-sha2-512-etm@openssh.com",
    ),
    "kex_algorithms": (
        b"mlkem768x25519-sha256",
        b"curve25519-sha256",
        b"curve25519-sha256@libssh.org",
    ),
    "authorized_keys_command": (),
    "authorized_keys_command_timeout": 5.0,
    "authorized_keys_command_max_output": 65536,
    "authorized_keys_command_cache": 60.0,
    "listen": "",
    "per_name_labels": False,
    "allowed_hosts": (),
    "url": "",
    "queue_size": 1000,
    "timeout": 10.0,
    "retries": 5,
    "backoff": 1.0,
    "redis_url": "",
    "node_name": "",
    "lease_time": 5.0,
    "redis_timeout": 2.0,
    "relay_listen": "",
    "relay_address": "",
    "cluster_key_file": "",
    "level": "info",
    "format": "text",
}


class _EnvMixin:
    """Set or clear NUTTSSH_CONFIG_FILE for one test, restoring it afterwards."""

    def setEnv(self, value: str | None) -> None:
        old = os.environ.get(config.ENV_VAR)

        def restore() -> None:
            if old is None:
                os.environ.pop(config.ENV_VAR, None)
            else:
                os.environ[config.ENV_VAR] = old

        self.addCleanup(restore)  # type: ignore[attr-defined]
        if value is None:
            os.environ.pop(config.ENV_VAR, None)
        else:
            os.environ[config.ENV_VAR] = value

    def chdirTemp(self) -> str:
        directory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(directory)
        old = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, old)  # type: ignore[attr-defined]
        return directory


# ---------------------------------------------------------------------------
# config


class ConfigTests(_EnvMixin, unittest.TestCase):
    def write(self, text: str, name: str = "nuttssh.ini") -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(textwrap.dedent(text))
        return path

    def assertConfigError(self, text: str, *fragments: str) -> str:
        path = self.write(text)
        exc = self.assertRaises(config.ConfigError, config.load, path)
        message = str(exc)
        self.assertNotIn("\n", message)
        self.assertIn(path, message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_defaults_without_file(self) -> None:
        """With no ./nuttssh.ini and no environment variable, every setting has its default."""
        self.setEnv(None)
        self.chdirTemp()
        cfg = config.load()
        self.assertEqual(cfg.path, "nuttssh.ini")
        self.assertEqual(cfg.values, DEFAULT_VALUES)

    def test_explicit_missing_file(self) -> None:
        """A config path the user named that does not exist is an error, not silent defaults."""
        self.setEnv(None)
        path = os.path.abspath(self.mktemp())
        exc = self.assertRaises(config.ConfigError, config.load, path)
        self.assertEqual(str(exc), f"{path}: file not found")

    def test_env_missing_file(self) -> None:
        """A NUTTSSH_CONFIG_FILE naming a missing file is an error naming that file."""
        path = os.path.abspath(self.mktemp())
        self.setEnv(path)
        self.chdirTemp()
        exc = self.assertRaises(config.ConfigError, config.load)
        self.assertEqual(str(exc), f"{path}: file not found")

    def test_original_keys_full_example(self) -> None:
        """A Nuttssh config with every original key and interpolation parses exactly."""
        self.setEnv(None)
        path = self.write(
            """\
            [server]
            listen_host = 127.0.0.1
            listen_port = 2022
            server_fqdn = switch.example.org
            enable_auth = False
            allow_new_clients = no
            allow_pty = off
            enable_shell = 0

            [keys]
            host_key_dir = /etc/nuttssh
            host_key_ecdsa = %(host_key_dir)s/ecdsa
            host_key_ed25519 = %(host_key_dir)s/ed25519
            host_key_rsa = %(host_key_dir)s/rsa
            authorized_keys_file = %(host_key_dir)s/authorized_keys
            """
        )
        cfg = config.load(path)
        expected = dict(
            DEFAULT_VALUES,
            listen_host="127.0.0.1",
            listen_port=2022,
            server_fqdn="switch.example.org",
            enable_auth=False,
            allow_new_clients=False,
            allow_pty=False,
            enable_shell=False,
            host_key_dir="/etc/nuttssh",
            host_key_ecdsa="/etc/nuttssh/ecdsa",
            host_key_ed25519="/etc/nuttssh/ed25519",
            host_key_rsa="/etc/nuttssh/rsa",
            authorized_keys_file="/etc/nuttssh/authorized_keys",
        )
        self.assertEqual(cfg.path, path)
        self.assertEqual(cfg.values, expected)
        self.assertEqual(cfg.listen_port, 2022)

    def test_new_keys_parse(self) -> None:
        """nuttconch's own settings parse their OpenSSH-style syntaxes."""
        self.setEnv(None)
        path = self.write(
            """\
            [server]
            login_grace_time = 2m
            max_startups = 5:50:20
            client_alive_interval = 1h
            max_forwards = 3
            """
        )
        values = config.load(path).values
        self.assertEqual(values["login_grace_time"], 120.0)
        self.assertEqual(values["max_startups"], (5, 50, 20))
        self.assertEqual(values["client_alive_interval"], 3600.0)
        self.assertEqual(values["max_forwards"], 3)

    def test_host_key_dir_interpolated_into_defaults(self) -> None:
        """Changing only host_key_dir moves every key path that defaults under it."""
        self.setEnv(None)
        path = self.write("[keys]\nhost_key_dir = /srv/k\n")
        cfg = config.load(path)
        self.assertEqual(cfg.host_key_rsa, "/srv/k/ssh_host_rsa_key")
        self.assertEqual(cfg.authorized_keys_file, "/srv/k/authorized_keys")

    def test_env_var_selects_file(self) -> None:
        """NUTTSSH_CONFIG_FILE is used when no path is given, ahead of ./nuttssh.ini."""
        path = self.write("[server]\nlisten_port = 4022\n", name="other.ini")
        self.setEnv(path)
        cwd = self.chdirTemp()
        with open(os.path.join(cwd, "nuttssh.ini"), "w") as handle:
            handle.write("[server]\nlisten_port = 5022\n")
        cfg = config.load()
        self.assertEqual(cfg.path, path)
        self.assertEqual(cfg.listen_port, 4022)

    def test_cwd_file_used(self) -> None:
        """Without the variable, ./nuttssh.ini in the working directory is read."""
        self.setEnv(None)
        cwd = self.chdirTemp()
        with open(os.path.join(cwd, "nuttssh.ini"), "w") as handle:
            handle.write("[server]\nlisten_port = 5022\n")
        self.assertEqual(config.load().listen_port, 5022)

    def test_explicit_path_beats_env(self) -> None:
        """An explicit --config path wins over NUTTSSH_CONFIG_FILE."""
        env_path = self.write("[server]\nlisten_port = 4022\n", name="env.ini")
        path = self.write("[server]\nlisten_port = 6022\n", name="explicit.ini")
        self.setEnv(env_path)
        self.assertEqual(config.load(path).listen_port, 6022)

    def test_bad_port(self) -> None:
        """listen_port = 70000 is one line naming the file, the key and the valid range."""
        self.setEnv(None)
        message = self.assertConfigError(
            "[server]\nlisten_port = 70000\n", "listen_port", "70000", "0 to 65535"
        )
        self.assertIn("[server]", message)

    def test_bad_bool(self) -> None:
        """enable_auth = maybe is one line naming the key and asking for true or false."""
        self.setEnv(None)
        self.assertConfigError("[server]\nenable_auth = maybe\n", "enable_auth", "true or false")

    def test_bad_time(self) -> None:
        """login_grace_time = soon is one line naming the key and the time syntax."""
        self.setEnv(None)
        self.assertConfigError(
            "[server]\nlogin_grace_time = soon\n", "login_grace_time", "soon", "30s"
        )

    def test_bad_startups(self) -> None:
        """max_startups = 1:2 is one line naming the key and the start:rate:full syntax."""
        self.setEnv(None)
        self.assertConfigError(
            "[server]\nmax_startups = 1:2\n", "max_startups", "1:2", "start:rate:full"
        )

    def test_unknown_key(self) -> None:
        """A misspelt key in [server] is refused by name instead of being ignored."""
        self.setEnv(None)
        self.assertConfigError("[server]\nlisten_prot = 22\n", "listen_prot", "unknown key")

    def test_syntax_error_one_line(self) -> None:
        """A line that is not key = value gives a one-line error with the file name."""
        self.setEnv(None)
        self.assertConfigError("[server]\nlisten_port = 1\nthis is not ini\n")

    def test_bad_interpolation_one_line(self) -> None:
        """A stray % in a value gives a one-line error naming the key."""
        self.setEnv(None)
        self.assertConfigError("[server]\nserver_fqdn = 100%sure\n", "server_fqdn")

    def test_listen_endpoint_ipv4(self) -> None:
        """An IPv4 listen_host becomes a tcp endpoint bound to that interface."""
        self.setEnv(None)
        cfg = config.load(self.write("[server]\nlisten_host = 127.0.0.1\nlisten_port = 2022\n"))
        self.assertEqual(cfg.listen_endpoint, "tcp:2022:interface=127.0.0.1")
        ep = endpoints.serverFromString(reactor, cfg.listen_endpoint)
        self.assertEqual((ep._port, ep._interface), (2022, "127.0.0.1"))

    def test_listen_endpoint_ipv6(self) -> None:
        """An IPv6 listen_host has its colons escaped so the endpoint parser keeps it whole."""
        self.setEnv(None)
        cfg = config.load(self.write("[server]\nlisten_host = ::1\nlisten_port = 2022\n"))
        self.assertEqual(cfg.listen_endpoint, "tcp:2022:interface=\\:\\:1")
        ep = endpoints.serverFromString(reactor, cfg.listen_endpoint)
        self.assertEqual((ep._port, ep._interface), (2022, "::1"))

    def test_listen_endpoint_default_all(self) -> None:
        """The default listen_host 0.0.0.0 listens on every IPv4 interface."""
        self.setEnv(None)
        self.chdirTemp()
        ep = endpoints.serverFromString(reactor, config.load().listen_endpoint)
        self.assertEqual((ep._port, ep._interface), (2222, "0.0.0.0"))


# ---------------------------------------------------------------------------
# names


class NamesTests(unittest.TestCase):
    REJECTED = [
        ("", "empty"),
        ("a" * 64, "64 characters"),
        ("a b", "space"),
        ("-web", "leading dash"),
        ("web~1", "tilde"),
        ("web*", "star"),
        ("a,b", "comma"),
        ('a"b', "quote"),
        ("a=b", "equals"),
        ("a/b", "slash"),
        ("a\x00b", "NUL"),
        ("a\x1b[31m", "ESC"),
        (b"caf\xc3\xa9", "non-ASCII bytes"),
        (b"a\xffb", "invalid UTF-8 bytes"),
        ("café", "e acute"),
        ("\u0430dmin", "Cyrillic a"),
        (".web", "leading dot"),
    ]

    def test_normalise_folds_case(self) -> None:
        """Upper-case letters are folded, so Prod and prod are one name."""
        self.assertEqual(names.normalise("Prod"), "prod")
        self.assertEqual(names.normalise(b"Prod"), "prod")
        self.assertEqual(names.normalise("WEB-1.example_x"), "web-1.example_x")

    def test_normalise_accepts(self) -> None:
        """Names from the safe set, up to 63 characters, come back unchanged."""
        for name in ["a", "0", "host-1", "a.b_c-d", "a" * 63, "9lives"]:
            self.assertEqual(names.normalise(name), name)

    def test_normalise_rejects(self) -> None:
        """Every name outside the safe set is refused with a printable message."""
        for raw, why in self.REJECTED:
            exc = self.assertRaises(InvalidName, names.normalise, raw, "user name")
            message = str(exc)
            self.assertIn("user name", message, why)
            self.assertTrue(message.isprintable(), f"{why}: {message!r}")
            self.assertTrue(message.isascii(), f"{why}: {message!r}")

    def test_split_index(self) -> None:
        """name~N splits into name and N; no suffix or a non-number suffix is index 0."""
        self.assertEqual(names.split_index("a~0"), ("a", 0))
        self.assertEqual(names.split_index("a~12"), ("a", 12))
        self.assertEqual(names.split_index("a"), ("a", 0))
        self.assertEqual(names.split_index("a~x"), ("a~x", 0))

    def test_generated_alias_stable(self) -> None:
        """The same secret, key and hostname always give the same alias."""
        one = names.generated_alias(SECRET, b"blob-1", "web")
        self.assertEqual(one, names.generated_alias(SECRET, b"blob-1", "web"))
        self.assertRegex(one, r"^web-[0-9a-z]{7}$")

    def test_generated_alias_differs(self) -> None:
        """Another key, hostname or secret gives another suffix."""
        base = names.generated_alias(SECRET, b"blob-1", "host")
        self.assertRegex(base, r"^host-[0-9a-z]{7}$")
        self.assertNotEqual(base, names.generated_alias(SECRET, b"blob-2", "host"), "key")
        self.assertNotEqual(base, names.generated_alias(b"t" * 32, b"blob-1", "host"), "secret")
        other = names.generated_alias(SECRET, b"blob-1", "other")
        self.assertNotEqual(base[-7:], other[-7:], "hostname")

    def test_generated_alias_long_hostname(self) -> None:
        """A 63-character hostname still yields a valid name of at most 63 characters."""
        hostname = "h" * 62 + "z"
        alias = names.generated_alias(SECRET, b"blob", hostname)
        self.assertLessEqual(len(alias), 63)
        self.assertEqual(names.normalise(alias), alias)
        self.assertRegex(alias, r"-[0-9a-z]{7}$")

    def test_generated_alias_long_hostnames_distinct(self) -> None:
        """Two long hostnames sharing a prefix still get different aliases."""
        a = names.generated_alias(SECRET, b"blob", "x" * 60 + "aaa")
        b = names.generated_alias(SECRET, b"blob", "x" * 60 + "bbb")
        self.assertNotEqual(a, b)

    def test_escape_controls(self) -> None:
        """Control characters, ESC, backslash and non-ASCII are shown as escapes."""
        self.assertEqual(names.escape("a\nb"), "a\\nb")
        self.assertEqual(names.escape("\x1b[31mred"), "\\x1b[31mred")
        self.assertEqual(names.escape("a\\b"), "a\\\\b")
        self.assertEqual(names.escape("\x00\x7f"), "\\x00\\x7f")
        self.assertEqual(names.escape("é"), "\\xe9")
        self.assertEqual(names.escape(b"\xff\r"), "\\xff\\r")
        for text in ["\u202e", "\u2028", "日本"]:
            out = names.escape(text)
            self.assertTrue(out.isascii() and out.isprintable(), repr(out))

    def test_escape_plain(self) -> None:
        """Plain printable ASCII passes through unchanged."""
        for text in ["", "host-1", "SHA256:abc+/=", "a b (c) [d] {e} 'f' ~g"]:
            self.assertEqual(names.escape(text), text)


# ---------------------------------------------------------------------------
# auth


def _ed25519() -> Key:
    return Key(ed25519.Ed25519PrivateKey.generate())


class AuthTests(unittest.TestCase):
    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "authorized_keys")
        self.key = _ed25519()

    def writeKeys(self, *lines: str) -> None:
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))

    def line(self, key: Key, options: str = "") -> str:
        text = key.public().toString("openssh").decode("ascii")
        return f"{options} {text}" if options else text

    def checker(self, **kwargs: bool) -> AuthorizedKeysChecker:
        keys_file = AuthorizedKeysFile(self.path)
        keys_file.ensure_exists()
        return AuthorizedKeysChecker(keys_file, SECRET, **kwargs)

    def creds(
        self,
        key: Key,
        *,
        signed: bool = True,
        username: bytes = b"alice",
        alg: bytes | None = None,
        bad: bool = False,
    ) -> SSHPrivateKey:
        if alg is None:
            alg = b"rsa-sha2-256" if key.type() == "RSA" else key.sshType()
        signature = None
        if signed:
            sig_type = alg if key.type() == "RSA" else None
            signature = key.sign(SIG_DATA + (b"x" if bad else b""), signatureType=sig_type)
        creds = SSHPrivateKey(username, alg, key.public().blob(), SIG_DATA, signature)
        creds.connection = ConnectionInfo(peer="127.0.0.1")
        return creds

    def refused(self, checker: AuthorizedKeysChecker, creds: SSHPrivateKey) -> Refused:
        failure = self.failureResultOf(checker.requestAvatarId(creds), Refused)
        return failure.value  # type: ignore[return-value]

    def test_probe_authorized(self) -> None:
        """An unsigned probe for an authorized key is answered with ValidPublicKey."""
        self.writeKeys(self.line(self.key, 'access="listen"'))
        d = self.checker().requestAvatarId(self.creds(self.key, signed=False))
        self.failureResultOf(d, ValidPublicKey)

    def test_probe_denied(self) -> None:
        """A denied key is refused already at the probe, with the reason."""
        self.writeKeys(self.line(self.key, 'access="denied",access="admin"'))
        refusal = self.refused(self.checker(), self.creds(self.key, signed=False))
        self.assertEqual(refusal.message, "this key is denied")

    def test_signed_denied(self) -> None:
        """A denied key is refused even with a good signature."""
        self.writeKeys(self.line(self.key, 'access="denied"'))
        refusal = self.refused(self.checker(), self.creds(self.key))
        self.assertEqual(refusal.message, "this key is denied")

    def test_bad_signature(self) -> None:
        """A signature over other data is refused."""
        self.writeKeys(self.line(self.key, 'access="listen"'))
        refusal = self.refused(self.checker(), self.creds(self.key, bad=True))
        self.assertEqual(refusal.message, "bad signature")

    def test_signature_by_other_key(self) -> None:
        """A signature made by a different private key is refused."""
        self.writeKeys(self.line(self.key, 'access="listen"'))
        creds = self.creds(self.key)
        creds.signature = _ed25519().sign(SIG_DATA)
        self.assertEqual(self.refused(self.checker(), creds).message, "bad signature")

    def test_good_signature_identity(self) -> None:
        """A good signature gives hostname, generated alias then alias= options, and access."""
        self.writeKeys(
            "# a comment",
            "",
            self.line(
                self.key,
                'hostname="Box",alias="web",alias="DB",access="initiate",access="list"',
            ),
        )
        identity = self.successResultOf(self.checker().requestAvatarId(self.creds(self.key)))
        self.assertIsInstance(identity, Identity)
        blob = self.key.public().blob()
        self.assertEqual(identity.username, "alice")
        self.assertEqual(identity.hostname, "box")
        self.assertEqual(
            identity.aliases, (names.generated_alias(SECRET, blob, "box"), "web", "db")
        )
        self.assertEqual(identity.access, frozenset({"initiate", "list"}))
        self.assertEqual(identity.fingerprint, fingerprint(blob))
        self.assertEqual(identity.peer, "127.0.0.1")
        self.assertEqual(identity.lineno, 3)
        self.assertFalse(identity.new_key)

    def test_hostname_defaults_to_username(self) -> None:
        """Without hostname= the hostname is the (case-folded) SSH user name."""
        self.writeKeys(self.line(self.key, 'access="initiate"'))
        creds = self.creds(self.key, username=b"Alice")
        identity = self.successResultOf(self.checker().requestAvatarId(creds))
        self.assertEqual(identity.hostname, "alice")
        self.assertEqual(
            identity.aliases, (names.generated_alias(SECRET, identity.key_blob, "alice"),)
        )

    def test_ecdsa_and_rsa_sha2(self) -> None:
        """ECDSA keys and RSA keys signing with rsa-sha2-256 are accepted."""
        ecdsa = Key(ec.generate_private_key(ec.SECP256R1()))
        rsa_key = Key(rsa.generate_private_key(65537, 2048))
        self.writeKeys(self.line(ecdsa, 'access="listen"'), self.line(rsa_key, 'access="listen"'))
        checker = self.checker()
        for key in (ecdsa, rsa_key):
            identity = self.successResultOf(checker.requestAvatarId(self.creds(key)))
            self.assertEqual(identity.access, frozenset({"listen"}))

    def test_from_mismatch(self) -> None:
        """A from= that does not match the peer is refused, naming the address, at probe time."""
        self.writeKeys(self.line(self.key, 'from="10.0.0.0/8",access="listen"'))
        checker = self.checker()
        for signed in (False, True):
            refusal = self.refused(checker, self.creds(self.key, signed=signed))
            self.assertIn("127.0.0.1", refusal.message)

    def test_from_match(self) -> None:
        """A from= that matches the peer lets the key in."""
        self.writeKeys(self.line(self.key, 'from="127.0.0.0/8,!10.*",access="listen"'))
        self.successResultOf(self.checker().requestAvatarId(self.creds(self.key)))

    def test_unknown_key_closed(self) -> None:
        """With allow_new_clients off, an unknown key is refused at probe and with a signature."""
        self.writeKeys(self.line(_ed25519(), 'access="listen"'))
        checker = self.checker(allow_new_clients=False)
        for signed in (False, True):
            refusal = self.refused(checker, self.creds(self.key, signed=signed))
            self.assertEqual(refusal.message, "this key is not authorized")

    def test_tofu_probe_writes_nothing(self) -> None:
        """An unsigned probe for an unknown key gets ValidPublicKey and writes nothing."""
        self.writeKeys("# keep me")
        with open(self.path, "rb") as handle:
            before = handle.read()
        d = self.checker().requestAvatarId(self.creds(self.key, signed=False))
        self.failureResultOf(d, ValidPublicKey)
        with open(self.path, "rb") as handle:
            self.assertEqual(handle.read(), before)

    def test_tofu_signed_appends(self) -> None:
        """A signed unknown key is appended once, with initiate and listen, and marked new."""
        self.writeKeys("# keep me")
        checker = self.checker()
        d = checker.requestAvatarId(self.creds(self.key))

        def check(identity: Identity) -> None:
            self.assertTrue(identity.new_key)
            self.assertEqual(identity.access, frozenset({"initiate", "listen"}))
            self.assertEqual(identity.hostname, "alice")
            with open(self.path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
            self.assertEqual(len(lines), 2)
            self.assertEqual(lines[0], "# keep me")
            b64 = self.line(self.key).split()[1]
            self.assertIn(b64, lines[1])
            self.assertTrue(lines[1].endswith(" alice@127.0.0.1"), lines[1])
            entry = checker.keys_file.lookup(identity.key_blob)
            self.assertEqual(entry.access, frozenset({"initiate", "listen"}))

        return d.addCallback(check)

    def test_bad_username(self) -> None:
        """A user name outside the safe set is refused before anything else."""
        self.writeKeys(self.line(self.key, 'access="listen"'))
        checker = self.checker()
        for username in [b"al ice", b"a\nb", b"-x", b"caf\xc3\xa9", b"", b"a" * 64, b'a"b']:
            refusal = self.refused(checker, self.creds(self.key, username=username))
            self.assertIn("user name", refusal.message)

    def test_ssh_rsa_sha1_refused(self) -> None:
        """An ssh-rsa (SHA-1) request is refused even for an authorized RSA key."""
        rsa_key = Key(rsa.generate_private_key(65537, 2048))
        self.writeKeys(self.line(rsa_key, 'access="listen"'))
        refusal = self.refused(self.checker(), self.creds(rsa_key, alg=b"ssh-rsa"))
        self.assertIn("SHA-1", refusal.message)

    def test_rsa_1024_refused(self) -> None:
        """An RSA key below 2048 bits is refused."""
        rsa_key = Key(rsa.generate_private_key(65537, 1024))
        self.writeKeys(self.line(rsa_key, 'access="listen"'))
        refusal = self.refused(self.checker(), self.creds(rsa_key))
        self.assertIn("2048", refusal.message)

    def test_auth_disabled(self) -> None:
        """With enable_auth off any correctly signed key gets every permission."""
        self.writeKeys(self.line(self.key, 'access="denied"'))
        checker = self.checker(enable_auth=False, allow_new_clients=False)
        other = _ed25519()
        self.failureResultOf(
            checker.requestAvatarId(self.creds(other, signed=False)), ValidPublicKey
        )
        identity = self.successResultOf(checker.requestAvatarId(self.creds(other)))
        self.assertEqual(identity.access, ALL_ACCESS)
        self.assertEqual(
            self.refused(checker, self.creds(other, bad=True)).message, "bad signature"
        )
        with open(self.path, encoding="utf-8") as handle:
            self.assertEqual(len(handle.read().splitlines()), 1)


# ---------------------------------------------------------------------------
# commands


class _Factory:
    def __init__(self, registry: InMemoryRegistry) -> None:
        self.registry = registry


class _Avatar:
    def __init__(self, access: set[str], registry: InMemoryRegistry) -> None:
        self.identity = Identity(
            username="alice",
            hostname="alice",
            aliases=("alice-abc1234", "web"),
            access=frozenset(access),
            fingerprint="SHA256:abcdef",
            key_blob=b"blob",
            peer="192.0.2.7",
        )
        self.listener = Listener("alice", self.identity.aliases, peer="192.0.2.7")
        self.factory = _Factory(registry)


class CommandsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.registry = InMemoryRegistry()
        self.avatar = _Avatar({"initiate", "listen", "list"}, self.registry)
        self.registry.add_port(self.avatar.listener, "localhost", 8080)
        other = Listener("bob", ("bob-zzzzzzz", "\x1b[2Jevil"), peer="198.51.100.2")
        self.registry.add_port(other, "", 22)

    def test_empty(self) -> None:
        """An empty command line does nothing and succeeds."""
        result = commands.run(self.avatar, "")
        self.assertEqual((result.code, result.out, result.err), (0, "", ""))

    def test_help(self) -> None:
        """help lists the commands."""
        result = commands.run(self.avatar, b"help")
        self.assertEqual(result.code, 0)
        for word in ("whoami", "listeners", "help"):
            self.assertIn(word, result.out)

    def test_whoami(self) -> None:
        """whoami prints names, permissions, key, address and ports, needing no permission."""
        self.avatar.identity = Identity(**{**self.avatar.identity.__dict__, "access": frozenset()})
        result = commands.run(self.avatar, "whoami")
        self.assertEqual(result.code, 0)
        self.assertEqual(
            result.out,
            "hostname: alice\n"
            "names: alice-abc1234, web\n"
            "access: none\n"
            "key: SHA256:abcdef\n"
            "address: 192.0.2.7\n"
            "ports: 8080\n",
        )

    def test_listeners_with_list(self) -> None:
        """listeners prints every initiator, newest first, with hostile names escaped."""
        result = commands.run(self.avatar, "listeners")
        self.assertEqual(result.code, 0, result.err)
        lines = result.out.splitlines()
        self.assertEqual(lines[0].split(), ["NAME", "ADDRESS", "ALIASES", "PORTS"])
        self.assertEqual(lines[1].split(), ["bob-zzzzzzz", "198.51.100.2", "\\x1b[2Jevil", "22"])
        self.assertEqual(lines[2].split(), ["alice-abc1234", "192.0.2.7", "web", "8080"])
        self.assertNotIn("\x1b", result.out)
        self.assertEqual(commands.run(self.avatar, "list").out, result.out)

    def test_listeners_without_list(self) -> None:
        """listeners without access=list is refused with Permission denied."""
        avatar = _Avatar({"initiate", "listen"}, self.registry)
        result = commands.run(avatar, "listeners")
        self.assertEqual(result.code, 1)
        self.assertEqual(result.out, "")
        self.assertIn("Permission denied", result.err)

    def test_unknown(self) -> None:
        """An unknown command exits 127 and names it, escaped."""
        result = commands.run(self.avatar, "nosuch")
        self.assertEqual(result.code, 127)
        self.assertIn("unknown command: nosuch", result.err)
        result = commands.run(self.avatar, "\x1b]0;pwn\x07")
        self.assertEqual(result.code, 127)
        self.assertNotIn("\x1b", result.err)

    def test_extra_arguments(self) -> None:
        """A command given arguments it does not take exits 2."""
        result = commands.run(self.avatar, "whoami extra")
        self.assertEqual(result.code, 2)
        self.assertIn("takes no arguments", result.err)

    def test_unbalanced_quote(self) -> None:
        """Bad quoting is an error result, not an exception."""
        result = commands.run(self.avatar, 'whoami "oops')
        self.assertEqual(result.code, 2)
        self.assertIn("cannot parse", result.err)

    def test_overlong(self) -> None:
        """A line longer than the limit is refused without being parsed."""
        result = commands.run(self.avatar, "whoami " + "x" * (commands.MAX_COMMAND + 10))
        self.assertEqual(result.code, 2)
        self.assertIn("too long", result.err)

    def test_invalid_utf8(self) -> None:
        """Undecodable bytes do not raise."""
        result = commands.run(self.avatar, b"\xff\xfe")
        self.assertEqual(result.code, 127)


# ---------------------------------------------------------------------------
# hostkeys


class HostKeysTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(os.path.abspath(self.mktemp()), "keys")

    def test_create_then_reuse(self) -> None:
        """A missing key is created 0600 with a .pub, and the second call returns the same key."""
        path = os.path.join(self.dir, "ssh_host_ed25519_key")
        first = hostkeys.load_or_create(path, "ed25519")
        self.assertFalse(first.isPublic())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        pub = Key.fromFile(path + ".pub")
        self.assertEqual(pub, first.public())
        with open(path, "rb") as handle:
            data = handle.read()
        second = hostkeys.load_or_create(path, "ed25519")
        self.assertEqual(second.fingerprint(), first.fingerprint())
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), data)

    def test_kinds(self) -> None:
        """ecdsa makes a nistp256 key; the key type matches what was asked for."""
        key = hostkeys.load_or_create(os.path.join(self.dir, "e"), "ecdsa")
        self.assertEqual(key.sshType(), b"ecdsa-sha2-nistp256")

    def test_garbage(self) -> None:
        """A key file that is not a key is an error naming the path, never replaced."""
        os.makedirs(self.dir)
        path = os.path.join(self.dir, "ssh_host_ed25519_key")
        with open(path, "wb") as handle:
            handle.write(b"this is not a key\n")
        exc = self.assertRaises(hostkeys.HostKeyError, hostkeys.load_or_create, path, "ed25519")
        self.assertIn(path, str(exc))
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), b"this is not a key\n")

    def test_unreadable(self) -> None:
        """A key path that cannot be read as a file is an error naming the path."""
        path = os.path.join(self.dir, "ssh_host_ed25519_key")
        os.makedirs(path)
        exc = self.assertRaises(hostkeys.HostKeyError, hostkeys.load_or_create, path, "ed25519")
        self.assertIn(path, str(exc))

    def test_public_key_in_place_of_private(self) -> None:
        """A public key where the private one should be is an error naming the path."""
        os.makedirs(self.dir)
        path = os.path.join(self.dir, "k")
        with open(path, "wb") as handle:
            handle.write(_ed25519().public().toString("openssh") + b"\n")
        exc = self.assertRaises(hostkeys.HostKeyError, hostkeys.load_or_create, path, "ed25519")
        self.assertIn(path, str(exc))

    def test_secret(self) -> None:
        """The alias secret is created 0600 once and then read back unchanged."""
        first = hostkeys.load_or_create_secret(self.dir)
        path = os.path.join(self.dir, hostkeys.SECRET_NAME)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertGreaterEqual(len(first), 16)
        self.assertEqual(hostkeys.load_or_create_secret(self.dir), first)

    def test_short_secret(self) -> None:
        """A truncated secret is an error naming its path, not silently weak aliases."""
        os.makedirs(self.dir)
        path = os.path.join(self.dir, hostkeys.SECRET_NAME)
        with open(path, "wb") as handle:
            handle.write(b"short")
        exc = self.assertRaises(hostkeys.HostKeyError, hostkeys.load_or_create_secret, self.dir)
        self.assertIn(path, str(exc))
