"""Sockets and background threads for the project's own HTTP servers (emulator, receiver)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


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
    except (TypeError, UnicodeError) as exc:  # a name IDNA cannot encode ("ä..x")
        sock.close()
        raise OSError(f"cannot use host {host!r}: not a valid host name ({exc})") from None
    sock.set_inheritable(True)
    return sock


@contextmanager
def serve_in_thread(server: uvicorn.Server, sock: socket.socket, what: str) -> Iterator[None]:
    """Run `server` on `sock` in a daemon thread until the block exits, then stop it.

    Waits (15 s at most) until the server has started; `what` names it in the error.
    """
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=what.replace(" ", "-"), daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {what} did not start")
            time.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
