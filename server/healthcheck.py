"""The container's HEALTHCHECK: asks the server's gRPC health service on the port it serves.

`python -m loraserve.server.healthcheck` reads the server's own command line (/proc/1/cmdline:
in the image the server is PID 1) with the `serve` parser, so `--host` and `--port` given to
`docker run` are followed; with `--port 0` it probes the TCP ports PID 1 listens on. Exit 0 when
the health service answers SERVING, 1 otherwise. Plain-text gRPC only (a TLS server needs a
probe that presents its CA).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.server.main import add_serve_arguments


def serve_address(cmdline: list[str]) -> tuple[str, int]:
    """(host to probe, port) from a `loraserve serve ...` command line."""
    argv = cmdline[cmdline.index("serve") + 1 :] if "serve" in cmdline else []
    parser = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(args.host, args.host)
    return host, int(args.port)


def listening_ports(pid: int | str = 1, proc: Path = Path("/proc")) -> list[int]:
    """TCP ports process `pid` listens on (from its socket inodes and /proc/net/tcp{,6})."""
    inodes = set()
    for fd in (proc / str(pid) / "fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        path = proc / str(pid) / "net" / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


def is_serving(target: str, timeout: float = 4.0) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(pid: str = "1") -> int:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    host, port = serve_address(cmdline)
    ports = [port] if port else listening_ports(pid)
    bracket = f"[{host}]" if ":" in host else host
    return 0 if any(is_serving(f"{bracket}:{p}") for p in ports) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
