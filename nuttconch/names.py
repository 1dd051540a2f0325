# -*- test-case-name: tests.test_units -*-
"""Names that route circuits: validation, normalisation and generated aliases.

A name travels from an SSH username or an authorized_keys option into the
registry, log lines, printed commands and the authorized_keys file itself,
so one conservative character set is enforced at the door rather than
escaping it differently in every place it is later shown.
"""

from __future__ import annotations

import hashlib
import hmac
import re

NAME_MAX = 63
ALIAS_SUFFIX_LEN = 7
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
_INDEX_RE = re.compile(r"(?P<name>[^~]+)~(?P<index>[0-9]{1,4})\Z")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"

NAME_RULE = (
    "names are 1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
)


class InvalidName(ValueError):
    """A name outside the safe set; the message is fit to show the user."""


def escape(value: str | bytes) -> str:
    """Render untrusted text printable in one line, for logs and listings.

    Control characters, backslashes and non-ASCII are shown as escapes so that a
    hostile name can neither forge a log line nor drive an admin's terminal.
    """
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    else:
        text = value
    return "".join(
        ch if " " <= ch < "\x7f" and ch != "\\" else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def normalise(raw: str | bytes, what: str = "name") -> str:
    """Return the canonical (lower-case ASCII) form of a name or raise InvalidName.

    Case is folded so that ``Prod`` and ``prod`` are one name, not two that
    look alike; anything else outside the set is refused rather than mapped,
    because a silent mapping is how two different names end up colliding.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidName(f"{what} is not ASCII; {NAME_RULE}") from None
    else:
        text = raw
    if not text:
        raise InvalidName(f"{what} is empty; {NAME_RULE}")
    if len(text) > NAME_MAX:
        raise InvalidName(f"{what} is longer than {NAME_MAX} characters")
    folded = text.lower()
    if not folded.isascii() or not _NAME_RE.match(folded):
        raise InvalidName(f'{what} "{escape(text)}" is not allowed; {NAME_RULE}')
    return folded


def split_index(target: str) -> tuple[str, int]:
    """Split ``name~N`` into the name and N (0 when absent).

    ``~`` is reserved for this, which is why it is not in the name set.
    """
    m = _INDEX_RE.match(target)
    if m:
        return m.group("name"), int(m.group("index"))
    return target, 0


def generated_alias(secret: bytes, key_blob: bytes, hostname: str) -> str:
    """The stable alias ``<hostname>-<7 chars>`` for one key and hostname.

    An HMAC keyed by the server's own secret makes the suffix stable across
    reconnects and restarts (autossh keeps its address) while nobody without
    the secret can predict another key's alias and hijack its name.
    """
    digest = hmac.new(secret, key_blob + b"\0" + hostname.encode("ascii"), hashlib.sha256)
    number = int.from_bytes(digest.digest()[:8], "big")
    chars = []
    for _ in range(ALIAS_SUFFIX_LEN):
        number, rem = divmod(number, 36)
        chars.append(_BASE36[rem])
    suffix = "".join(chars)
    base = hostname[: NAME_MAX - ALIAS_SUFFIX_LEN - 1]
    return f"{base}-{suffix}"
