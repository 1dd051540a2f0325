"""What certificates and revoked-key lists cost the server (issue 12.3).

Prints, per operation, the mean wall time over many runs on this machine:
parsing and CA-verifying a certificate, judging it, refusing a huge or forged
one, loading a KRL of N revoked serials and a key list of N keys, and one
revocation check. Needs ssh-keygen. Run from the repository root::

    PYTHONPATH=. python bench/cert_costs.py [N]
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import time
import timeit

from twisted.conch.ssh.common import NS

from nuttconch import certs


def keygen(*args: str, cwd: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def mean_us(stmt: object, number: int) -> float:
    return timeit.timeit(stmt, number=number) / number * 1e6  # type: ignore[arg-type]


def main(n: int) -> None:
    work = tempfile.mkdtemp(prefix="cert-costs-")
    for name in ("ca", "user"):
        keygen("-t", "ed25519", "-N", "", "-f", name, cwd=work)
    keygen(
        "-s", "ca", "-I", "dev42", "-n", "dev42", "-V", "-5m:+1h", "-z", "7", "user.pub", cwd=work
    )
    with open(os.path.join(work, "user-cert.pub")) as handle:
        blob = base64.b64decode(handle.read().split()[1])
    alg = b"ssh-ed25519-cert-v01@openssh.com"
    cert = certs.parse(blob, alg)
    now = time.time()
    print(f"parse + CA signature check: {mean_us(lambda: certs.parse(blob, alg), 2000):.0f} us")
    rules = mean_us(lambda: certs.check(cert, "dev42", "127.0.0.1", now), 20000)
    print(f"rules (validity, principals, options): {rules:.1f} us")

    def refuse(data: bytes) -> None:
        try:
            certs.parse(data, alg)
        except certs.CertificateError:
            return
        raise AssertionError("accepted")

    huge = blob + b"\0" * 30000
    forged = blob.replace(NS(b"dev42"), NS(b"admin"))
    print(f"refuse a 30 KB certificate: {mean_us(lambda: refuse(huge), 20000):.1f} us")
    print(f"refuse a forged certificate: {mean_us(lambda: refuse(forged), 2000):.0f} us")

    spec = os.path.join(work, "spec")
    with open(spec, "w") as handle:
        handle.writelines(f"serial: {2 * i + 1}\n" for i in range(n))
    keygen("-k", "-f", "krl", "-s", "ca.pub", "spec", cwd=work)
    krl = os.path.join(work, "krl")
    start = time.perf_counter()
    revoked = certs.RevokedKeys(krl)
    revoked.refresh()
    print(
        f"KRL of {n} serials ({os.path.getsize(krl)} bytes): load"
        f" {(time.perf_counter() - start) * 1000:.0f} ms; verdict on serial 7:"
        f" {revoked.revoked(cert.key_blob, cert)!r};"
        f" check {mean_us(lambda: revoked.revoked(cert.key_blob, cert), 20000):.1f} us"
    )
    listing = os.path.join(work, "revoked_keys")
    with open(os.path.join(work, "user.pub")) as handle:
        user_line = handle.read()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with open(listing, "w") as handle:
        for _ in range(n):
            key = ed25519.Ed25519PrivateKey.generate().public_key()
            handle.write(
                key.public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                ).decode()
                + "\n"
            )  # noqa: E501
        handle.write(user_line)
    start = time.perf_counter()
    plain = certs.RevokedKeys(listing)
    plain.refresh()
    print(
        f"key list of {n + 1} keys ({os.path.getsize(listing)} bytes): load"
        f" {(time.perf_counter() - start) * 1000:.0f} ms;"
        f" verdict: {plain.revoked(cert.key_blob, cert)!r};"
        f" check {mean_us(lambda: plain.revoked(cert.key_blob, cert), 20000):.1f} us"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)
