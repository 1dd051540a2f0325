"""The shape of the code base itself: what a reader and a second implementation rely on.

No import cycles between nuttconch's modules, no per-process counters hidden
in module globals, every ``test-case-name`` header naming test modules that
exist, every test saying in a docstring what it checks, and config parsing
that does not drag in the packet crypto.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nuttconch"
TESTS = ROOT / "tests"


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """The nuttconch modules ``path`` imports anywhere (functions included), except
    under ``if TYPE_CHECKING``: a deferred import is still a cycle to a reader."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level == 1:
                    names = [module] if module else [a.name for a in child.names]
                elif module == "nuttconch":
                    names = [a.name for a in child.names]
                elif module.startswith("nuttconch."):
                    names = [module.split(".")[1]]
                else:
                    names = []
                found.update(n.split(".")[0] for n in names)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("nuttconch."):
                        found.add(alias.name.split(".")[1])
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found & modules


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each listed once from its smallest module name."""
    cycles: list[list[str]] = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycles.append(path)
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for module in sorted(graph):
        walk(module, module, [module])
    return cycles


class ImportCycleTests(unittest.TestCase):
    def test_finder_sees_cycles(self) -> None:
        """The cycle finder reports a two-module and a three-module cycle, and no
        cycle in a chain (so the check below can fail)."""
        self.assertEqual(import_cycles({"a": {"b"}, "b": {"a"}}), [["a", "b"]])
        self.assertEqual(import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}), [["a", "b", "c"]])
        self.assertEqual(import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}), [])

    def test_finder_reads_every_import_form(self) -> None:
        """Relative, absolute and function-level imports count; TYPE_CHECKING ones not."""
        path = Path(self.mktemp())
        path.write_text(
            "from typing import TYPE_CHECKING\n"
            "from . import admin\n"
            "from .circuit import Circuit\n"
            "import nuttconch.registry\n"
            "def f():\n    from nuttconch.session import x\n"
            "if TYPE_CHECKING:\n    from .avatar import A\n"
        )
        modules = {"admin", "circuit", "registry", "session", "avatar"}
        self.assertEqual(
            package_imports(path, modules), {"admin", "circuit", "registry", "session"}
        )

    def test_no_import_cycles(self) -> None:
        """No nuttconch module imports, directly or through others, one that imports it."""
        modules = {p.stem for p in PACKAGE.glob("*.py")}
        graph = {m: package_imports(PACKAGE / f"{m}.py", modules) for m in modules}
        self.assertEqual(import_cycles(graph), [])


def avatar_probes(source: str) -> list[int]:
    """Lines that test "authenticated" by ``hasattr(x, "avatar")`` (or getattr's
    default), instead of the one spelling, `nuttconch.access.authenticated`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "hasattr"
            and len(node.args) == 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "avatar"
        ):
            found.append(node.lineno)
    return sorted(found)


def access_literals(source: str) -> list[int]:
    """Lines that test an access value spelled as a string (``"admin" in x.access``)
    instead of naming access's constant."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
            and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
            and any(isinstance(c, ast.Attribute) and c.attr == "access" for c in node.comparators)
        ):
            found.append(node.lineno)
    return sorted(found)


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


class AccessSpellingTests(unittest.TestCase):
    """Issue 10.3: "authenticated" and access values are each spelled one way."""

    def test_finders_see_the_old_spellings(self) -> None:
        """The finders below are not vacuous: they find what they forbid."""
        source = (
            'if hasattr(self.transport, "avatar"):\n    pass\n'
            'ok = hasattr(t, "avatar") and "admin" in identity.access\n'
            'fine = hasattr(t, "avatars") or ADMIN in identity.access or "a" in names\n'
            'if "initiate" not in avatar.identity.access:\n    pass\n'
        )
        self.assertEqual(avatar_probes(source), [1, 3])
        self.assertEqual(access_literals(source), [3, 5])

    def test_no_hasattr_avatar(self) -> None:
        """No module asks ``hasattr(..., "avatar")``: they call access.authenticated."""
        found = [
            f"{path.relative_to(PACKAGE)}:{n}"
            for path in _package_files()
            for n in avatar_probes(path.read_text(encoding="utf-8"))
        ]
        self.assertEqual(found, [])

    def test_no_access_values_as_strings(self) -> None:
        """No module tests ``"admin" in x.access``: the values are access's constants."""
        found = [
            f"{path.relative_to(PACKAGE)}:{n}"
            for path in _package_files()
            for n in access_literals(path.read_text(encoding="utf-8"))
        ]
        self.assertEqual(found, [])


class HiddenStateTests(unittest.TestCase):
    def test_no_module_level_counters(self) -> None:
        """No module keeps an ``itertools.count`` at module level: ids are numbered by
        the object that owns them (the factory, the registry), per server."""
        found = []
        for path in sorted(PACKAGE.glob("*.py")):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                    if "count(" in ast.unparse(node.value):
                        found.append(f"{path.name}:{node.lineno}")
        self.assertEqual(found, [])

    def test_circuit_ids_are_per_factory(self) -> None:
        """Two servers in one process number their circuits independently, from 1."""
        from twisted.internet.task import Clock

        from nuttconch import config, connection
        from nuttconch.registry import InMemoryRegistry
        from nuttconch.server import SwitchboardFactory

        path = os.path.abspath(self.mktemp())
        Path(path).write_text("[server]\n")
        cfg = config.load(path)
        one = SwitchboardFactory(cfg, InMemoryRegistry(), None, {}, clock=Clock())
        two = SwitchboardFactory(cfg, InMemoryRegistry(), None, {}, clock=Clock())
        self.assertEqual([next(one.circuitIds), next(one.circuitIds)], [1, 2])
        self.assertEqual(next(two.circuitIds), 1)
        self.assertFalse(hasattr(connection, "_circuit_ids"))

    def test_log_observer_changes_no_global(self) -> None:
        """Building a debug log observer leaves Conch's records quiet for a server whose
        config says info, and a debug config lets them through, per object."""
        import io

        from twisted.logger import Logger

        from nuttconch.circuit import CircuitEnd
        from nuttconch.logs import ConchLogger, make_observer

        class Config:
            level = "info"

        class Factory:
            config = Config()

        class Transport:
            factory = Factory()

        class Conn:
            transport = Transport()

        end = CircuitEnd.__new__(CircuitEnd)
        end.conn = Conn()
        make_observer("debug", "text", out=io.StringIO())
        self.assertIsInstance(end._log, ConchLogger)
        Config.level = "debug"
        bound = end._log
        self.assertIs(type(bound), Logger)
        self.assertIs(bound.source, end)


class HeaderTests(unittest.TestCase):
    def test_test_case_names_exist(self) -> None:
        """Every ``test-case-name`` header names only test modules that exist."""
        missing = []
        for path in sorted([*PACKAGE.glob("*.py"), *(ROOT / "twisted" / "plugins").glob("*.py")]):
            first = path.read_text(encoding="utf-8").split("\n", 1)[0]
            if "test-case-name:" not in first:
                continue
            names = first.split("test-case-name:", 1)[1].replace("-*-", "").strip()
            for name in names.split(","):
                parts = name.strip().split(".")
                if not (ROOT.joinpath(*parts).with_suffix(".py")).exists():
                    missing.append(f"{path.name}: {name.strip()}")
        self.assertEqual(missing, [])

    def test_every_test_has_a_docstring(self) -> None:
        """Every test method in tests/ has a docstring saying the behaviour it checks."""
        bare = []
        for path in sorted(TESTS.glob("test_*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ClassDef):
                    continue
                for fn in node.body:
                    if (
                        isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and fn.name.startswith("test")
                        and not ast.get_docstring(fn)
                    ):
                        bare.append(f"{path.name}:{fn.lineno} {node.name}.{fn.name}")
        self.assertEqual(bare, [])


class ConfigImportTests(unittest.TestCase):
    def test_config_does_not_import_crypto(self) -> None:
        """Loading and validating a config (algorithm lists included) imports neither
        nuttconch.crypto nor nuttconch.transport."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("[server]\nciphers = ^aes256-ctr\nmacs = -hmac-sha2-512\n")
        code = (
            "import sys, nuttconch.config as c\n"
            f"cfg = c.load({path!r})\n"
            "assert cfg.ciphers[0] == b'aes256-ctr', cfg.ciphers\n"
            "print(sorted(m for m in sys.modules if m in"
            " ('nuttconch.crypto', 'nuttconch.transport')))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
        )
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "[]"), out.stderr)

    def test_algorithm_names_are_what_crypto_implements(self) -> None:
        """The names config accepts are exactly the ciphers and MACs crypto.py implements."""
        from nuttconch import algorithms, crypto

        self.assertEqual(tuple(crypto.CIPHERS), algorithms.CIPHER_NAMES)
        self.assertEqual(tuple(crypto.MACS), algorithms.MAC_NAMES)
