# -*- test-case-name: tests.test_admin -*-
"""What a command returns: an exit code and the text for stdout and stderr.

Its own module so that the command table (commands.py) and the admin
commands (admin.py) can both use it without importing each other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Result:
    code: int
    out: str = ""
    err: str = ""
