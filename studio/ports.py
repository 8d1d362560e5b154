"""The studio's listening sockets, bound before anything slow starts, and who holds a busy port.

`studio serve` binds its port first (before the minute vLLM takes to load) and hands the bound
sockets to uvicorn, so a busy port is reported at once and nothing can take the port meanwhile.
The sockets are bound the way uvicorn's own asyncio server binds them: with SO_REUSEADDR, which
allows the address while connections of a studio that just crashed or stopped sit in TIME-WAIT
(without it a restart is refused for up to a minute), and with IPV6_V6ONLY on IPv6 sockets. A
host is resolved as asyncio resolves it, so `--host ::` (every IPv6 address) works too.

When the port really is in use, `port_holder` names the process listening on it, from
/proc/net/tcp{,6} (the socket's inode) and /proc/PID/fd (who has that inode open).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

LISTEN = "0A"  # the TCP state code of a listening socket in /proc/net/tcp


class PortError(OSError):
    """The studio cannot listen where it was asked to."""


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address `host` resolves to, or PortError."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise PortError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise _bind_error(host, port, exc) from None
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _bind_error(host: str, port: int, exc: OSError) -> PortError:
    if exc.errno == errno.EADDRINUSE:
        holder = port_holder(port)
        who = f" by {holder}" if holder else " (by a process this user cannot see)"
        return PortError(
            f"--port {port}: already in use on {host}{who}; stop it or pick another port with --port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return PortError(f"--host {host}: not an address of this machine; use one of its addresses")
    if exc.errno == errno.EACCES:
        return PortError(f"--port {port}: ports below 1024 need root; pick a port from 1024 up")
    return PortError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})")


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on `port` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes - {"0"}


def port_holder(port: int) -> str | None:
    """'pid N (command line)' of a process listening on `port`, or None when none can be seen."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return f"pid {entry.name} ({command_line(int(entry.name))})"
    return None


def command_line(pid: int, limit: int = 120) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"
    return text if len(text) <= limit else text[:limit] + "…"
