# -*- test-case-name: tests.test_hostkeys -*-
"""Host keys and the alias secret: generated once, then reused forever.

Clients pin the host key in known_hosts and initiators print their alias
in connect commands, so both must survive restarts unchanged; they are
written with O_EXCL and mode 0600 from the first byte so no other user
can ever read them, not even for an instant.
"""

from __future__ import annotations

import os
import secrets

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.logger import Logger

log = Logger()

RSA_BITS = 3072
SECRET_NAME = "alias_secret"


class HostKeyError(Exception):
    """A host key file exists but cannot be used."""


def _generate(kind: str) -> Key:
    if kind == "ed25519":
        return Key(ed25519.Ed25519PrivateKey.generate())
    if kind == "ecdsa":
        return Key(ec.generate_private_key(ec.SECP256R1()))
    return Key(rsa.generate_private_key(65537, RSA_BITS))


def _write_new(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)


def load_or_create(path: str, kind: str) -> Key:
    """Return the private key at ``path``, generating it (and ``.pub``) if missing."""
    try:
        key = Key.fromFile(path)
    except FileNotFoundError:
        pass
    except (BadKeyError, ValueError, OSError) as exc:
        raise HostKeyError(f"{path}: cannot load host key: {exc}") from None
    else:
        if not key.isPublic():
            return key
        raise HostKeyError(f"{path}: is a public key, a private host key is needed")
    _ensure_dir(path)
    key = _generate(kind)
    _write_new(path, key.toString("openssh", subtype="v1"), 0o600)
    pub = key.public().toString("openssh", comment=b"nuttconch host key") + b"\n"
    try:
        os.unlink(path + ".pub")
    except FileNotFoundError:
        pass
    _write_new(path + ".pub", pub, 0o644)
    log.info("generated {kind} host key {path}", kind=kind, path=path)
    return key


def load_host_keys(paths: dict[str, str]) -> dict[bytes, Key]:
    """Load or create each configured host key; the map is keyed by SSH key type.

    An empty path disables that key type.
    """
    keys: dict[bytes, Key] = {}
    for kind, path in paths.items():
        if path:
            key = load_or_create(path, kind)
            keys[key.sshType()] = key
    return keys


def load_or_create_secret(directory: str) -> bytes:
    """The server secret behind generated aliases, kept beside the host keys."""
    path = os.path.join(directory, SECRET_NAME)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        data = secrets.token_bytes(32)
        try:
            _write_new(path, data, 0o600)
        except FileExistsError:
            with open(path, "rb") as handle:
                data = handle.read()
    if len(data) < 16:
        raise HostKeyError(f"{path}: alias secret is too short; delete it to regenerate")
    return data
