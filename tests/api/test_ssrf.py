"""SSRF (issue 14, item 1): outbound requests connect only to the addresses that were checked.

Nothing leaves the machine. Names under `.test` are answered by a resolver stub that rebinds: the first
question about a name gets PUBLIC, every later one INTERNAL (the attack: checked public, connected loopback).
An address policy that counts PUBLIC (127.0.0.2) as public stands in for the internet; two real HTTP servers
listen on one port, the "public" one on 127.0.0.2 and the "internal" one on 127.0.0.1, and the internal one
must never see a request, for a reference fetch through a running kleinserve and for a BFL webhook.
"""

from __future__ import annotations

import asyncio
import errno
import http.server
import io
import ipaddress
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from kleinserve.errors import InvalidInput
from kleinserve.outbound import IPAddress, OutboundClient, OutboundPolicy, is_public_address
from tests.api.conftest import RunningServer
from tests.api.test_webhooks import submit, webhook_status
from tests.conftest import random_image

PUBLIC = "127.0.0.2"
INTERNAL = "127.0.0.1"


def counts_public_as_public(ip: IPAddress) -> bool:
    return ip == ipaddress.ip_address(PUBLIC) or is_public_address(ip)


def answer(address: str, port: int) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))


@dataclass
class RebindingResolver:
    """getaddrinfo's shape: the first question about a name answers PUBLIC, every later one INTERNAL."""

    calls: Counter[str] = field(default_factory=Counter)

    def __call__(self, host: str, port: int) -> list[tuple[Any, ...]]:
        self.calls[host] += 1
        return [answer(PUBLIC if self.calls[host] == 1 else INTERNAL, port)]


@dataclass
class Site:
    """An HTTP server on one address: GET answers a PNG, POST 200; records (method, path, Host) of each."""

    requests: list[tuple[str, str, str]] = field(default_factory=list)


def start_site(address: str, port: int, png: bytes) -> tuple[Site, http.server.ThreadingHTTPServer]:
    site = Site()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def answer(self, body: bytes, kind: str) -> None:
            site.requests.append((self.command, self.path, self.headers.get("Host", "")))
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.answer(png, "image/png")

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.answer(b"ok", "text/plain")

    httpd = http.server.ThreadingHTTPServer((address, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return site, httpd


@pytest.fixture
def sites() -> Iterator[tuple[int, Site, Site]]:
    """(port, public site on PUBLIC:port, internal site on INTERNAL:port)."""
    buffer = io.BytesIO()
    random_image(64, 64, seed=3).save(buffer, format="PNG")
    servers = []
    for _ in range(20):  # a free port on 127.0.0.2 may be taken on 127.0.0.1: try another
        public, public_httpd = start_site(PUBLIC, 0, buffer.getvalue())
        port = public_httpd.server_address[1]
        try:
            internal, internal_httpd = start_site(INTERNAL, port, buffer.getvalue())
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            public_httpd.shutdown()
            public_httpd.server_close()
            continue
        servers = [public_httpd, internal_httpd]
        break
    assert servers, "no port free on both loopback addresses"
    yield port, public, internal
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


ADDRESSES = [
    ("8.8.8.8", True),
    ("2606:4700:4700::1111", True),
    ("127.0.0.1", False),
    ("10.0.0.1", False),
    ("172.16.0.1", False),
    ("192.168.1.1", False),
    ("169.254.169.254", False),
    ("100.64.0.1", False),  # carrier-grade NAT
    ("0.0.0.0", False),
    ("255.255.255.255", False),
    ("224.0.0.1", False),  # multicast: is_global lets it through
    ("239.255.255.250", False),
    ("::1", False),
    ("::", False),
    ("fe80::1", False),
    ("fc00::1", False),
    ("2001:db8::1", False),
    ("ff0e::1", False),  # global-scope multicast: is_global lets it through
    ("ff02::1", False),
    ("::ffff:127.0.0.1", False),  # IPv4-mapped
    ("::ffff:10.0.0.1", False),
    ("::ffff:8.8.8.8", True),
    ("::127.0.0.1", False),  # IPv4-compatible (deprecated): is_global lets it through
    ("::8.8.8.8", False),
    ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1: is_global lets it through
    ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
    ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8: how an IPv6-only host with DNS64 reaches the internet
    ("64:ff9b:1::808:808", False),  # local-use NAT64
    ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1: is_global lets it through
    ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
    ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
    ("2001::1", False),  # Teredo
]


@pytest.mark.parametrize(("address", "public"), ADDRESSES)
def test_address_policy(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_every_address_of_a_name_is_checked() -> None:
    """A name answering a public and a loopback address is refused; the message names the host, not the
    address it resolved to."""
    policy = OutboundPolicy(resolver=lambda host, port: [answer("8.8.8.8", port), answer(INTERNAL, port)])
    with pytest.raises(InvalidInput) as refused:
        policy.addresses("mixed.test", 80, "images[0]")
    message = refused.value.message
    assert "mixed.test" in message and "private or loopback" in message
    assert INTERNAL not in message and "8.8.8.8" not in message
    public_only = OutboundPolicy(resolver=lambda host, port: [answer("8.8.8.8", port)] * 3)
    assert public_only.addresses("public.test", 80, "images[0]") == ["8.8.8.8"]
    allowed = OutboundPolicy(allow_private=True, resolver=policy.resolver)
    assert allowed.addresses("mixed.test", 80, "images[0]") == ["8.8.8.8", INTERNAL]


def test_unresolvable_name() -> None:
    def fails(host: str, port: int) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(InvalidInput, match="cannot resolve nowhere.test"):
        OutboundPolicy(resolver=fails).addresses("nowhere.test", 80, "webhook_url")


def test_reference_url_reaches_only_the_checked_address(
    start_server: Callable[..., RunningServer], sites: tuple[int, Site, Site]
) -> None:
    port, public, internal = sites
    resolver = RebindingResolver()
    running = start_server(resolver=resolver, public_address=counts_public_as_public)
    url = f"http://images.test:{port}/ref.png"
    with httpx.Client(base_url=running.base_url, timeout=60) as http:
        body = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 1, "images": [url]}
        response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert public.requests == [("GET", "/ref.png", f"images.test:{port}")]  # the name's Host header kept
    assert internal.requests == []
    assert resolver.calls["images.test"] == 1  # resolved once: what was checked is what was connected to


def test_webhook_reaches_only_the_checked_address(
    start_server: Callable[..., RunningServer], sites: tuple[int, Site, Site]
) -> None:
    port, public, internal = sites
    resolver = RebindingResolver()
    running = start_server(resolver=resolver, public_address=counts_public_as_public)
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        job = submit(http, webhook_url=f"http://hooks.test:{port}/hook")
        status = webhook_status(http, job["id"], lambda s: True)
    assert status.startswith("delivered on attempt 1"), status
    assert public.requests == [("POST", "/hook", f"hooks.test:{port}")]
    assert internal.requests == []
    assert resolver.calls["hooks.test"] == 1


def test_refused_host_answers_alike_whatever_listens_there(
    start_server: Callable[..., RunningServer], sites: tuple[int, Site, Site]
) -> None:
    """An internal name is refused before any connection, with the same words whether a service listens on
    its port or not, and without the address it resolved to: no port scan through the error messages."""
    port, _, internal = sites
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind((INTERNAL, 0))
        closed = probe.getsockname()[1]
    running = start_server(resolver=lambda host, p: [answer(INTERNAL, p)])
    messages = []
    with httpx.Client(base_url=running.base_url, timeout=60) as http:
        for target in (port, closed):
            body = {"prompt": "a fox", "size": "256x256", "images": [f"http://intranet.test:{target}/x.png"]}
            response = http.post("/v1/images/generations", json=body)
            assert response.status_code == 400, response.text
            messages.append(response.json()["error"]["message"])
    assert messages[0] == messages[1]
    assert "intranet.test" in messages[0] and "private or loopback" in messages[0]
    assert INTERNAL not in messages[0]
    assert internal.requests == []


def test_next_checked_address_when_one_does_not_answer(sites: tuple[int, Site, Site]) -> None:
    """A name with two checked addresses, the first refusing connections: the second serves the request."""
    port, public, internal = sites
    unused = "127.0.0.3"  # nothing listens there

    async def fetch() -> int:
        policy = OutboundPolicy(
            resolver=lambda host, p: [answer(unused, p), answer(PUBLIC, p)],
            is_allowed=lambda ip: str(ip) in (unused, PUBLIC),
        )
        client = OutboundClient(policy, max_connections=2)
        try:
            async with client.stream("GET", f"http://two.test:{port}/ref.png", "url", timeout=5) as response:
                return response.status_code
        finally:
            await client.aclose()

    assert asyncio.run(fetch()) == 200
    assert public.requests == [("GET", "/ref.png", f"two.test:{port}")]
    assert internal.requests == []
