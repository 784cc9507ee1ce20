"""Run a command where loopback is the only network: `unshare -n` plus `lo` brought up.

Ray 2.60's processes (GCS, raylet, workers, dashboard agent) listen on every interface, with no
option to bind loopback only. On a machine where nothing may listen beyond loopback (this
project's test and bench machines), the local cluster therefore runs in a private network
namespace, whose only interface is its own loopback:

    unshare -n python -m loraserve.server.ray.netns -- loraserve serve-ray ...

This module is the part after `unshare -n`: it brings `lo` up (a fresh namespace has it down)
without needing the `ip` tool, then execs the command.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH14s"


def bring_loopback_up() -> None:
    """Sets IFF_UP on `lo` in the current network namespace (needs CAP_NET_ADMIN there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, b"lo", 0, b"")
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP, b""))


def private_network_command(command: list[str]) -> list[str] | None:
    """`command` wrapped to run in a new network namespace; None where this host refuses one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return None
    return [unshare, "-n", sys.executable, "-m", "loraserve.server.ray.netns", "--", *command]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: unshare -n python -m loraserve.server.ray.netns -- CMD...", file=sys.stderr)
        return 2
    bring_loopback_up()
    os.execvp(args[0], args)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
