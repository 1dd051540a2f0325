# -*- test-case-name: tests.test_tap,tests.test_twistd,tests.test_ops -*-
"""``twistd nuttconch``: command-line options and service composition, nothing else.

Every long-lived object is built here, once, and handed to those that use
it: the event bus, admission, the registry, the checker, the factory, metrics,
webhooks and the listeners.  ``makeService`` takes the reactor, so a test can
pass a ``MemoryReactorClock`` and see what would listen and when timers fire.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import signal
import socket
from typing import Any

from twisted.application import internet, service, strports
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.tcp import makeBinding
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from . import config as configmod
from . import events as eventsmod
from . import metrics as metricsmod
from . import web, webhooks
from .admission import Admission
from .auth import AuthorizedKeysChecker, FirstUseLimiter
from .authkeys import AuthorizedKeysFile
from .avatar import SwitchboardRealm
from .certs import RevokedKeys
from .hostkeys import HostKeyError, load_host_keys, load_or_create_secret
from .hostnames import VerifiedNames
from .keycommand import KeyCommand
from .logs import make_observer
from .registry import InMemoryRegistry
from .server import SwitchboardFactory

log = Logger()
# The lines about the operations listener keep the namespace they were logged under.
webLog = Logger(namespace="nuttconch.web")
KEYS_POLL_SECONDS = 2.0
# Connections the kernel may hold accepted-but-not-yet-taken (capped by net.core.somaxconn).
LISTEN_BACKLOG = 4096


class Options(usage.Options):
    synopsis = "[--config PATH] [--listen ENDPOINT]"
    longdesc = (
        "SSH switchboard: initiators connect with ssh -R and get virtual ports; "
        "clients reach them with ssh -L, -W, -J or -D. Settings come from nuttssh.ini "
        "(--config, else $NUTTSSH_CONFIG_FILE, else ./nuttssh.ini)."
    )
    optParameters = [
        ["config", "c", None, "path of nuttssh.ini"],
        ["listen", "l", None, "Twisted endpoint to listen on, overriding listen_host/port"],
        ["worker", None, None, "worker number (set by --workers; logs and metrics port)"],
    ]
    optFlags = [
        ["reuse-port", None, "share the port with other processes (as [server] reuse_port)"],
        ["no-metrics", None, "do not start the [metrics] listener (workers after the first)"],
    ]

    def postOptions(self) -> None:
        try:
            self["loaded"] = configmod.load(self["config"])
        except configmod.ConfigError as exc:
            # Not UsageError: twistd would print the whole usage text around the one line.
            raise SystemExit(f"nuttconch: {exc}") from None


class SwitchboardService(service.MultiService):
    """Stops listening, disconnects everyone politely, then lets twistd exit."""

    def __init__(self, factory: SwitchboardFactory, reactor: Any = None) -> None:
        super().__init__()
        self.factory = factory
        self.reactor: Any = reactor if reactor is not None else factory.clock

    def startService(self) -> None:
        super().startService()
        # SIGHUP re-reads authorized_keys at once (it is also polled every 2 s).
        try:
            signal.signal(
                signal.SIGHUP,
                lambda *_: self.reactor.callFromThread(self.factory.checkKeys),
            )
        except ValueError:
            pass  # not the main thread (tests)

    def setServiceParent(self, parent: Any) -> Any:
        """Under twistd, log as the config says unless ``--logger`` chose otherwise."""
        setComponent = getattr(parent, "setComponent", None)
        if setComponent is not None:
            cfg = self.factory.config
            setComponent(ILogObserver, make_observer(cfg.level, cfg.format))
        return super().setServiceParent(parent)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        listeners = [s for s in self if getattr(s, "name", None) == "ssh"]
        for s in listeners:
            yield defer.maybeDeferred(s.stopService)
        log.info("stopping: disconnecting {n} connections", n=len(self.factory.transports))
        done = self.factory.disconnectAll()
        clock = self.factory.clock
        timeout = clock.callLater(5, done.cancel)
        try:
            yield done
        except defer.CancelledError:
            pass
        if timeout.active():
            timeout.cancel()
        yield super().stopService()


def raise_fd_limit() -> tuple[int, int]:
    """Fleets need many descriptors: lift the soft limit to the hard one, and say what we got.

    Every held connection is one descriptor, so the soft limit (often 1024) and not
    memory is what first caps how many initiators one process serves. Returns
    (soft, hard) as they are afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    before = soft
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warn(
                "could not raise the open-file limit from {soft} to {target}: {why}",
                soft=soft,
                target=target,
                why=exc,
            )
    shown = "unlimited" if hard == resource.RLIM_INFINITY else hard
    log.info(
        "open-file limit: {soft} (was {before}, hard limit {hard}); about {soft} connections"
        " at most",
        soft=soft,
        before=before,
        hard=shown,
    )
    return soft, hard


def listener(
    cfg: configmod.Config,
    factory: Any,
    endpoint: str | None = None,
    reuse_port: bool = False,
    reactor: Any = None,
) -> tuple[service.IService, str]:
    """The SSH listening service, and a description of it for the log.

    Built here rather than from a strports string: the listen backlog must hold a
    fleet's reconnect storm (Twisted's default of 50 drops SYNs past it, and each
    dropped SYN costs the device a one-second retransmit), ``reuse_port`` needs
    SO_REUSEPORT, and with ``proxy_protocol`` the SSH factory sits behind the
    header reader. ``--listen`` still takes any Twisted endpoint.
    """
    served: Any = factory
    if cfg.proxy_protocol:
        from .authkeys import match_from
        from .proxyproto import ProxyHeaderFactory

        patterns = cfg.proxy_protocol_from
        allowed = (lambda host: match_from(patterns, host)) if patterns else None
        served = ProxyHeaderFactory(factory, factory.clock, allowed)
    if endpoint:
        return strports.service(endpoint, served, reactor=reactor), endpoint
    host = cfg.listen_host
    interface = "" if host in ("", "*") else host
    binding = makeBinding(
        interface, cfg.listen_port, reuseAddress=True, reusePort=reuse_port or cfg.reuse_port
    )
    shown = f"{interface or '*'}:{cfg.listen_port}"
    if reuse_port or cfg.reuse_port:
        shown += " (reuse_port)"
    if cfg.proxy_protocol:
        shown += " (PROXY protocol)"
    server = internet.TCPServer(
        binding, served, backlog=LISTEN_BACKLOG, interface=interface, reactor=reactor
    )
    return server, shown


def default_relay_address(relay_listen: str) -> str:
    """What other nodes dial when ``relay_address`` is empty: this host's name and the
    relay port, when the relay listens on every address (``tcp:PORT``); else nothing."""
    match = re.match(r"^tcp6?:(\d+)(.*)$", relay_listen)
    if match is None:
        return ""
    interface = re.search(r"interface=([^:]*(?:\\:[^:]*)*)", match.group(2))
    if interface is not None and interface.group(1) not in ("0.0.0.0", "\\:\\:", ""):
        return ""
    return f"tcp:{socket.gethostname()}:{match.group(1)}"


def make_registry(
    cfg: configmod.Config, secret: bytes = b"", host_keys: dict[bytes, Any] | None = None
) -> Any:
    """The in-memory registry, or with ``[cluster] redis_url`` the one shared over Redis."""
    if not cfg.redis_url:
        return InMemoryRegistry()
    from .cluster.registry import RedisRegistry, identity_of

    registry = RedisRegistry(
        cfg.redis_url,
        cfg.node_name,
        lease=cfg.lease_time,
        timeout=cfg.redis_timeout,
        info={"relay": cfg.relay_address or default_relay_address(cfg.relay_listen)},
    )
    if secret:
        registry.identity = identity_of(secret, host_keys or {})
    return registry


def build(cfg: configmod.Config, clock: Any = None) -> tuple[SwitchboardFactory, Any]:
    """Make the factory and its parts from a validated config (used by tests too)."""
    if clock is None:
        from twisted.internet import reactor as clock
    host_keys = load_host_keys(
        {
            "ecdsa": cfg.host_key_ecdsa,
            "ed25519": cfg.host_key_ed25519,
            "rsa": cfg.host_key_rsa,
        }
    )
    secret = load_or_create_secret(cfg.host_key_dir)
    keys_file = AuthorizedKeysFile(cfg.authorized_keys_file)
    keys_file.ensure_exists()
    registry = make_registry(cfg, secret, host_keys)
    revoked = RevokedKeys(cfg.revoked_keys_file) if cfg.revoked_keys_file else None
    if revoked is not None:
        revoked.refresh()  # logs what it read, or that logins are refused until it is readable
    checker = AuthorizedKeysChecker(
        keys_file,
        secret,
        enable_auth=cfg.enable_auth,
        allow_new_clients=cfg.allow_new_clients,
        first_use=FirstUseLimiter(
            cfg.first_use_per_source, cfg.first_use_per_minute, cfg.first_use_max_keys
        ),
        names=VerifiedNames(clock) if cfg.use_dns else None,
        key_command=_key_command(cfg, clock),
        revoked=revoked,
    )
    if not cfg.enable_auth:
        log.warn("enable_auth is off: anyone may connect with every permission")
    bus = eventsmod.EventBus()
    admission = Admission(cfg, clock, bus)
    factory = SwitchboardFactory(
        cfg, registry, None, host_keys, clock=clock, events=bus, admission=admission
    )
    factory.portal = Portal(SwitchboardRealm(factory), [checker])
    factory.watchKeys(keys_file)
    factory.checker = checker
    if cfg.redis_url:
        from .cluster.keysync import KeySync

        # Grants, revokes, bans and first-use keys apply on every node.
        KeySync(registry, keys_file, factory)  # held by the file's and the log's handlers
    return factory, registry


def _key_command(cfg: configmod.Config, reactor: Any) -> KeyCommand | None:
    """authorized_keys_command, if configured."""
    if not cfg.authorized_keys_command:
        return None
    return KeyCommand(
        cfg.authorized_keys_command,
        reactor,
        timeout=cfg.authorized_keys_command_timeout,
        max_output=cfg.authorized_keys_command_max_output,
        cache_time=cfg.authorized_keys_command_cache,
    )


def install_operations(
    factory: SwitchboardFactory, cfg: configmod.Config, parent: Any, reactor: Any = None
) -> None:
    """Metrics, event log lines, the HTTP listener and webhooks, as ``cfg`` asks, all
    subscribed to the factory's event bus and handed to the factory by this one place."""
    bus = factory.events
    metrics = metricsmod.Metrics(factory, cfg.per_name_labels)
    bus.subscribe(metrics.observe)
    factory.metrics = metrics
    eventsmod.attach(bus)
    if cfg.listen:
        web.service(cfg.listen, factory, metrics, cfg.allowed_hosts, reactor).setServiceParent(
            parent
        )
        if web.listens_everywhere(cfg.listen):
            webLog.warn(
                "[metrics] listen = {endpoint} listens on every address; the status page"
                " shows addresses and key fingerprints",
                endpoint=cfg.listen,
            )
        webLog.info("metrics and status page on {endpoint}", endpoint=cfg.listen)
    if cfg.url:
        hooks = webhooks.Webhooks(
            cfg.url,
            queue_size=cfg.queue_size,
            timeout=cfg.timeout,
            retries=cfg.retries,
            backoff=cfg.backoff,
            server=cfg.server_fqdn,
            reactor=reactor,
        )
        bus.subscribe(hooks.observe)
        factory.webhooks = hooks
        hooks.setServiceParent(parent)


_SERVER_PORT = re.compile(r"^(tcp6?:)(\d+)(.*)$")
_CLIENT_PORT = re.compile(r"^(tcp6?:(?:[^:\\]|\\.)+:)(\d+)(.*)$")


def _worker_endpoint(text: str, index: int, pattern: re.Pattern[str]) -> str:
    """The endpoint of worker ``index``: a TCP port moved up by index - 1, a Unix path
    given a ``-wN`` suffix."""
    if not text or index <= 1:
        return text
    match = pattern.match(text)
    if match is not None:
        return f"{match.group(1)}{int(match.group(2)) + index - 1}{match.group(3)}"
    if text.startswith("unix:"):
        path, sep, rest = text[5:].partition(":")
        return f"unix:{path}-w{index}{sep}{rest}"
    raise ValueError(
        f"--workers with [cluster] needs relay endpoints of the form tcp:PORT or unix:PATH"
        f" (each worker takes its own), not {text!r}"
    )


def worker_config(cfg: configmod.Config, index: int) -> configmod.Config:
    """What worker ``index`` of ``--workers`` runs with: in a cluster every worker is a
    node of its own (a node name is held by one process), so it gets ``NAME-wINDEX``
    and its own relay port (the configured one plus index - 1) or socket path."""
    if not cfg.redis_url or index < 1:
        return cfg
    from .cluster.registry import default_node_name

    base = cfg.node_name or default_node_name()
    values = {
        **cfg.values,
        "node_name": f"{base[:59]}-w{index}",
        "relay_listen": _worker_endpoint(cfg.relay_listen, index, _SERVER_PORT),
        "relay_address": _worker_endpoint(cfg.relay_address, index, _CLIENT_PORT),
    }
    return dataclasses.replace(cfg, values=values)


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """The whole server from parsed options: every part built here, on ``reactor``."""
    if reactor is None:
        from twisted.internet import reactor
    cfg: configmod.Config = options["loaded"]
    if options["worker"]:
        try:
            cfg = worker_config(cfg, int(options["worker"]))
        except ValueError as exc:
            raise SystemExit(f"nuttconch: {exc}") from None
    raise_fd_limit()
    try:
        factory, registry = build(cfg, clock=reactor)
    except HostKeyError as exc:
        # One line naming the file, not a traceback (a loose mode, a bad or partial key).
        raise SystemExit(f"nuttconch: {exc}") from None
    top = SwitchboardService(factory, reactor)
    registry.setServiceParent(top)
    keys = internet.TimerService(KEYS_POLL_SECONDS, factory.checkKeys)
    keys.clock = reactor
    keys.setServiceParent(top)
    ssh, endpoint = listener(cfg, factory, options["listen"], options["reuse-port"], reactor)
    ssh.setName("ssh")
    ssh.setServiceParent(top)
    from .cluster.relay import install as install_relay

    try:
        install_relay(factory, cfg, top, reactor)
    except ValueError as exc:
        raise SystemExit(f"nuttconch: {exc}") from None
    if not options["no-metrics"]:
        install_operations(factory, cfg, top, reactor)
    worker = f" as worker {options['worker']}" if options["worker"] else ""
    log.info(
        "nuttconch listening on {endpoint}{worker} (config {path})",
        endpoint=endpoint,
        worker=worker,
        path=cfg.path,
    )
    return top
