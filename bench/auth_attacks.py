"""Count how many of the review's authentication attacks (issue 9, points 1 and 9) log in.

Starts the server in-process and, from 127.0.0.1, tries: a key whose line
says from="10.0.0.0/8" with admin access, sending each altered blob that
Conch reads as the same key (ed25519, ECDSA P-256, RSA); an RSA key
announcing rsa-sha2-256/512 but signing with ssh-rsa (SHA-1); and a new
DSA key trusted on first use. Prints how many logged in. Run from the
repository root::

    python bench/auth_attacks.py
"""

from __future__ import annotations

import os
import shutil
import sys

from cryptography.hazmat.primitives.asymmetric import dsa
from twisted.conch.ssh import keys
from twisted.internet import defer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import run, scratch, serve  # noqa: E402

from tests.harness import make_key  # noqa: E402
from tests.rawssh import connect_client  # noqa: E402
from tests.test_auth_security import altered_blobs, signed_request  # noqa: E402


@defer.inlineCallbacks
def attempt(port: int, user: bytes, build_request: object) -> object:
    c = yield connect_client(port, stage="userauth", user=user)
    c.sendPacket(50, build_request(c.sessionID))  # type: ignore[operator]
    num, _ = yield c.inbox.expect((51, 52), timeout=10)
    c.close()
    return num == 52


@defer.inlineCallbacks
def main() -> object:
    work, keydir = scratch("nuttconch-attacks-")
    akfile = os.path.join(keydir, "authorized_keys")
    factory, port = serve(work, keydir)
    results: dict[str, list[bool]] = {
        "from= bypass (altered blob)": [],
        "SHA-1 inside rsa-sha2": [],
    }
    for kind in ("ed25519", "ecdsa", "rsa"):
        path, public = make_key(work, f"remote-{kind}", kind)
        with open(akfile, "a") as handle:
            handle.write(f'from="10.0.0.0/8",access="admin",access="listen" {public} ops\n')
        key = keys.Key.fromFile(path)
        alg = b"rsa-sha2-256" if kind == "rsa" else None
        for blob in altered_blobs(key).values():
            ok = yield attempt(
                port,
                b"mallory",
                lambda s, k=key, b=blob, a=alg: signed_request(
                    s, b"mallory", k, blob=b, alg=a, sig_alg=a
                ),
            )
            results["from= bypass (altered blob)"].append(ok)
    path, public = make_key(work, "rsa-user", "rsa")
    with open(akfile, "a") as handle:
        handle.write(f'access="listen" {public} rsa-user\n')
    key = keys.Key.fromFile(path)
    for announced in (b"rsa-sha2-256", b"rsa-sha2-512"):
        ok = yield attempt(
            port,
            b"rsa-user",
            lambda s, a=announced: signed_request(s, b"rsa-user", key, alg=a, sig_alg=b"ssh-rsa"),
        )
        results["SHA-1 inside rsa-sha2"].append(ok)
    dsaKey = keys.Key(dsa.generate_private_key(1024))
    ok = yield attempt(port, b"old", lambda s: signed_request(s, b"old", dsaKey))
    results["DSA trusted on first use"] = [ok]
    for name, oks in results.items():
        print(f"{name}: {sum(oks)} of {len(oks)} logged in")
    yield factory.disconnectAll()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run(main)
