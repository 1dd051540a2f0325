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

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.internet import defer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import run, scratch, serve  # noqa: E402

from tests.rawssh import connect_client  # noqa: E402
from tests.test_auth_security import signed_request  # noqa: E402

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 100


@defer.inlineCallbacks
def main() -> object:
    work, keydir = scratch("nuttconch-flood-")
    factory, port = serve(work, keydir)
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


if __name__ == "__main__":
    run(main)
