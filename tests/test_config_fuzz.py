"""Property tests of the nuttssh.ini loader: round trip, and only ConfigError on bad input."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from nuttconch import config

EXAMPLES = int(os.environ.get("NUTTCONCH_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

# Values the writer can produce for each kind of key, as (ini text, parsed value).
_bools = st.sampled_from([("true", True), ("false", False), ("yes", True), ("off", False)])
_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._/-", min_size=1, max_size=30)


def _value_for(setting: config.Setting) -> st.SearchStrategy[tuple[str, object]]:
    key = setting.key
    if setting.parse is config._bool:
        return _bools
    if key in ("login_grace_time", "client_alive_interval", "unused_connection_timeout",
               "channel_open_timeout"):  # fmt: skip
        return st.integers(0, 3600).map(lambda n: (str(n), float(n)))
    if key == "max_startups":
        return st.tuples(st.integers(1, 50), st.integers(0, 100), st.integers(50, 500)).map(
            lambda t: (f"{t[0]}:{t[1]}:{t[2]}", t)
        )
    if key == "listen_port":
        return st.integers(0, 65535).map(lambda n: (str(n), n))
    if key == "channel_window":
        return st.integers(32768, 16 * 1024 * 1024).map(lambda n: (str(n), n))
    if key in ("max_auth_tries",):
        return st.integers(1, 100).map(lambda n: (str(n), n))
    if key in ("max_forwards", "max_channels"):
        return st.integers(1, 65535).map(lambda n: (str(n), n))
    if key in ("client_alive_count_max",):
        return st.integers(1, 1000).map(lambda n: (str(n), n))
    if key == "per_source_max_startups":
        return st.integers(1, 100000).map(lambda n: (str(n), n))
    if key in ("memory_per_connection", "memory_total"):
        kib = st.one_of(st.just(0), st.integers(64, 1 << 30))
        return kib.map(lambda k: (f"{k}K", k * 1024))
    if key in ("max_connections_per_key", "max_connections_per_source"):
        return st.integers(0, 1000000).map(lambda n: (str(n), n))
    if key == "level":
        return st.sampled_from(["debug", "info", "warn", "error"]).map(lambda v: (v, v))
    if key == "format":
        return st.sampled_from(["text", "json"]).map(lambda v: (v, v))
    if setting.parse is config._text:
        return _words.map(lambda w: (w, w))
    # Keys with their own grammar (algorithm lists, endpoints, URLs): their default text.
    return st.just((setting.default, setting.parse(setting.default)))


def _write(text: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".ini")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


class ConfigFuzzTests(unittest.TestCase):
    """The loader never fails with anything but its own error, and reads what is written."""

    @FUZZ
    @given(st.data())
    def test_round_trip(self, data: st.DataObject) -> None:
        """Any valid set of values written as nuttssh.ini loads back to the same values."""
        chosen = {}
        lines: dict[str, list[str]] = {}
        for setting in config.SCHEMA:
            if data.draw(st.booleans()):
                text, value = data.draw(_value_for(setting))
                chosen[setting.key] = value
                lines.setdefault(setting.section, []).append(f"{setting.key} = {text}")
        body = "".join(f"[{sec}]\n" + "\n".join(items) + "\n" for sec, items in lines.items())
        path = _write(body)
        try:
            loaded = config.load(path)
        finally:
            os.unlink(path)
        for key, value in chosen.items():
            self.assertEqual(loaded.values[key], value, key)

    @FUZZ
    @given(st.text(max_size=400))
    def test_arbitrary_text_only_config_errors(self, text: str) -> None:
        """Arbitrary file contents load or raise ConfigError, never another exception."""
        path = _write(text)
        try:
            config.load(path)
        except config.ConfigError as exc:
            self.assertNotIn("\n", str(exc))
        finally:
            os.unlink(path)

    @FUZZ
    @given(
        st.sampled_from(config.SCHEMA),
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
            max_size=40,
        ),
    )
    def test_arbitrary_value_only_config_errors(self, setting: config.Setting, value: str) -> None:
        """Any value for any key loads or raises a one-line ConfigError naming the key."""
        path = _write(f"[{setting.section}]\n{setting.key} = {value}\n")
        try:
            config.load(path)
        except config.ConfigError as exc:
            self.assertNotIn("\n", str(exc))
            self.assertIn(path, str(exc))
        finally:
            os.unlink(path)
