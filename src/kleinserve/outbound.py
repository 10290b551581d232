"""Outbound HTTP to URLs that API clients give (reference images, webhooks), without becoming their proxy.

A client-supplied URL may name any host, including one that answers a public address when it is checked and
127.0.0.1 when it is connected to (DNS rebinding). So every request here resolves its host once (on a thread
of its client's own, never the event loop), checks EVERY address (one refused address refuses the URL), and
then connects only to the checked addresses, in the order the resolver gave them.

The pin lives in the network backend, under httpx: the URL, the Host header and TLS stay those of the name
(SNI and the certificate check are done for the host name by the ssl module, as for any request); only the
TCP connect goes to the checked address. The other way (rewriting the URL to the address and sending the
`sni_hostname` extension) makes httpcore pool connections by address, so that a connection whose certificate
was checked for one name would be reused, unchecked, for another name on the same address. Redirects are
never followed (a Location could lead anywhere), and proxies from the environment are ignored
(`trust_env=False`): through a proxy it is the proxy that resolves, and the check would mean nothing.

Which addresses are public (`is_public_address`): `ipaddress`'s `is_global`, less what it lets through:
multicast; an IPv4 address embedded in IPv6 (IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4
`2002::/16`) is judged as that IPv4 address; IPv4-compatible `::a.b.c.d` (deprecated) and local-use NAT64
`64:ff9b:1::/48` (any embedding) are refused. With `allow_private` (`--allow-private-urls`) every address
is allowed, still resolved once and pinned.

Errors do not become a map of the network behind the server: a refused URL names its host (the caller's own
text), never the address it resolved to, and a refused address is never connected to, so no connection error,
timeout or HTTP status of an internal service can reach the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

import certifi
import httpcore
import httpx

from kleinserve.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[tuple[Any, ...]]]  # socket.getaddrinfo(host, port) and its answer
AddressPolicy = Callable[[IPAddress], bool]  # True: this address may be connected to

RESOLVER_THREADS = 4  # per client: slow DNS for one kind of request cannot starve the others' threads
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def is_public_address(ip: IPAddress) -> bool:
    """Whether `ip` is a public unicast address (see the module's docstring for what that excludes)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public_address(embedded)
        if ip in _IPV4_COMPATIBLE or ip in _NAT64_LOCAL:
            return False
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that a mapped, NAT64 or 6to4 IPv6 address reaches; None for other addresses."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


@dataclass(frozen=True)
class OutboundPolicy:
    """Where outbound requests may connect. `resolver` and `is_allowed` are replaceable (tests answer names
    from a stub and count a loopback address as public); `allow_private` allows every address."""

    allow_private: bool = False
    resolver: Resolver = socket.getaddrinfo
    is_allowed: AddressPolicy = is_public_address

    def addresses(self, host: str, port: int, param: str) -> list[str]:
        """The addresses of `host` that requests may connect to, in the resolver's order. Blocks (DNS).
        InvalidInput naming `param` when the host does not resolve or ANY of its addresses is refused."""
        try:
            answers = self.resolver(host, port)
        except (OSError, UnicodeError):  # socket.gaierror is an OSError; UnicodeError: a label IDNA refuses
            raise InvalidInput(f"{param}: cannot resolve {host}", param=param) from None
        found = [str(answer[4][0]) for answer in answers if answer[0] in (socket.AF_INET, socket.AF_INET6)]
        addresses = list(dict.fromkeys(found))  # one per address, not per socket type
        if not addresses:
            raise InvalidInput(f"{param}: cannot resolve {host}", param=param)
        if not self.allow_private and not all(self.is_allowed(ipaddress.ip_address(a)) for a in addresses):
            raise InvalidInput(
                f"{param}: {host} resolves to a non-public address (such as a private or loopback one)",
                param=param,
                allowed="public http(s) URLs (start the server with --allow-private-urls to allow others)",
            )
        return addresses


class Pin(NamedTuple):
    """The checked addresses of one host, handed from OutboundClient to the network backend."""

    host: str
    addresses: tuple[str, ...]


_PIN_EXTENSION = "kleinserve.pin"  # request extension: the Pin of the request's host
_pinned: ContextVar[Pin | None] = ContextVar("kleinserve_pinned", default=None)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to the pinned addresses of the host being connected to; anything else is refused, so a
    request that skipped the check cannot connect at all."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pin = _pinned.get()
        if pin is None or pin.host != host:
            raise httpcore.ConnectError(f"refusing to connect to {host}: its addresses were not checked")
        failure: Exception | None = None
        for address in pin.addresses:  # the next checked address when one does not answer
            try:
                return await self._backend.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # addresses() never pins an empty tuple
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("outbound requests do not use Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool whose network backend is `_PinnedBackend`."""

    def __init__(self, limits: httpx.Limits) -> None:
        # Certificates are checked against certifi's roots, or the bundle SSL_CERT_FILE names (a private CA,
        # as OpenSSL and httpx read it); the other proxy and environment settings stay ignored (docstring).
        ssl_context = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())
        super().__init__(verify=ssl_context, limits=limits, trust_env=False)
        # httpx has no parameter for the network backend; httpcore's pool has. `_pool` is the one private
        # attribute used: httpx's transport keeps its pool there (since 0.18) and only forwards to it.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # The connect happens in this call, in this task: the context variable reaches the backend.
        token = _pinned.set(request.extensions.get(_PIN_EXTENSION))
        try:
            return await super().handle_async_request(request)
        finally:
            _pinned.reset(token)


class OutboundClient:
    """An httpx client with its own connection pool (`max_connections`) and resolver threads, for URLs that
    API clients give: see the module's docstring. Create one per kind of request, so that one kind hanging
    cannot exhaust the other's pool."""

    def __init__(self, policy: OutboundPolicy, max_connections: int, max_keepalive: int = 10) -> None:
        self.policy = policy
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive)
        self._client = httpx.AsyncClient(
            transport=_PinnedTransport(limits), follow_redirects=False, trust_env=False
        )
        self._resolving = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="kleinserve-resolve")

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        param: str,
        *,
        timeout: float,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send a request to a checked address of `url`'s host; the response's body is left to the caller to
        read. InvalidInput naming `param` when the URL is not valid or its host is refused or unresolvable;
        httpx.HTTPError when the request fails. `timeout` (seconds) is httpx's, per connect/read/write."""
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL:
            raise InvalidInput(f"{param} is not a valid URL", param=param) from None
        host = target.raw_host.decode("ascii")  # what httpcore will connect to: IDNA-encoded, no brackets
        if not host:
            raise InvalidInput(f"{param}: the URL has no host", param=param)
        port = target.port or (443 if target.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        addresses = await loop.run_in_executor(self._resolving, self.policy.addresses, host, port, param)
        async with self._client.stream(
            method,
            target,
            content=content,
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
            extensions={_PIN_EXTENSION: Pin(host, tuple(addresses))},
        ) as response:
            yield response

    async def aclose(self) -> None:
        """Close the pool's connections and stop the resolver threads."""
        await self._client.aclose()
        self._resolving.shutdown(wait=False, cancel_futures=True)
