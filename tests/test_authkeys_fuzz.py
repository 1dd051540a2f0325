"""
Property tests for L{nuttconch.authkeys} (THREATS.md item 16).

Set C{NUTTCONCH_FUZZ_EXAMPLES} to run more examples per property (CI
nightly uses 10**5); the default keeps this module at a few seconds.

Characters the round trip leaves out, because the file format cannot carry
them: newline, carriage return and NUL anywhere (a line ends at newline,
a trailing CR is dropped as a CRLF line end, and NUL ends a C string in
OpenSSH); an option value ending in a backslash (its closing quote would
read as an escaped quote); a comment that starts or ends with a blank (blanks
around fields are separators); empty hostname and alias values (refused as
errors). Everything else, quotes, backslashes, commas, blanks and any other
Unicode, must survive. L{SerialiseFuzzTests.test_serialiseNeverLies} checks
that values outside that set are refused by serialise, never mangled.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from nuttconch.authkeys import (
    ACCESS_VALUES,
    AuthorizedKey,
    AuthorizedKeyError,
    match_from,
    parse_line,
    parse_text,
    serialise,
)
from tests.test_authkeys import ECDSA, ED, ED2, RSA, SK_ED

EXAMPLES = int(os.environ.get("NUTTCONCH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

KEY_LINES = [ED, ED2, RSA, ECDSA, SK_ED]
KEYS = []
for _line in KEY_LINES:
    _entry = parse_line(_line)
    assert _entry is not None
    KEYS.append((_entry.keytype, _entry.blob))

# Pieces that steer arbitrary text toward the interesting corners of the
# options grammar.
GRAMMAR_PIECES = st.sampled_from(
    [
        '"',
        "\\",
        '\\"',
        ",",
        "=",
        " ",
        "\t",
        "access",
        "from",
        "hostname",
        "alias",
        "no-pty",
        "command",
        "expiry-time",
        "listen",
        "denied",
        '="',
        "#",
        "!",
        "*",
        "1.2.3.0/24",
        "ssh-ed25519",
        "AAAA",
        "\r",
        "\0",
        "\n",
        "\ufeff",
        "é",
    ]
)
OPTION_PREFIX = st.one_of(
    st.text(),
    st.lists(st.one_of(GRAMMAR_PIECES, st.text(max_size=3)), max_size=20).map("".join),
)

SAFE_CHARS = st.characters(codec="utf-8", exclude_characters="\n\r\0")
SAFE_TEXT = st.text(SAFE_CHARS, max_size=30)
VALUE = st.one_of(
    SAFE_TEXT,
    st.lists(st.one_of(st.sampled_from(['"', "\\", ",", " ", "=", "'"]), SAFE_TEXT)).map("".join),
).filter(lambda v: not v.endswith("\\"))
NAME_VALUE = VALUE.filter(bool)


@st.composite
def entries(draw: st.DrawFn) -> AuthorizedKey:
    """Entries the writer must be able to produce."""
    options: list[tuple[str, str | None]] = []
    hostname_used = False
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["access", "from", "hostname", "alias", "no-pty"]))
        if kind == "access":
            options.append(("access", draw(st.sampled_from(sorted(ACCESS_VALUES)))))
        elif kind == "from":
            options.append(("from", draw(VALUE)))
        elif kind == "hostname":
            if hostname_used:
                continue
            hostname_used = True
            options.append(("hostname", draw(NAME_VALUE)))
        elif kind == "alias":
            options.append(("alias", draw(NAME_VALUE)))
        else:
            options.append(("no-pty", None))
    keytype, blob = draw(st.sampled_from(KEYS))
    comment = draw(SAFE_TEXT).strip(" \t")
    return AuthorizedKey(tuple(options), keytype, blob, comment)


class ParserFuzzTests(unittest.TestCase):
    """The parser fails only with its own error type."""

    @FUZZ
    @given(OPTION_PREFIX, st.sampled_from(KEY_LINES))
    def test_optionsPrefix(self, prefix: str, key: str) -> None:
        """Any text in front of a valid key parses or raises AuthorizedKeyError."""
        try:
            parse_line(prefix + " " + key + " comment")
        except AuthorizedKeyError:
            pass

    @FUZZ
    @given(st.text())
    def test_wholeText(self, text: str) -> None:
        """Arbitrary file text gives entries and per-line errors, never an exception."""
        found, errors = parse_text(text)
        self.assertTrue(all(isinstance(e, AuthorizedKey) for e in found))
        self.assertTrue(all(isinstance(n, int) and msg for n, msg in errors))

    @FUZZ
    @given(st.text(max_size=60), st.sampled_from(["1.2.3.4", "::1", "::ffff:10.0.0.1", "x"]))
    def test_matchFrom(self, patterns: str, address: str) -> None:
        """match_from returns a bool for any pattern text."""
        self.assertIn(match_from(patterns, address, "host.example"), (True, False))


class SerialiseFuzzTests(unittest.TestCase):
    """What the writer produces, the parser reads back unchanged."""

    @FUZZ
    @given(entries())
    def test_roundTrip(self, entry: AuthorizedKey) -> None:
        """parse_line(serialise(e)) == e for every entry the writer can produce."""
        line = serialise(entry)
        self.assertNotIn("\n", line)
        self.assertEqual(parse_line(line), entry)
        self.assertEqual(parse_text(line + "\r\n"), ([entry], []))

    @FUZZ
    @given(
        st.text(max_size=20),
        st.text(max_size=20),
        st.sampled_from(["alias", "from", "hostname", "access"]),
    )
    def test_serialiseNeverLies(self, value: str, comment: str, name: str) -> None:
        """serialise either round-trips an entry exactly or refuses it."""
        entry = AuthorizedKey(((name, value),), KEYS[0][0], KEYS[0][1], comment)
        try:
            line = serialise(entry)
        except AuthorizedKeyError:
            return
        self.assertEqual(parse_text(line), ([entry], []))
