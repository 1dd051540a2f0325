"""The status page in headless Chromium: it shows a live initiator and updates when it leaves.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe``
(NUL-separated JSON on its file descriptors 3 and 4), so no websocket or
browser-automation library is needed. In CI (``$CI`` set) a missing Chromium
is a failure, not a skip.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.python.procutils import which
from twisted.trial import unittest

from .harness import _timeout, listen_echo, missing
from .test_ops import OpsTestMixin

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = which(name)
        if found:
            return found[0]
    missing("Chromium", "apt-get install chromium")


class DevTools(protocol.ProcessProtocol):
    """One Chromium process and its DevTools pipe."""

    def __init__(self) -> None:
        self.buffer = b""
        self.ids = itertools.count(1)
        self.waiting: dict[int, defer.Deferred[Any]] = {}
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.stderr = b""
        self.running = True

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self.stderr = (self.stderr + data)[-20000:]
            return
        if fd != 4:
            return
        self.buffer += data
        while b"\0" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\0", 1)
            message = json.loads(raw)
            d = self.waiting.pop(message.get("id", -1), None)
            if d is None:
                continue
            if "error" in message:
                d.errback(AssertionError(f"DevTools error: {message['error']}"))
            else:
                d.callback(message.get("result", {}))

    def send(self, method: str, session: str | None = None, **params: Any) -> Any:
        ident = next(self.ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiting[ident] = d
        self.transport.writeToChild(3, json.dumps(message).encode() + b"\0")
        return _timeout(d, 20, f"DevTools {method}")

    def processEnded(self, reason: Any) -> None:
        self.running = False
        for d in self.waiting.values():
            d.errback(AssertionError(f"Chromium exited: {self.stderr[-2000:]!r}"))
        self.waiting = {}
        self.ended.callback(None)

    def stop(self) -> defer.Deferred[None]:
        if self.running:
            try:
                self.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
        return self.ended


class StatusPageTests(OpsTestMixin, unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def startBrowser(self) -> Any:
        binary = find_chromium()
        profile = tempfile.mkdtemp(prefix="nuttconch-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        browser = DevTools()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": profile}
        reactor.spawnProcess(
            browser, binary, args, env=env, childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"}
        )
        self.addCleanup(browser.stop)
        target = yield browser.send("Target.createTarget", url="about:blank")
        attached = yield browser.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.browser, self.session = browser, attached["sessionId"]
        yield browser.send("Page.enable", self.session)

    @defer.inlineCallbacks
    def evaluate(self, expression: str) -> Any:
        result = yield self.browser.send(
            "Runtime.evaluate", self.session, expression=expression, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    @defer.inlineCallbacks
    def waitPage(self, expression: str, what: str, timeout: float = 20) -> Any:
        deadline = reactor.seconds() + timeout
        while True:
            # The document may still be loading: errors count as "not yet".
            value = yield self.evaluate(
                f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"
            )
            if value:
                return value
            if reactor.seconds() > deadline:
                text = yield self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out waiting for {what}; page shows:\n{text}")
            yield _sleep(0.2)

    @defer.inlineCallbacks
    def test_live_initiator_then_leaves(self) -> Any:
        """The page lists a connected initiator and its circuit, then drops it without a reload."""
        yield self.startBrowser()
        target = listen_echo(self)
        proc = yield self.initiator(self.key("dev"), "gw1", f"6379:localhost:{target}")
        listener = self.registry.listeners()[0]
        name = listener.connect_name
        client = self.spawn(self.key("cli"), "cli", "-W", f"{name}:6379", stdin=None)
        client.transport.write(b"x" * 3000)
        yield client.waitOutput(b"x" * 3000)

        yield self.browser.send("Page.navigate", self.session, url=self.http + "/")
        yield self.waitPage(
            f"document.querySelector('#listeners tbody').innerText.includes({name!r})",
            "the initiator in the table",
        )
        # Mark this document: if the page reloaded, the mark would be gone.
        yield self.evaluate("window.__nuttconchMark = 42")
        row = yield self.evaluate(
            "Array.from(document.querySelectorAll('#listeners tbody tr td'))"
            ".map(td => td.textContent)"
        )
        self.assertEqual(row[0], name)
        self.assertEqual(row[2], "127.0.0.1")
        self.assertEqual(row[3], "6379")
        self.assertIn("2.9 KiB", row)  # bytes through its circuit, both ways
        self.assertEqual(row[8], listener.fingerprint)
        circuits = yield self.waitPage(
            "document.querySelector('#circuits tbody').innerText",
            "the open circuit",
        )
        self.assertIn(f"{name}:6379", circuits)
        self.assertIn("cli", circuits)

        client.transport.closeStdin()
        yield client.ended
        yield self.waitPage(
            "!document.getElementById('no-circuits').hidden", "the circuit to disappear"
        )
        yield proc.kill()
        yield self.waitPage(
            "!document.getElementById('no-listeners').hidden"
            f" && !document.body.innerText.includes({name!r})",
            "the initiator to disappear",
        )
        mark = yield self.evaluate("window.__nuttconchMark")
        self.assertEqual(mark, 42, "the page reloaded instead of updating in place")
        status = yield self.evaluate("document.getElementById('status').textContent")
        self.assertTrue(status.startswith("Updated"), status)


def _sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
