"""A stranger logs in with N fresh keys from one address (issue 9 point 3).

Prints how many were trusted (lines added to authorized_keys) and the
refusal the rest saw, with the default configuration. Run from the
repository root::

    python bench/first_use_flood.py [N]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.internet import defer, reactor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nuttconch import config as configmod  # noqa: E402
from nuttconch.tap import build  # noqa: E402
from tests.harness import host_key_dir  # noqa: E402
from tests.rawssh import connect_client  # noqa: E402
from tests.test_auth_security import signed_request  # noqa: E402

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 100


@defer.inlineCallbacks
def main() -> object:
    work = tempfile.mkdtemp(prefix="nuttconch-flood-")
    keydir = os.path.join(work, "keys")
    shutil.copytree(host_key_dir(), keydir)
    ini = os.path.join(work, "nuttssh.ini")
    with open(ini, "w") as handle:
        handle.write(
            "[server]\nlisten_host = 127.0.0.1\nlisten_port = 0\n"
            f"per_source_penalty_exempt_list = 127.0.0.1\n[keys]\nhost_key_dir = {keydir}\n"
        )
    factory, _ = build(configmod.load(ini))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port
    trusted = 0
    refusals: set[bytes] = set()
    for _ in range(COUNT):
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        c = yield connect_client(port, stage="userauth", user=b"flood")
        c.sendPacket(50, signed_request(c.sessionID, b"flood", key))
        num, _ = yield c.inbox.expect((51, 52), timeout=10)
        trusted += num == 52
        refusals.update(p[4:].split(b"\r\n")[0] for n, p in c.inbox.messages if n == 53)
        c.close()
    with open(os.path.join(keydir, "authorized_keys"), "rb") as handle:
        lines = handle.read().count(b"\n")
    print(f"{COUNT} new keys from one address: {trusted} trusted, {lines} lines added")
    for text in sorted(refusals):
        print("refusal seen:", text.decode(errors="replace"))
    yield factory.disconnectAll()
    shutil.rmtree(work, ignore_errors=True)


def run() -> None:
    d = main()
    d.addErrback(lambda f: (f.printTraceback(), None))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    run()
