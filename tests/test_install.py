"""The contributor's install: ``pip install -e .`` and then the three ways to start.

A fresh virtual environment gets an editable install of a copy of this
checkout (``--no-deps --no-build-isolation``: offline and quick; the
dependencies come from the environment running the tests, through a ``.pth``
line), and ``nuttconch``, ``python -m nuttconch`` and ``twistd nuttconch``
are run from an unrelated directory without PYTHONPATH.  Each must show
nuttconch's own usage, not twistd's "Unknown command: nuttconch".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
# What an sdist holds; enough for setuptools to build the editable install.
PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md", "nuttconch", "twisted")
USAGE = "nuttconch [--config PATH] [--listen ENDPOINT]"
TIMEOUT = 120


def editable_install(source: Path, work: Path) -> Path:
    """Copy ``source``'s project files to ``work/src``, make ``work/venv`` and install
    the copy there with ``pip install -e``; return the venv's python."""
    src = work / "src"
    src.mkdir(parents=True)
    for name in PROJECT_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(
                path, src / name, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache")
            )
        else:
            shutil.copy2(path, src / name)
    venv = work / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=TIMEOUT,
    ).stdout.strip()  # fmt: skip
    # Twisted and the rest, from the environment that runs the tests (as a .pth line,
    # whose own .pth files, such as another editable nuttconch, are not processed).
    Path(site, "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-build-isolation", "--no-index", "-e", str(src)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"pip install -e failed:\n{result.stdout}\n{result.stderr}")
    return python


def run(argv: list[str], cwd: Path) -> str:
    """Run ``argv`` in ``cwd`` without PYTHONPATH; stdout and stderr together."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUTTSSH_CONFIG_FILE")}
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    return result.stdout + result.stderr


class EditableInstallTests(unittest.TestCase):
    source = ROOT

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.python = editable_install(self.source, self.work)
        self.elsewhere = self.work / "elsewhere"
        self.elsewhere.mkdir()

    def test_console_script(self) -> None:
        """The ``nuttconch`` console script starts nuttconch's own command line."""
        out = run([str(self.python.parent / "nuttconch"), "--help"], self.elsewhere)
        self.assertIn(USAGE, out)
        self.assertNotIn("Unknown command", out)

    def test_python_m(self) -> None:
        """``python -m nuttconch`` starts nuttconch's own command line."""
        out = run([str(self.python), "-m", "nuttconch", "--help"], self.elsewhere)
        self.assertIn(USAGE, out)
        self.assertNotIn("Unknown command", out)

    def test_twistd_plugin(self) -> None:
        """``twistd nuttconch`` finds the plugin of an editable install."""
        twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
        out = run([str(self.python), "-c", twistd, "nuttconch", "--help"], self.elsewhere)
        self.assertIn(USAGE, out)
        self.assertNotIn("Unknown command", out)
