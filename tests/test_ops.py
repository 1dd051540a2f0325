"""Operations end to end: /metrics while circuits run, webhooks, structured logs, config."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import treq
from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server

from nuttconch import config as configmod
from nuttconch import metrics as metricsmod
from nuttconch import webhooks
from nuttconch.tap import install_operations

from .harness import SwitchboardTestMixin, listen_echo


class OpsTestMixin(SwitchboardTestMixin):
    """The harness server plus what makeService adds: metrics, event logs, web, webhooks.

    ``ops`` holds extra ini sections, e.g. ``{"metrics": {"listen": "tcp:0:..."}}``.
    """

    ops: dict[str, dict[str, str]] = {
        "metrics": {"listen": "tcp:0:interface=127.0.0.1"},
    }

    def writeConfig(self, **overrides: str) -> str:
        path = super().writeConfig(**overrides)
        sections = {k: dict(v) for k, v in self.ops.items()}
        for name, values in getattr(self, "extraOps", {}).items():
            sections.setdefault(name, {}).update(values)
        with open(path, "a") as handle:
            for name, values in sections.items():
                handle.write(f"[{name}]\n")
                for key, value in values.items():
                    handle.write(f"{key} = {value}\n")
        return path

    def startServer(self, **overrides: str) -> Any:
        super().startServer(**overrides)
        self.parent = service.MultiService()
        install_operations(self.factory, self.config, self.parent)
        self.metrics = self.factory.metrics
        self.parent.startService()
        self.addCleanup(self.parent.stopService)
        self.http = None
        svc = self.parent.namedServices.get("metrics-http")
        if svc is not None:
            return svc._waitingForPort.addCallback(self._gotHTTP)
        return None

    def _gotHTTP(self, port: Any) -> Any:
        self.http = f"http://127.0.0.1:{port.getHost().port}"
        return port  # the service needs it to stop listening

    @defer.inlineCallbacks
    def get(self, path: str, **kwargs: Any) -> Any:
        response = yield treq.get(self.http + path, persistent=False, **kwargs)
        body = yield treq.content(response)
        return response, body

    @defer.inlineCallbacks
    def scrape(self) -> Any:
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        return parse_metrics(body.decode())


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, from the Prometheus text format."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = float(value)
    return values


class MetricsTests(OpsTestMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_numbers_move_while_a_circuit_runs(self) -> Any:
        """Scraped during a circuit: gauges show it and its bytes; after: totals stay."""
        before = yield self.scrape()
        self.assertEqual(before['nuttconch_circuits_opened_total{outcome="ok"}'], 0)
        self.assertEqual(before["nuttconch_circuits_open"], 0)
        target = listen_echo(self)
        yield self.initiator(self.key("dev"), "dev", f"6379:localhost:{target}")
        name = self.registry.listeners()[0].connect_name
        client = self.spawn(self.key("cli"), "cli", "-W", f"{name}:6379", stdin=None)
        chunk = b"x" * 50000
        client.transport.write(chunk)
        yield self.waitFor(lambda: len(client.out) >= len(chunk), what="echo")
        during = yield self.scrape()
        self.assertEqual(during["nuttconch_circuits_open"], 1)
        self.assertEqual(during['nuttconch_circuits_opened_total{outcome="ok"}'], 1)
        self.assertEqual(during["nuttconch_initiators"], 1)
        self.assertEqual(during["nuttconch_virtual_ports"], 1)
        self.assertEqual(during['nuttconch_connections{state="authenticated"}'], 2)
        self.assertEqual(during["nuttconch_circuit_setup_seconds_count"], 1)
        self.assertGreaterEqual(during['nuttconch_circuit_bytes_total{direction="up"}'], 50000)
        self.assertGreaterEqual(during['nuttconch_circuit_bytes_total{direction="down"}'], 50000)
        self.assertEqual(during['nuttconch_authentications_total{reason="new_key",result="ok"}'], 2)
        self.assertEqual(during["nuttconch_keys_added_total"], 2)
        # More bytes through the same circuit move the counters between scrapes.
        client.transport.write(chunk)
        yield self.waitFor(lambda: len(client.out) >= 2 * len(chunk), what="second echo")
        later = yield self.scrape()
        self.assertGreaterEqual(later['nuttconch_circuit_bytes_total{direction="up"}'], 100000)
        client.transport.closeStdin()
        yield client.ended
        yield self.waitFor(lambda: not list(metricsmod.live_circuits(self.factory)))
        after = yield self.scrape()
        self.assertEqual(after["nuttconch_circuits_open"], 0)
        self.assertGreaterEqual(after['nuttconch_circuit_bytes_total{direction="up"}'], 100000)
        self.assertGreaterEqual(after['nuttconch_circuit_bytes_total{direction="down"}'], 100000)
        self.assertNotIn(name, "\n".join(after))  # no per-name labels unless asked for

    @defer.inlineCallbacks
    def test_outcomes_and_auth_reasons(self) -> Any:
        """Failed circuits count by outcome; refused logins by reason."""
        out, err, code = yield self.ssh(self.key("c1"), "c1", "-W", "nosuch:22", stdin=b"x")
        self.assertEqual(code, 255)
        self.key("nolisten", options='access="initiate"')
        target = listen_echo(self)
        yield self.initiator(self.key("dev"), "dev", f"22:localhost:{target}")
        name = self.registry.listeners()[0].connect_name
        out, err, code = yield self.ssh(
            os.path.join(self.dir, "nolisten"), "x", "-W", f"{name}:22", stdin=b"x"
        )
        self.assertEqual(code, 255)
        denied = self.key("bad", options='access="denied"')
        out, err, code = yield self.ssh(denied, "bad", command=("whoami",))
        self.assertEqual(code, 255)
        values = yield self.scrape()
        self.assertEqual(values['nuttconch_circuits_opened_total{outcome="no_such_name"}'], 1)
        self.assertEqual(values['nuttconch_circuits_opened_total{outcome="refused"}'], 1)
        self.assertEqual(values['nuttconch_circuits_opened_total{outcome="timeout"}'], 0)
        self.assertEqual(values['nuttconch_circuits_opened_total{outcome="initiator_refused"}'], 0)
        self.assertGreaterEqual(
            values['nuttconch_authentications_total{reason="denied",result="fail"}'], 1
        )
        self.assertIn("nuttconch_penalties_in_force", values)

    @defer.inlineCallbacks
    def test_initiator_refused_outcome(self) -> Any:
        """An initiator whose local target is closed refuses: counted as initiator_refused."""
        yield self.initiator(self.key("dev"), "dev", "2200:127.0.0.1:1")
        name = self.registry.listeners()[0].connect_name
        out, err, code = yield self.ssh(self.key("c"), "c", "-W", f"{name}:2200", stdin=b"x")
        self.assertEqual(code, 255)
        values = yield self.scrape()
        self.assertEqual(values['nuttconch_circuits_opened_total{outcome="initiator_refused"}'], 1)

    @defer.inlineCallbacks
    def test_openmetrics_and_read_only(self) -> Any:
        """OpenMetrics when asked for; the listener refuses writes."""
        response, body = yield self.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        self.assertIn(b"openmetrics", response.headers.getRawHeaders("content-type")[0].encode())
        self.assertTrue(body.rstrip().endswith(b"# EOF"))
        response = yield treq.post(self.http + "/api/listeners", data=b"x", persistent=False)
        yield treq.content(response)
        self.assertEqual(response.code, 405)
        response, body = yield self.get("/nosuch")
        self.assertEqual(response.code, 404)


class PerNameMetricsTests(OpsTestMixin, unittest.TestCase):
    extraOps = {"metrics": {"per_name_labels": "true"}}

    @defer.inlineCallbacks
    def test_per_name_labels(self) -> Any:
        """With per_name_labels, series carry the initiator's connect name."""
        target = listen_echo(self)
        yield self.initiator(self.key("dev"), "dev", f"80:localhost:{target}")
        name = self.registry.listeners()[0].connect_name
        out, err, code = yield self.ssh(self.key("c"), "c", "-W", f"{name}:80", stdin=b"hello")
        self.assertEqual(out, b"hello")
        yield self.waitFor(lambda: not list(metricsmod.live_circuits(self.factory)))
        values = yield self.scrape()
        self.assertEqual(values[f'nuttconch_name_circuits_opened_total{{name="{name}"}}'], 1)
        self.assertEqual(values[f'nuttconch_name_virtual_ports{{name="{name}"}}'], 1)
        self.assertEqual(
            values[f'nuttconch_name_circuit_bytes_total{{direction="up",name="{name}"}}'], 5
        )


class Receiver(resource.Resource):
    """A webhook receiver: records JSON bodies; answers ``codes`` in turn, then 200."""

    isLeaf = True

    def __init__(self, codes: list[int] | None = None) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.codes = list(codes or [])
        self.hits = 0
        self.headers: list[Any] = []

    def render_POST(self, request: Any) -> bytes:
        self.hits += 1
        self.headers.append(request.requestHeaders)
        if self.codes:
            request.setResponseCode(self.codes.pop(0))
            return b"try again"
        self.bodies.append(json.loads(request.content.read()))
        return b"ok"


def start_receiver(testcase: Any, receiver: Receiver) -> str:
    site = server.Site(receiver)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}/hook?token=secret"


class WebhookMixin(OpsTestMixin):
    ops: dict[str, dict[str, str]] = {}
    codes: list[int] = []

    def setUp(self) -> Any:
        self.receiver = Receiver(self.codes)
        url = start_receiver(self, self.receiver)
        self.extraOps = {"events": {"url": url, "backoff": "0.05", "retries": "3"}}
        return super().setUp()

    def events(self) -> list[str]:
        return [b["event"] for b in self.receiver.bodies]


class WebhookTests(WebhookMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_posts_for_initiator_and_circuit(self) -> Any:
        """Initiator up/down and circuit open/close arrive as JSON posts, in order."""
        target = listen_echo(self)
        proc = yield self.initiator(self.key("dev"), "dev", f"80:localhost:{target}")
        name = self.registry.listeners()[0].connect_name
        out, err, code = yield self.ssh(self.key("c"), "c", "-W", f"{name}:80", stdin=b"ping")
        self.assertEqual(out, b"ping")
        yield proc.kill()
        yield self.waitFor(
            lambda: (
                self.events() == ["initiator.up", "circuit.open", "circuit.close", "initiator.down"]
            ),
            what=f"four webhook posts, got {self.events()}",
        )
        up, opened, closed, down = self.receiver.bodies
        self.assertEqual(up["name"], name)
        self.assertEqual(up["peer"], "127.0.0.1")
        self.assertTrue(up["fingerprint"].startswith("SHA256:"))
        self.assertEqual(opened["target"], f"{name}:80")
        self.assertIn("latency", opened)
        # The registry's listener id is for the server's own observers, not the body.
        self.assertEqual(
            sorted(opened), ["circuit_id", "client", "event", "latency", "seq", "server",
                             "target", "time"]
        )  # fmt: skip
        self.assertEqual((closed["bytes_up"], closed["bytes_down"]), (4, 4))
        self.assertIn("duration", closed)
        self.assertEqual([b["seq"] for b in self.receiver.bodies], [1, 2, 3, 4])
        self.assertEqual(up["server"], "switchboard")
        headers = self.receiver.headers[0]
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(self.factory.webhooks.stats()["sent"], 4)


class WebhookRetryTests(WebhookMixin, unittest.TestCase):
    codes = [500, 503, 429]

    @defer.inlineCallbacks
    def test_retries_with_backoff(self) -> Any:
        """5xx and 429 answers are retried until the receiver takes the event."""
        yield self.initiator(self.key("dev"), "dev", "80:localhost:80")
        yield self.waitFor(lambda: self.events() == ["initiator.up"], what="a delivered post")
        self.assertEqual(self.receiver.hits, 4)
        self.assertEqual(self.factory.webhooks.stats()["retried"], 3)


class _HangingClient:
    """An HTTP client whose requests never answer."""

    def __init__(self) -> None:
        self.requests: list[defer.Deferred[Any]] = []

    def post(self, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.requests.append(d)
        return d


class WebhookQueueTests(unittest.TestCase):
    def test_bounded_and_never_blocking(self) -> None:
        """A stuck receiver: the observer returns at once, and the queue never grows past size."""
        clock = task.Clock()
        client = _HangingClient()
        hooks = webhooks.Webhooks(
            "http://example.invalid/", queue_size=3, reactor=clock, client=client
        )
        hooks.startService()
        for n in range(10):
            hooks.observe("circuit.open", {"circuit_id": n})
        hooks.observe("auth.ok", {})  # not a webhook event
        clock.advance(0)
        self.assertEqual(len(client.requests), 1)
        self.assertEqual(hooks.stats(), {"sent": 0, "dropped": 7, "failed": 0, "retried": 0,
                                         "queued": 3})  # fmt: skip
        # The one in flight fails: retried after the backoff, in order.
        client.requests[0].errback(RuntimeError("boom"))
        clock.advance(0.5)
        self.assertEqual(len(client.requests), 1)
        clock.advance(0.6)
        self.assertEqual(len(client.requests), 2)
        hooks.stopService()

    def test_safe_url(self) -> None:
        """Logged URLs keep neither credentials nor the path or query."""
        self.assertEqual(
            webhooks.safe_url("https://user:pw@hooks.example.org:8443/x/y?token=t"),
            "https://hooks.example.org:8443/...",
        )


class LogTests(OpsTestMixin, unittest.TestCase):
    ops: dict[str, dict[str, str]] = {}

    @defer.inlineCallbacks
    def test_one_structured_event_each(self) -> Any:
        """Auth, forward, circuit and initiator events are logged with their fields."""
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        target = listen_echo(self)
        devkey = self.key("dev")
        proc = yield self.initiator(devkey, "dev", f"80:localhost:{target}")
        name = self.registry.listeners()[0].connect_name
        out, err, code = yield self.ssh(self.key("c"), "c", "-W", f"{name}:80", stdin=b"abc")
        yield proc.kill()
        yield self.waitFor(lambda: not self.registry.listeners())
        yield task.deferLater(reactor, 0.1, lambda: None)
        texts = [formatEvent(e) for e in logged]
        joined = "\n".join(texts)
        self.assertRegex(joined, r"authenticated dev key SHA256:")
        self.assertIn(f"{name} forwards virtual port 80", joined)
        self.assertIn(f"initiator {name} up from 127.0.0.1 (key SHA256:", joined)
        self.assertIn("ports 80 released", joined)
        closed = [e for e in logged if "bytes_up" in e and "duration" in e]
        self.assertEqual(len(closed), 1)
        self.assertEqual((closed[0]["bytes_up"], closed[0]["bytes_down"]), (3, 3))
        self.assertTrue(any("closed" in t and "conn" in t for t in texts))
        # No secret: neither private key material nor the alias secret appears.
        with open(devkey) as handle:
            private_b64 = "".join(handle.read().splitlines()[1:-1])[:40]
        with open(os.path.join(self.keydir, "alias_secret"), "rb") as handle:
            secret = handle.read()
        dumped = json.dumps([{k: repr(v) for k, v in e.items()} for e in logged])
        self.assertNotIn(private_b64, dumped)
        self.assertNotIn(secret.hex(), dumped)
        self.assertNotIn(repr(secret)[2:-1], dumped)


class ConfigTests(unittest.TestCase):
    def load(self, text: str) -> Any:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(text)
        return configmod.load(path)

    def test_defaults_off(self) -> None:
        """Metrics listener and webhooks are off by default."""
        cfg = self.load("")
        self.assertEqual((cfg.listen, cfg.url, cfg.per_name_labels), ("", "", False))

    def test_port_means_loopback(self) -> None:
        """A bare port listens on loopback only."""
        cfg = self.load("[metrics]\nlisten = 9100\n")
        self.assertEqual(cfg.listen, "tcp:9100:interface=127.0.0.1")
        cfg = self.load("[metrics]\nlisten = tcp6:9100:interface=\\:\\:1\n")
        self.assertEqual(cfg.listen, "tcp6:9100:interface=\\:\\:1")

    def test_bad_values_name_the_key(self) -> None:
        """Bad values stop start-up with the key named."""
        with self.assertRaisesRegex(configmod.ConfigError, r"\[events\] url"):
            self.load("[events]\nurl = ftp://x\n")
        with self.assertRaisesRegex(configmod.ConfigError, r"\[metrics\] listen"):
            self.load("[metrics]\nlisten = nonsense\n")

    def test_make_service_adds_listener_and_webhooks(self) -> None:
        """makeService parents the HTTP listener and the webhook sender when configured."""
        from nuttconch.tap import Options, makeService

        keydir = os.path.abspath(self.mktemp())
        import shutil

        from .harness import host_key_dir

        shutil.copytree(host_key_dir(), keydir)
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(
                f"[keys]\nhost_key_dir = {keydir}\n[metrics]\nlisten = 9100\n"
                "[events]\nurl = http://127.0.0.1:9/hook\n"
            )
        options = Options()
        options.parseOptions(["--config", path])
        top = makeService(options)
        names = {getattr(s, "name", None) for s in top}
        self.assertIn("metrics-http", names)
        self.assertIn("webhooks", names)
        metrics_svc = next(s for s in top if getattr(s, "name", None) == "metrics-http")
        self.assertTrue(re.search("interface=127.0.0.1", metrics_svc.endpoint._interface) or
                        metrics_svc.endpoint._interface == "127.0.0.1")  # fmt: skip


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as handle:
        return handle.read()


class DeploymentTests(SwitchboardTestMixin, unittest.TestCase):
    """The deployment files agree with the README and work against a real server."""

    def test_dockerfile_uses_the_readme_install_command(self) -> None:
        """The image is built with the README's first command, so the two cannot drift."""
        readme = read("README.md")
        first = readme.split("```")[1].strip().splitlines()[0]
        install, run = (part.strip() for part in first.split("&&"))
        dockerfile = read("Dockerfile")
        self.assertIn(f"\nRUN {install}\n", dockerfile)
        self.assertEqual(run, "twistd -n nuttconch")
        self.assertIn('CMD ["nuttconch"]', dockerfile)  # the same, without a pid file
        self.assertRegex(dockerfile, r"\nFROM python:[0-9.]+-slim\n")
        self.assertRegex(dockerfile, r"\nUSER nuttconch\n")
        self.assertIn('VOLUME ["/var/lib/nuttconch/keys"]', dockerfile)
        self.assertIn("keys", read(".dockerignore").split())

    @defer.inlineCallbacks
    def test_healthcheck_command_against_a_server(self) -> Any:
        """The HEALTHCHECK script passes against a live server and fails without one."""
        line = next(x for x in read("Dockerfile").splitlines() if x.strip().startswith("CMD ["))
        argv = json.loads(line.strip()[len("CMD ") :])
        self.assertEqual(argv[:2], ["python", "-c"])
        script = argv[2].replace("2222", str(self.port))
        from twisted.internet.utils import getProcessValue

        code = yield getProcessValue(sys.executable, ["-c", script], env=os.environ)
        self.assertEqual(code, 0)
        yield self.listening.stopListening()
        self.listening = None
        code = yield getProcessValue(sys.executable, ["-c", script], env=os.environ)
        self.assertNotEqual(code, 0)

    def test_systemd_unit(self) -> None:
        """The unit runs the console script sandboxed, with its state in StateDirectory."""
        unit = read("deploy/nuttconch.service")
        for setting in (
            "ExecStart=/opt/nuttconch/bin/nuttconch",
            "StateDirectory=nuttconch",
            "WorkingDirectory=/var/lib/nuttconch",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
            "SystemCallFilter=@system-service",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        ):
            self.assertIn(setting, unit)

    def test_compose_config_loads(self) -> None:
        """The compose example's nuttssh.ini is valid and enables the metrics listener."""
        cfg = configmod.load(os.path.join(ROOT, "deploy", "nuttssh.compose.ini"))
        self.assertEqual(cfg.listen, "tcp:9100")
        compose = read("docker-compose.yml")
        self.assertIn('"127.0.0.1:9100:9100"', compose)
        self.assertIn("./deploy/nuttssh.compose.ini:/etc/nuttconch/nuttssh.ini:ro", compose)
