# -*- test-case-name: tests.test_webpage -*-
"""The operations HTTP listener: /metrics, a read-only status page, and its JSON API.

Routes (GET only; anything else is 405):

- ``/metrics``: Prometheus text format, from prometheus_client's own encoder
  (``choose_encoder`` honours an OpenMetrics ``Accept`` header). It runs in
  the reactor thread, not through prometheus_client's WSGI resource, because
  collecting reads live connection state that only the reactor may touch.
- ``/``: a static page whose script polls the two JSON endpoints below and
  redraws its tables in place (no reload).
- ``/api/listeners``, ``/api/circuits``: JSON snapshots.

It is off unless ``[metrics] listen`` is set, and a bare port listens on
loopback only; it shows addresses and key fingerprints, so keep it there or
behind an authenticating proxy.

Every request must name this server in its Host header: a loopback address,
``localhost``, or a name in ``[metrics] allowed_hosts``. Otherwise DNS
rebinding would let any web page the operator opens (its own name, later
resolving to 127.0.0.1) read the page and the JSON API through his browser.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from prometheus_client.exposition import choose_encoder
from twisted.application import strports
from twisted.logger import Logger
from twisted.web import resource, server

from . import metrics as metricsmod
from . import paging

log = Logger()
REFRESH_MS = 2000

PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nuttconch status</title>
<link rel="stylesheet" href="/status.css">
<script src="/status.js" defer></script>
</head>
<body>
<header>
<h1>nuttconch</h1>
<p id="status" role="status">loading&hellip;</p>
</header>
<section>
<h2>Initiators <span id="listener-count" class="count"></span></h2>
<table id="listeners">
<thead><tr><th>Name</th><th>Aliases</th><th>Address</th><th>Ports</th>
<th>Connected since</th><th>Circuits</th><th>Bytes up</th><th>Bytes down</th>
<th>Key</th></tr></thead>
<tbody></tbody>
</table>
<p id="no-listeners" class="empty" hidden>No initiators connected.</p>
</section>
<section>
<h2>Open circuits <span id="circuit-count" class="count"></span></h2>
<table id="circuits">
<thead><tr><th>ID</th><th>Target</th><th>Client</th><th>From</th><th>Age</th>
<th>Bytes up</th><th>Bytes down</th></tr></thead>
<tbody></tbody>
</table>
<p id="no-circuits" class="empty" hidden>No open circuits.</p>
</section>
<footer><a href="/metrics">metrics</a> &middot; <a href="/api/listeners">listeners.json</a>
&middot; <a href="/api/circuits">circuits.json</a></footer>
</body>
</html>
"""

SCRIPT = (
    b"""\"use strict\";
const REFRESH_MS = """
    + str(REFRESH_MS).encode()
    + b""";

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function age(seconds) {
  seconds = Math.floor(seconds);
  if (seconds < 120) return seconds + "s";
  if (seconds < 7200) return Math.floor(seconds / 60) + "m";
  const minutes = String(Math.floor(seconds % 3600 / 60)).padStart(2, "0");
  return Math.floor(seconds / 3600) + "h" + minutes + "m";
}

function fill(tableId, emptyId, countId, rows, cells, key) {
  const body = document.querySelector("#" + tableId + " tbody");
  const fresh = document.createElement("tbody");
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.dataset.key = key(row);
    for (const value of cells(row)) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
  document.getElementById(emptyId).hidden = rows.length !== 0;
  document.getElementById(tableId).hidden = rows.length === 0;
  document.getElementById(countId).textContent = "(" + rows.length + ")";
}

async function getJSON(path) {
  const response = await fetch(path, {cache: "no-store"});
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const [listeners, circuits] = await Promise.all([
      getJSON("/api/listeners"), getJSON("/api/circuits")]);
    fill("listeners", "no-listeners", "listener-count", listeners, (l) => [
      l.name, l.aliases.join(", ") || "-", l.address, l.ports.join(", "),
      new Date(l.connected_since).toLocaleString() + " (" + age(l.connected_seconds) + ")",
      String(l.circuits), bytes(l.bytes_up), bytes(l.bytes_down), l.fingerprint,
    ], (l) => l.name + "/" + l.connected_since);
    fill("circuits", "no-circuits", "circuit-count", circuits, (c) => [
      String(c.id), c.target, c.client_name || "-", c.client, age(c.age_seconds),
      bytes(c.bytes_up), bytes(c.bytes_down),
    ], (c) => String(c.id));
    status.textContent = "Updated " + new Date().toLocaleTimeString();
    status.className = "ok";
  } catch (error) {
    status.textContent = "Cannot reach the server: " + error.message;
    status.className = "error";
  }
  document.body.dataset.refreshed = String(Date.now());
}

refresh();
setInterval(refresh, REFRESH_MS);
"""
)

STYLE = b"""body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin: 0; font-size: 1.4em; }
h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.25em 0.75em; border-bottom: 1px solid #ddd;
  white-space: nowrap; }
th { background: #f4f4f4; }
td:last-child { font-family: monospace; font-size: 0.9em; }
.count { color: #777; font-weight: normal; }
.empty { color: #777; }
.error { color: #b00; }
.ok { color: #777; }
footer { margin-top: 2em; color: #777; }
"""


def _common_headers(request: Any, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        b" img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    )


class _Leaf(resource.Resource):
    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")

    def render(self, request: Any) -> bytes:
        if request.method not in self.allowedMethods:
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b""
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            _common_headers(request, b"text/plain; charset=utf-8")
            return b"not found\n"
        return self.render_GET(request)

    def render_GET(self, request: Any) -> bytes:
        raise NotImplementedError


class MetricsPage(_Leaf):
    def __init__(self, metrics: metricsmod.Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        _common_headers(request, content_type.encode("ascii"))
        return encoder(self.metrics.registry)


class PagedJSONPage(_Leaf):
    """A list snapshot, one page of it (``?limit=&offset=``, default the first 1,000 rows);
    ``X-Total-Count`` says how many there are in all."""

    def __init__(self, rows: Any, count: Any, factory: Any) -> None:
        super().__init__()
        self.rows = rows
        self.count = count
        self.factory = factory

    def render_GET(self, request: Any) -> bytes:
        try:
            page = paging.from_query(request.args)
        except paging.PageError as exc:
            request.setResponseCode(400)
            _common_headers(request, b"text/plain; charset=utf-8")
            return f"{exc}\n".encode()
        _common_headers(request, b"application/json")
        request.setHeader(b"X-Total-Count", str(self.count(self.factory)).encode())
        return json.dumps(self.rows(self.factory, page), sort_keys=True).encode("utf-8")


class StaticFile(_Leaf):
    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request: Any) -> bytes:
        _common_headers(request, self.content_type)
        return self.body


def host_allowed(header: bytes | None, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names this server: loopback, localhost, or a configured name.

    No Host header at all (HTTP/1.0 tools) is let through: a browser always sends one,
    and only a browser can be made to carry a rebinding attack.
    """
    if header is None:
        return True
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        host = text[1 : text.find("]")] if "]" in text else ""
    else:
        host = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    host = host.rstrip(".")
    if not host:
        return False
    if "*" in allowed or host in allowed:
        return True
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Misdirected(_Leaf):
    """The answer to every method and path when the Host header names another site."""

    def render(self, request: Any) -> bytes:
        request.setResponseCode(421)
        _common_headers(request, b"text/plain; charset=utf-8")
        return (
            b"This host name is not served here. Use 127.0.0.1 or localhost, or add the"
            b" name to [metrics] allowed_hosts.\n"
        )


class StatusSite(server.Site):
    """A Site that answers only requests whose Host names this server."""

    def __init__(self, root: resource.Resource, allowed_hosts: tuple[str, ...] = ()) -> None:
        super().__init__(root)
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self.misdirected = _Misdirected()

    def getResourceFor(self, request: Any) -> Any:
        if not host_allowed(request.getHeader(b"host"), self.allowed_hosts):
            request.site = self
            request.sitepath = request.prepath[:]
            return self.misdirected
        return super().getResourceFor(request)


class Root(resource.Resource):
    def __init__(self, factory: Any, metrics: metricsmod.Metrics) -> None:
        super().__init__()
        self.page = StaticFile(PAGE, b"text/html; charset=utf-8")
        self.putChild(b"metrics", MetricsPage(metrics))
        self.putChild(b"status.js", StaticFile(SCRIPT, b"text/javascript; charset=utf-8"))
        self.putChild(b"status.css", StaticFile(STYLE, b"text/css; charset=utf-8"))
        api = resource.Resource()
        api.putChild(
            b"listeners",
            PagedJSONPage(metricsmod.listener_rows, lambda f: len(f.registry.listeners()), factory),
        )
        api.putChild(
            b"circuits",
            PagedJSONPage(
                metricsmod.circuit_rows,
                lambda f: sum(1 for _ in metricsmod.live_circuits(f)),
                factory,
            ),
        )
        self.putChild(b"api", api)

    def getChild(self, path: bytes, request: Any) -> Any:
        if path == b"":
            return self.page
        return resource.NoResource()


def site(
    factory: Any, metrics: metricsmod.Metrics, allowed_hosts: tuple[str, ...] = ()
) -> server.Site:
    """The HTTP site; access logs off (scrapes every few seconds would flood the log)."""
    s = StatusSite(Root(factory, metrics), allowed_hosts)
    s.log = lambda request: None  # type: ignore[method-assign]
    s.displayTracebacks = False
    return s


def service(
    endpoint: str,
    factory: Any,
    metrics: metricsmod.Metrics,
    allowed_hosts: tuple[str, ...] = (),
    reactor: Any = None,
) -> Any:
    svc = strports.service(endpoint, site(factory, metrics, allowed_hosts), reactor=reactor)
    svc.setName("metrics-http")
    return svc


def listens_everywhere(endpoint: str) -> bool:
    """Whether a tcp:, tcp6: or ssl: endpoint accepts connections on every address."""
    kind = endpoint.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = None
    for part in endpoint.replace("\\:", "\0").split(":")[1:]:
        if part.startswith("interface="):
            interface = part[len("interface=") :].replace("\0", ":")
    return interface is None or interface in ("", "0.0.0.0", "::", "0:0:0:0:0:0:0:0")
