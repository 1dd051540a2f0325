# -*- test-case-name: tests.test_crypto -*-
"""Algorithm names and OpenSSH-style preference lists, without any cryptography.

The config parser needs the names to validate ``ciphers``, ``macs`` and
``kex_algorithms``; the transport's crypto module needs the same names with
their implementations.  Keeping the names here lets config.py check a list
without importing the packet sealing code (and the crypto module checks
that it implements exactly these names: tests/test_crypto.py).
"""

from __future__ import annotations

# OpenSSH 9's default preference order, restricted to what crypto.py implements.
CIPHER_NAMES: tuple[bytes, ...] = (
    b"chacha20-poly1305@openssh.com",
    b"aes128-ctr",
    b"aes192-ctr",
    b"aes256-ctr",
    b"aes128-gcm@openssh.com",
    b"aes256-gcm@openssh.com",
)
MAC_NAMES: tuple[bytes, ...] = (
    b"hmac-sha2-256-etm@openssh.com",
    b"hmac-sha2-512-etm@openssh.com",
    b"hmac-sha2-256",
    b"hmac-sha2-512",
)
DEFAULT_CIPHERS: tuple[bytes, ...] = CIPHER_NAMES
# Offered by default: what a third-party audit (ssh-audit) passes without a warning.
# Encrypt-and-MAC (plain hmac-sha2-*) stays available through ``macs = +hmac-sha2-256``:
# OpenSSH, Dropbear, PuTTY, paramiko and asyncssh have EtM or an AEAD cipher (which needs
# no MAC); Twisted Conch's own client has neither and needs that line.
DEFAULT_MACS: tuple[bytes, ...] = tuple(n for n in MAC_NAMES if n.endswith(b"-etm@openssh.com"))
KNOWN_KEX: tuple[bytes, ...] = (
    b"mlkem768x25519-sha256",
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
)
# The NIST-curve exchanges are an audit failure (curves of unexplained origin); every
# OpenSSH since 6.5, Dropbear, PuTTY, paramiko and asyncssh have curve25519.  They stay
# available through ``kex_algorithms = +ecdh-sha2-nistp256``.
DEFAULT_KEX: tuple[bytes, ...] = tuple(k for k in KNOWN_KEX if not k.startswith(b"ecdh-"))


def available_kex(names: tuple[bytes, ...] = KNOWN_KEX) -> tuple[bytes, ...]:
    """``names`` restricted to what this Conch/cryptography build can do."""
    from twisted.conch.ssh import _kex

    supported = set(_kex.getSupportedKeyExchanges())
    return tuple(k for k in names if k in supported)


def parse_algorithms(kind: str, text: str) -> tuple[bytes, ...]:
    """An OpenSSH-style list: ``a,b``; ``+a`` appends to, ``-a`` removes from and
    ``^a`` prepends to the default.  Unknown names raise ValueError."""
    known, default = {
        "ciphers": (CIPHER_NAMES, DEFAULT_CIPHERS),
        "macs": (MAC_NAMES, DEFAULT_MACS),
        "kex_algorithms": (KNOWN_KEX, DEFAULT_KEX),
    }[kind]
    text = text.strip()
    op = text[:1] if text[:1] in "+-^" else ""
    names = [n.strip().encode("ascii", "replace") for n in text[len(op) :].split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError("expected a comma-separated list of algorithm names")
    unknown = [n.decode() for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unsupported: {', '.join(unknown)} (supported: {', '.join(k.decode() for k in known)})"
        )
    if op == "+":
        result = list(default) + [n for n in names if n not in default]
    elif op == "-":
        result = [n for n in default if n not in names]
    elif op == "^":
        result = names + [n for n in default if n not in names]
    else:
        result = list(dict.fromkeys(names))
    if kind == "kex_algorithms":
        usable = set(available_kex())
        result = [n for n in result if n in usable]
    if not result:
        raise ValueError("no usable algorithm left")
    return tuple(result)
