"""twistd plugin: ``twistd nuttconch`` starts the SSH switchboard."""

from twisted.application.service import ServiceMaker

Nuttconch = ServiceMaker(
    "nuttconch",
    "nuttconch.tap",
    "SSH switchboard: virtual ports for ssh -R, reached with ssh -L/-W/-J/-D.",
    "nuttconch",
)
