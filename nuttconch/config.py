# -*- test-case-name: tests.test_units,tests.test_config_fuzz -*-
"""nuttssh.ini: the original Nuttssh keys plus nuttconch's own, all validated at start.

Every key is declared once in ``SCHEMA`` with its type and default, so that
a typo or a bad value stops start-up with one line naming the file, the key
and the problem, instead of surfacing later as a strange runtime failure.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .algorithms import parse_algorithms

ENV_VAR = "NUTTSSH_CONFIG_FILE"
DEFAULT_PATH = "nuttssh.ini"


class ConfigError(ValueError):
    """A bad configuration; str() is the one line shown to the operator."""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected true or false")


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}")
        return value

    return parse


def _seconds(text: str) -> float:
    """OpenSSH-style time: plain seconds or a suffix s/m/h (``2m``, ``30``)."""
    stripped = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(stripped[-1:], None)
    number = stripped[:-1] if scale else stripped
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise ValueError("expected a time such as 30, 30s, 2m or 1h") from None
    if value < 0 or value > 7 * 86400:
        raise ValueError("expected a time from 0 to 7 days")
    return value


def _size_or_off(text: str) -> int:
    """Bytes, with an optional K, M or G suffix (powers of 1024); 0 means no limit."""
    stripped = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(stripped[-1:], 0)
    try:
        value = int(stripped[:-1] if scale else stripped) * (scale or 1)
    except ValueError:
        raise ValueError("expected a size such as 64M, 1G or 65536 (0: no limit)") from None
    if value != 0 and not 65536 <= value <= 1 << 40:
        raise ValueError("expected 0 (no limit) or a size from 64K to 1024G")
    return value


def _text(text: str) -> str:
    return text.strip()


def _startups(text: str) -> tuple[int, int, int]:
    """MaxStartups syntax: ``start:rate:full`` or a single number."""
    parts = text.strip().split(":")
    try:
        if len(parts) == 1:
            full = int(parts[0])
            return full, 100, full
        if len(parts) == 3:
            start, rate, full = (int(p) for p in parts)
            if 0 < start <= full and 0 <= rate <= 100:
                return start, rate, full
    except ValueError:
        pass
    raise ValueError("expected start:rate:full (for example 10:30:100) or one number")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return value

    return parse


def _algorithms(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("expected a comma-separated list of algorithm names")
    return names


def _algorithm_names(kind: str) -> Callable[[str], tuple[bytes, ...]]:
    """An OpenSSH-style list (``+``/``-``/``^`` modifiers), checked against the names
    in algorithms.py (not the crypto module: parsing a config needs no cipher code)."""

    def parse(text: str) -> tuple[bytes, ...]:
        return parse_algorithms(kind, text)

    return parse


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    parse: Callable[[str], Any]
    default: str
    doc: str
    # Read without %(name)s interpolation: the value has its own % tokens.
    raw: bool = False


SCHEMA: tuple[Setting, ...] = (
    # The original Nuttssh keys, unchanged.
    Setting("server", "listen_host", _text, "0.0.0.0", "address to listen on"),
    Setting("server", "listen_port", _int_range(0, 65535), "2222", "TCP port to listen on"),
    Setting("server", "server_fqdn", _text, "localhost", "host name shown in connect commands"),
    Setting("server", "enable_auth", _bool, "true", "false lets anyone in with every permission"),
    Setting("server", "allow_new_clients", _bool, "true", "trust unknown keys on first use"),
    Setting(
        "server",
        "first_use_per_source",
        _int_range(1, 100000),
        "60",
        "new keys trusted on first use per source address a minute (burst the same)",
    ),
    Setting(
        "server",
        "first_use_per_minute",
        _int_range(1, 1000000),
        "300",
        "new keys trusted on first use a minute, all sources together (burst the same)",
    ),
    Setting(
        "server",
        "first_use_max_keys",
        _int_range(0, 10000000),
        "10000",
        "first-use lines authorized_keys may hold; past it unknown keys are refused",
    ),
    Setting(
        "server",
        "reuse_port",
        _bool,
        "false",
        "SO_REUSEPORT: several nuttconch processes share listen_port (the kernel spreads"
        " connections)",
    ),
    Setting(
        "server",
        "proxy_protocol",
        _bool,
        "false",
        "every connection starts with a PROXY protocol v1/v2 header from a load balancer;"
        " connections without one are refused",
    ),
    Setting(
        "server",
        "proxy_protocol_from",
        _text,
        "",
        "addresses of the load balancers allowed to send PROXY headers (from= patterns,"
        " comma separated; empty: any)",
    ),
    Setting("server", "allow_pty", _bool, "true", "accept pty requests"),
    Setting("server", "enable_shell", _bool, "true", "admin keys get an interactive shell"),
    Setting(
        "server",
        "use_dns",
        _bool,
        "true",
        "look up client host names (reverse, forward-confirmed) for from= hostname patterns",
    ),
    Setting("keys", "host_key_dir", _text, "keys", "directory for host keys and secrets"),
    Setting(
        "keys",
        "host_key_ecdsa",
        _text,
        "%(host_key_dir)s/ssh_host_ecdsa_key",
        "ECDSA host key, offered if it exists (never generated)",
    ),
    Setting(
        "keys",
        "host_key_ed25519",
        _text,
        "%(host_key_dir)s/ssh_host_ed25519_key",
        "Ed25519 host key",
    ),
    Setting("keys", "host_key_rsa", _text, "%(host_key_dir)s/ssh_host_rsa_key", "RSA host key"),
    Setting(
        "keys",
        "authorized_keys_file",
        _text,
        "%(host_key_dir)s/authorized_keys",
        "authorized_keys in OpenSSH format",
    ),
    Setting(
        "keys",
        "authorized_keys_command",
        lambda text: _key_command(text),
        "",
        "program (absolute path) run for keys authorized_keys lacks, with arguments;"
        " tokens %u %t %f %k; prints authorized_keys lines (empty: off)",
        raw=True,
    ),
    Setting(
        "keys",
        "authorized_keys_command_timeout",
        lambda text: _positive_seconds(text),
        "5",
        "authorized_keys_command is killed and the login refused after this time",
    ),
    Setting(
        "keys",
        "authorized_keys_command_max_output",
        _int_range(1024, 16 * 1024 * 1024),
        "65536",
        "bytes authorized_keys_command may print; past it it is killed and the login refused",
    ),
    Setting(
        "keys",
        "authorized_keys_command_cache",
        _seconds,
        "60",
        "how long an answer of authorized_keys_command is reused for the same key (0: never)",
    ),
    Setting(
        "keys",
        "revoked_keys_file",
        _text,
        "",
        "revoked keys: a public key list or an OpenSSH KRL (empty: none)",
    ),
    # nuttconch's own, with OpenSSH's names and defaults where one exists.
    Setting("server", "login_grace_time", _seconds, "30", "handshake deadline from accept"),
    Setting("server", "max_auth_tries", _int_range(1, 100), "6", "auth attempts per connection"),
    Setting("server", "max_startups", _startups, "1000:30:4000", "unauthenticated connections"),
    Setting(
        "server",
        "per_source_max_startups",
        _int_range(1, 100000),
        "64",
        "unauthenticated connections from one address",
    ),
    Setting("server", "client_alive_interval", _seconds, "15", "server keepalive period (0: off)"),
    Setting(
        "server",
        "client_alive_count_max",
        _int_range(1, 1000),
        "3",
        "unanswered keepalives before disconnect",
    ),
    Setting(
        "server",
        "unused_connection_timeout",
        _seconds,
        "0",
        "close connections that hold no forward or channel (0: off)",
    ),
    Setting("server", "channel_open_timeout", _seconds, "15", "wait for an initiator's answer"),
    Setting("server", "max_forwards", _int_range(1, 65535), "64", "virtual ports per connection"),
    Setting("server", "max_channels", _int_range(1, 65535), "1024", "channels per connection"),
    Setting(
        "server",
        "channel_window",
        _int_range(32768, 16 * 1024 * 1024),
        "2097152",
        "receive window per circuit end, bytes",
    ),
    Setting(
        "server",
        "memory_per_connection",
        _size_or_off,
        "64M",
        "circuit window memory one connection may hold (K/M/G; 0: no limit)",
    ),
    Setting(
        "server",
        "memory_total",
        _size_or_off,
        "1G",
        "circuit window memory of the whole server; new circuits are refused beyond it"
        " (K/M/G; 0: no limit)",
    ),
    Setting(
        "server",
        "max_connections_per_key",
        _int_range(0, 1000000),
        "1024",
        "authenticated connections with one key (0: no limit)",
    ),
    Setting(
        "server",
        "max_connections_per_source",
        _int_range(0, 1000000),
        "1024",
        "authenticated connections from one address or IPv6 /64 (0: no limit)",
    ),
    Setting(
        "server",
        "ciphers",
        _algorithm_names("ciphers"),
        "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,"
        "aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        "ciphers, best first (OpenSSH Ciphers syntax: +append, -remove, ^prepend)",
    ),
    Setting(
        "server",
        "macs",
        _algorithm_names("macs"),
        "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com",
        "MACs for the CTR ciphers, best first (OpenSSH MACs syntax;"
        " +hmac-sha2-256,hmac-sha2-512 adds encrypt-and-MAC)",
    ),
    Setting(
        "server",
        "kex_algorithms",
        _algorithm_names("kex_algorithms"),
        "mlkem768x25519-sha256,curve25519-sha256,curve25519-sha256@libssh.org",
        "key exchange algorithms, best first (OpenSSH KexAlgorithms syntax;"
        " +ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521 adds NIST ECDH)",
    ),
    Setting(
        "server",
        "per_source_penalties",
        _bool,
        "true",
        "refuse sources that fail auth, send garbage or stall, for a growing time",
    ),
    Setting(
        "server",
        "per_source_penalty_exempt_list",
        _text,
        "",
        "addresses never penalised (from= patterns, comma separated)",
    ),
    Setting("log", "level", _choice("debug", "info", "warn", "error"), "info", "log level"),
    Setting("log", "format", _choice("text", "json"), "text", "text, or JSON lines"),
    # Operations: metrics and status page, webhooks.
    Setting(
        "metrics",
        "listen",
        lambda text: _endpoint_or_off(text),
        "",
        "HTTP endpoint for /metrics and the status page, e.g. tcp:9100:interface=127.0.0.1,"
        " or a port number (loopback); empty: off",
    ),
    Setting(
        "metrics",
        "allowed_hosts",
        lambda text: _host_names(text),
        "",
        "host names the status page answers besides localhost and loopback addresses"
        " (comma separated; * for any)",
    ),
    Setting(
        "metrics",
        "per_name_labels",
        _bool,
        "false",
        "add per-initiator name labels to metrics (one series per name: mind cardinality)",
    ),
    Setting("events", "url", lambda text: _url_or_off(text), "", "webhook URL; empty: off"),
    Setting(
        "events", "queue_size", _int_range(1, 1000000), "1000", "webhook events held when slow"
    ),
    Setting("events", "timeout", _seconds, "10", "webhook request timeout"),
    Setting("events", "retries", _int_range(0, 100), "5", "webhook retries, backing off"),
    Setting("events", "backoff", _seconds, "1", "first retry delay, doubling up to 5 minutes"),
    # Cluster: several nodes share one name space (empty redis_url: a single node).
    Setting(
        "cluster",
        "redis_url",
        lambda text: _redis_url(text),
        "",
        "Redis holding the shared registry: redis://[:password@]host[:port][/db] or"
        " unix:/path/to/redis.sock[?db=N]; empty: single node, in-memory registry",
    ),
    Setting(
        "cluster",
        "node_name",
        lambda text: _node_name(text),
        "",
        "this node's name in the cluster (letters, digits, - and _); empty: the host name",
    ),
    Setting(
        "cluster",
        "lease_time",
        lambda text: _seconds_between(text, 1, 60),
        "5",
        "a node's lease; a node silent this long has its names dropped by the others",
    ),
    Setting(
        "cluster",
        "redis_timeout",
        lambda text: _seconds_between(text, 0.1, 60),
        "2",
        "deadline of each Redis command; past it the command fails and the node is degraded",
    ),
    Setting(
        "cluster",
        "relay_listen",
        lambda text: _endpoint_or_off(text),
        "",
        "Twisted endpoint where this node accepts hops from other nodes; empty: off",
    ),
    Setting(
        "cluster",
        "relay_address",
        lambda text: _client_endpoint_or_off(text),
        "",
        "what other nodes dial to reach relay_listen: host:port or a Twisted client endpoint",
    ),
    Setting(
        "cluster",
        "cluster_key_file",
        _text,
        "",
        "the cluster's ed25519 private key, the same file on every node: hops between nodes"
        " log in with it, and the relay port accepts no other key",
    ),
)


def _key_command(text: str) -> tuple[str, ...]:
    from .keycommand import parse_command

    return parse_command(text)


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise ValueError("expected a time above 0, such as 5 or 30s")
    return value


def _seconds_between(text: str, low: float, high: float) -> float:
    value = _seconds(text)
    if not low <= value <= high:
        raise ValueError(f"expected a time from {low:g} to {high:g} seconds")
    return value


def _redis_url(text: str) -> str:
    """Checked here so a typo stops start-up instead of leaving the node degraded forever."""
    from urllib.parse import parse_qs, urlsplit

    value = text.strip()
    if not value:
        return ""
    try:
        parts = urlsplit(value)
        if parts.scheme == "redis":
            if not parts.hostname:
                raise ValueError("redis:// needs a host, e.g. redis://127.0.0.1:6379/0")
            _ = parts.port  # raises ValueError when out of range or not a number
            db = parts.path.strip("/")
            if db and not (db.isdigit() and int(db) < 10000):
                raise ValueError("the database after the host is a number, e.g. /0")
        elif parts.scheme == "unix":
            if not parts.path.startswith("/"):
                raise ValueError("unix: needs an absolute socket path, e.g. unix:/run/redis.sock")
            db_values = parse_qs(parts.query).get("db", ["0"])
            if not db_values[0].isdigit():
                raise ValueError("?db= takes a number")
        else:
            raise ValueError("expected redis://host:port/db or unix:/path/to/redis.sock")
    except ValueError as exc:
        raise ValueError(str(exc) or "not a Redis URL") from None
    return value


def _node_name(text: str) -> str:
    value = text.strip()
    if len(value) > 63 or any(not (ch.isascii() and (ch.isalnum() or ch in "-_")) for ch in value):
        raise ValueError("expected up to 63 letters, digits, - or _")
    return value


#: Client endpoint types whose descriptions look like host:port but are not.
_ENDPOINT_KINDS = frozenset({"tcp", "tcp6", "tls", "ssl", "unix"})


def _client_endpoint_or_off(text: str) -> str:
    """``host:port`` (the common case) or any Twisted client endpoint description."""
    value = text.strip()
    if not value:
        return ""
    kind = value.split(":", 1)[0]
    host, sep, port = value.rpartition(":")
    # "tcp:HOST:PORT" is already an endpoint: only a bare host:port gets the prefix.
    if sep and port.isdigit() and host and "=" not in value and kind.lower() not in _ENDPOINT_KINDS:
        if not 0 < int(port) <= 65535:
            raise ValueError("expected a port from 1 to 65535")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host.isalnum() or all(ch.isalnum() or ch in "-.:_" for ch in host):
            return f"tcp:{host.replace(':', chr(92) + ':')}:{int(port)}"
    if ":" not in value or not kind.isalnum():
        raise ValueError("expected host:port or a Twisted client endpoint such as tcp:HOST:PORT")
    return value


def _endpoint_or_off(text: str) -> str:
    """A Twisted server endpoint; a bare port number means loopback only."""
    value = text.strip()
    if not value:
        return ""
    if value.isdigit():
        if not 0 <= int(value) <= 65535:
            raise ValueError("expected a port from 0 to 65535")
        return f"tcp:{int(value)}:interface=127.0.0.1"
    kind = value.split(":", 1)[0]
    if ":" not in value or not kind.isalnum():
        raise ValueError("expected a Twisted endpoint such as tcp:9100:interface=127.0.0.1")
    return value


def _host_names(text: str) -> tuple[str, ...]:
    """Host names for the web listener's Host check: names, IP addresses, or ``*``."""
    names = tuple(n.strip().lower().rstrip(".") for n in text.split(",") if n.strip())
    for name in names:
        bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        if name == "*":
            continue
        if not bare or any(not (ch.isalnum() or ch in "-.:_") for ch in bare):
            raise ValueError(f"{name!r} is not a host name or address")
    return tuple(n[1:-1] if n.startswith("[") and n.endswith("]") else n for n in names)


def _url_or_off(text: str) -> str:
    value = text.strip()
    if value and not value.lower().startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value


# Config.values is keyed by key name alone, so a key name may appear in one section only.
assert len({s.key for s in SCHEMA}) == len(SCHEMA), "config keys must be unique across sections"


@dataclass(frozen=True)
class Config:
    """The validated settings; attribute names are the ini keys."""

    path: str
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def listen_endpoint(self) -> str:
        """Twisted endpoint description for the SSH listener."""
        host = self.values["listen_host"].replace(":", "\\:")
        port = self.values["listen_port"]
        if host in ("", "*"):
            return f"tcp:{port}"
        return f"tcp:{port}:interface={host}"


def resolve_path(explicit: str | None = None) -> str:
    """The config path: ``--config``, else ``$NUTTSSH_CONFIG_FILE``, else ``./nuttssh.ini``."""
    return explicit or os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str | None = None, *, required: bool = False) -> Config:
    """Read and validate the file; a missing default file means all defaults.

    A missing file that the user named explicitly is an error, since
    silently running on defaults would listen somewhere unexpected.
    """
    resolved = resolve_path(path)
    parser = configparser.ConfigParser(interpolation=configparser.BasicInterpolation())
    defaults: dict[str, dict[str, str]] = {}
    for s in SCHEMA:
        defaults.setdefault(s.section, {})[s.key] = s.default
    parser.read_dict(defaults)
    explicit = required or path is not None or ENV_VAR in os.environ
    try:
        with open(resolved, encoding="utf-8") as handle:
            parser.read_file(handle, source=resolved)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{resolved}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{resolved}: cannot read: {exc}") from None
    except configparser.Error as exc:
        raise ConfigError(f"{resolved}: {' '.join(str(exc).split())}") from None
    known = {(s.section, s.key) for s in SCHEMA}
    sections = {s.section for s in SCHEMA}
    for section in parser.sections():
        if section not in sections:
            raise ConfigError(
                f"{resolved}: [{section}]: unknown section (known: {', '.join(sorted(sections))})"
            )
        for key in parser[section]:
            if (section, key) not in known:
                raise ConfigError(f"{resolved}: [{section}] {key}: unknown key")
    values: dict[str, Any] = {}
    for s in SCHEMA:
        try:
            raw = parser.get(s.section, s.key, raw=s.raw)
        except configparser.Error as exc:
            raise ConfigError(f"{resolved}: [{s.section}] {s.key}: {exc.message}") from None
        try:
            values[s.key] = s.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{resolved}: [{s.section}] {s.key} = {raw!r}: {exc}") from None
    return Config(path=resolved, values=values)
