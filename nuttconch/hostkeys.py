# -*- test-case-name: tests.test_units,tests.test_surface_security -*-
"""Host keys and the alias secret: generated once, then reused forever.

Clients pin the host key in known_hosts and initiators print their alias
in connect commands, so both must survive restarts unchanged; they are
written with mode 0600 from the first byte so no other user can ever read
them, not even for an instant. Each is written to a temporary file beside
its final path, synced, and only then linked into place, so a crash during
the first start leaves either no key or a whole one, never a partial file
that would stop every later start. Like sshd, the server refuses a private
key or secret that group or others may read: it may already have leaked.
"""

from __future__ import annotations

import os
import secrets
import struct
import tempfile

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.logger import Logger

log = Logger()

RSA_BITS = 3072
SECRET_NAME = "alias_secret"
# Kinds generated when missing.  ECDSA is not among them: its NIST curve fails audits
# (ssh-audit), but an installation moved over from Nuttssh, which generated one, keeps
# offering it, since its users' known_hosts pin that key.
GENERATED_KINDS = frozenset({"ed25519", "rsa"})


class HostKeyError(Exception):
    """A host key file exists but cannot be used."""


def _generate(kind: str) -> Key:
    if kind == "ed25519":
        return Key(ed25519.Ed25519PrivateKey.generate())
    if kind == "ecdsa":
        return Key(ec.generate_private_key(ec.SECP256R1()))
    return Key(rsa.generate_private_key(65537, RSA_BITS))


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` whole or not at all; FileExistsError if it appeared meanwhile."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link, unlike rename, never replaces a file another process created meanwhile.
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            # Filesystems without hard links: rename is still atomic, if not exclusive.
            if os.path.exists(path):
                raise FileExistsError(path) from None
            os.rename(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _sync_dir(directory)


def _sync_dir(directory: str) -> None:
    """Make the new directory entry durable too (best effort: not every FS allows it)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _check_private(path: str, what: str) -> None:
    """Refuse a secret file that group or others may read, naming it and the fix."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        raise HostKeyError(
            f"{path}: {what} is readable by group or others (mode {mode & 0o777:04o});"
            f" run chmod 600 {path} (and consider it leaked)"
        )


def _ensure_dir(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)


def load_or_create(path: str, kind: str) -> Key:
    """Return the private key at ``path``, generating it (and ``.pub``) if missing."""
    key = load_existing(path)
    if key is not None:
        return key
    _ensure_dir(path)
    key = _generate(kind)
    _write_new(path, key.toString("openssh", subtype="v1"), 0o600)
    _write_pub(path, key)
    log.info("generated {kind} host key {path}", kind=kind, path=path)
    return key


def load_existing(path: str) -> Key | None:
    """The private key at ``path``, or None if there is no file; HostKeyError if unusable."""
    try:
        key = Key.fromFile(path)
    except FileNotFoundError:
        return None
    except (BadKeyError, ValueError, OSError, struct.error, IndexError) as exc:
        # struct.error: a truncated key (e.g. left by an older version's crash mid-write).
        raise HostKeyError(f"{path}: cannot load host key: {exc}") from None
    else:
        if key.isPublic():
            raise HostKeyError(f"{path}: is a public key, a private host key is needed")
        _check_private(path, "host key")
        if not os.path.exists(path + ".pub"):
            _write_pub(path, key)
        return key


def _write_pub(path: str, key: Key) -> None:
    """(Re)write the ``.pub`` beside a private key, e.g. after a crash lost it."""
    pub = key.public().toString("openssh", comment=b"nuttconch host key") + b"\n"
    try:
        os.unlink(path + ".pub")
    except FileNotFoundError:
        pass
    try:
        _write_new(path + ".pub", pub, 0o644)
    except OSError as exc:
        log.warn("cannot write {path}: {error}", path=path + ".pub", error=str(exc))


def load_host_keys(
    paths: dict[str, str], generate: frozenset[str] = GENERATED_KINDS
) -> dict[bytes, Key]:
    """Load each configured host key, creating the kinds in ``generate`` if missing; the
    map is keyed by SSH key type.

    An empty path disables that key type.
    """
    keys: dict[bytes, Key] = {}
    for kind, path in paths.items():
        if path:
            if kind in generate:
                key = load_or_create(path, kind)
            else:
                found = load_existing(path)
                if found is None:
                    continue
                key = found
                log.info(
                    "offering the existing {kind} host key {path} for clients that pinned it;"
                    " audits flag it: remove it once they know the ed25519 key",
                    kind=kind,
                    path=path,
                )
            keys[key.sshType()] = key
    return keys


def load_or_create_secret(directory: str) -> bytes:
    """The server secret behind generated aliases, kept beside the host keys."""
    path = os.path.join(directory, SECRET_NAME)
    _check_private(path, "alias secret")
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
