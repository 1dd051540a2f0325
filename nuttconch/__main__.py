# -*- test-case-name: tests.test_install,tests.test_twistd -*-
"""``python -m nuttconch`` / ``nuttconch``: the same as ``twistd -n nuttconch``.

It hands twistd its service maker directly instead of letting twistd look
for plugins: an editable install (``pip install -e .``) does not always put
``twisted/plugins`` where plugin discovery looks, and then ``twistd`` would
answer "Unknown command: nuttconch".
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from twisted.application.service import IServiceMaker, ServiceMaker
from twisted.scripts.twistd import ServerOptions

SERVICE_MAKER = ServiceMaker(
    "nuttconch",
    "nuttconch.tap",
    "SSH switchboard: virtual ports for ssh -R, reached with ssh -L/-W/-J/-D.",
    "nuttconch",
)


class NuttconchServerOptions(ServerOptions):
    """twistd's options with nuttconch as the only service, found without discovery."""

    def _getPlugins(self, interface: Any, package: Any = None) -> Iterable[Any]:
        if interface is IServiceMaker:
            return [SERVICE_MAKER]
        return super()._getPlugins(interface, package)


def main(argv: list[str] | None = None) -> None:
    from twisted.application import app
    from twisted.scripts.twistd import runApp

    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "nuttconch", *args]
    app.run(runApp, NuttconchServerOptions)


if __name__ == "__main__":
    main()
