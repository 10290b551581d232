"""What one HTTP client may take (`ConnectionLimits`), and whether the server's port is free: the settings
side of api/connections.py, which enforces them inside uvicorn. Standard library only, so that the CLI
reads the defaults and checks the port without importing uvicorn (~90 ms on every command).
"""

from __future__ import annotations

import errno
import socket
import sys
from dataclasses import dataclass

from kleinserve.errors import InvalidInput

# Open files the server needs besides its HTTP connections: SQLite (database, WAL, shared memory), model and
# temp files, the reference fetcher's and the webhooks' outbound connection pools, logs, the event loop's own.
FD_RESERVE = 256
# Connections over the cap still get their 503 (or a health check its answer). At most these many of them
# may wait for their request head: a new one closes the one that has waited longest, with its 503.
OVERFLOW_CONNECTIONS = 64
NO_RLIMIT_FILES = 1024  # platforms without RLIMIT_NOFILE (Windows), and "unlimited" is taken as 64 times this


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may take. Sizes in bytes, times in seconds.

    A request head (request line and header fields) over `max_head_bytes` is answered 414 (when the URL
    alone is over it) or 431, as is one with more than `max_headers` fields; at most `max_head_bytes` plus
    one socket read (~256 KB) is buffered before that. A connection that has not sent a complete request head
    within `head_timeout_s` (from its connection, or from the first byte of a later request on it) is answered
    408 and closed; so is a request body that sends nothing for `body_idle_timeout_s` or is not complete after
    `body_timeout_s`. An idle keep-alive connection is closed after `keep_alive_timeout_s`.

    At most `max_connections` connections are served (None: the open-file limit less `fd_reserve` and
    OVERFLOW_CONNECTIONS, see `connection_cap`); a request on a connection over that answers 503 with
    Retry-After, except `GET /healthz`, which is answered as usual (then the connection closes), so that a
    health check tells "alive but saturated" apart from "dead" even while idle sockets fill the cap. Of the
    connections over the cap, at most OVERFLOW_CONNECTIONS wait for their request head: a newer one closes
    the oldest (with its 503), so a client that sends its request at once is answered, and open files stay
    below the limit.
    """

    max_head_bytes: int = 16 * 1024
    max_headers: int = 100
    head_timeout_s: float = 10.0
    body_idle_timeout_s: float = 30.0
    body_timeout_s: float = 300.0  # 50 MB (the default body limit) at 1.4 Mbit/s
    keep_alive_timeout_s: float = 5.0
    max_connections: int | None = None

    def connection_cap(self) -> int:
        """`max_connections`, or when None what the soft RLIMIT_NOFILE leaves: the limit less `fd_reserve`
        and OVERFLOW_CONNECTIONS, so that connections never take the files the server needs (1,024: 704)."""
        if self.max_connections is not None:
            return self.max_connections
        files = open_file_limit()
        return max(files - fd_reserve(files) - OVERFLOW_CONNECTIONS, 1)


def fd_reserve(files: int) -> int:
    """Open files kept for other than HTTP connections under a limit of `files`: FD_RESERVE, or a quarter of
    a limit so small that FD_RESERVE would leave no connections."""
    return min(FD_RESERVE, files // 4)


def open_file_limit() -> int:
    """The process's soft limit on open files (RLIMIT_NOFILE)."""
    if sys.platform == "win32":
        return NO_RLIMIT_FILES
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 64 * NO_RLIMIT_FILES if soft == resource.RLIM_INFINITY else soft


def check_port_free(host: str, port: int) -> None:
    """InvalidInput unless uvicorn could listen on `host`:`port` now: checked before minutes of model loading
    rather than found out after them. Binds as asyncio's create_server does (SO_REUSEADDR, so a port whose
    old connections linger in TIME_WAIT counts as free; IPv6 sockets v6-only), then lets go: a process that
    takes the port during loading still makes uvicorn fail, after the check."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidInput(f"host {host!r} cannot be resolved ({exc.strerror})", param="host") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise InvalidInput(f"port {port} on {host} is in use", param="port") from None
                raise InvalidInput(
                    f"cannot listen on {host} port {port} ({exc.strerror})", param="host"
                ) from None
