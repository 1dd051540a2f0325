# -*- test-case-name: tests.test_tap -*-
"""``twistd nuttconch``: command-line options and service composition, nothing else."""

from __future__ import annotations

import resource
import signal
from typing import Any

from twisted.application import internet, service, strports
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor
from twisted.internet.tcp import makeBinding
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from . import config as configmod
from .auth import AuthorizedKeysChecker, FirstUseLimiter
from .authkeys import AuthorizedKeysFile
from .avatar import SwitchboardRealm
from .hostkeys import HostKeyError, load_host_keys, load_or_create_secret
from .logs import make_observer
from .registry import InMemoryRegistry
from .server import SwitchboardFactory

log = Logger()
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

    def __init__(self, factory: SwitchboardFactory) -> None:
        super().__init__()
        self.factory = factory

    def startService(self) -> None:
        super().startService()
        # SIGHUP re-reads authorized_keys at once (it is also polled every 2 s).
        try:
            signal.signal(
                signal.SIGHUP,
                lambda *_: reactor.callFromThread(self.factory.checkKeys),  # type: ignore[attr-defined]
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
    cfg: configmod.Config, factory: Any, endpoint: str | None = None, reuse_port: bool = False
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
        return strports.service(endpoint, served), endpoint
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
    return internet.TCPServer(binding, served, backlog=LISTEN_BACKLOG, interface=interface), shown


def build(cfg: configmod.Config, clock: Any = None) -> tuple[SwitchboardFactory, Any]:
    """Make the factory and its parts from a validated config (used by tests too)."""
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
    registry = InMemoryRegistry()
    checker = AuthorizedKeysChecker(
        keys_file,
        secret,
        enable_auth=cfg.enable_auth,
        allow_new_clients=cfg.allow_new_clients,
        first_use=FirstUseLimiter(
            cfg.first_use_per_source, cfg.first_use_per_minute, cfg.first_use_max_keys
        ),
    )
    if not cfg.enable_auth:
        log.warn("enable_auth is off: anyone may connect with every permission")
    factory = SwitchboardFactory(cfg, registry, None, host_keys, clock=clock)
    factory.portal = Portal(SwitchboardRealm(factory), [checker])
    factory.watchKeys(keys_file)
    factory.checker = checker
    return factory, registry


def makeService(options: Options) -> service.IService:
    cfg: configmod.Config = options["loaded"]
    raise_fd_limit()
    try:
        factory, registry = build(cfg)
    except HostKeyError as exc:
        # One line naming the file, not a traceback (a loose mode, a bad or partial key).
        raise SystemExit(f"nuttconch: {exc}") from None
    top = SwitchboardService(factory)
    registry.setServiceParent(top)
    internet.TimerService(KEYS_POLL_SECONDS, factory.checkKeys).setServiceParent(top)
    ssh, endpoint = listener(cfg, factory, options["listen"], options["reuse-port"])
    ssh.setName("ssh")
    ssh.setServiceParent(top)
    from .web import install as install_operations

    if not options["no-metrics"]:
        install_operations(factory, cfg, top)
    worker = f" as worker {options['worker']}" if options["worker"] else ""
    log.info(
        "nuttconch listening on {endpoint}{worker} (config {path})",
        endpoint=endpoint,
        worker=worker,
        path=cfg.path,
    )
    return top
