"""Listening sockets for the project's own HTTP servers (emulator, callback receiver)."""

from __future__ import annotations

import socket


def bind_tcp(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket for uvicorn.

    proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    says TCP, and without it every answer waits ~40 ms (Nagle + delayed ACK).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
