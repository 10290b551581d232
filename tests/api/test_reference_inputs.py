"""Reference images as clients send them, without holding the event loop (issue 14, item 4): base64 is
decoded off the loop, in slices that let it run, with exactly the rules of `base64.b64decode(validate=True)`;
an overlong URL is refused before it is parsed."""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import time

import pytest

import kleinserve.media
from kleinserve.errors import InvalidInput
from kleinserve.media import ImageFetcher, decode_base64
from kleinserve.outbound import OutboundPolicy

SAMPLES = [
    "",
    "AAAA",
    "AAAAAAAA",
    "AAAAAAAAAA==",
    "AAAAAAAAAAA=",
    "AAAAAAAA=",  # padding after a whole quantum: tolerated, as b64decode does
    "AAAAAAAA====",
    "AAAAAAA=AAAA",  # padding in the middle, at a slice's end
    "AAAA=AAAAAAA",  # padding in the middle of a slice
    "AAAAAAAAA",  # a quantum cut short
    "AAAA AAAA",
    "AAAA\nAAAA",
    "AAAA*AAA",
    "  AAAAAAAA  ",
    "data:image/png;base64,AAAAAAAAAA==",
    " \tdata:image/png;base64, AAAAAAAAAA==\n",
    "data:image/png;base64",  # no data
    "AAAAAAAé",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_decoded_as_b64decode_does(text: str) -> None:
    stripped = text.strip()
    payload = stripped.partition(",")[2] if stripped.startswith("data:") else stripped
    try:
        expected: bytes | None = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        expected = None
    if stripped.startswith("data:") and "," not in stripped:
        expected = None  # refused (the server used to fail on it with a 500)
    if expected is None:
        with pytest.raises(InvalidInput, match="image is (not valid base64|a data URL without data)"):
            decode_base64(text, "image")
    else:
        assert decode_base64(text, "image") == expected


def test_large_base64_leaves_the_event_loop_running() -> None:
    """45 MB of base64 (~0.2 s to decode, holding the GIL in one call) while a ticker on the loop records its
    longest wait between ticks."""
    text = base64.b64encode(os.urandom(34 * 1024 * 1024)).decode()
    gaps: list[float] = []

    async def run() -> None:
        fetcher = ImageFetcher(OutboundPolicy())
        done = asyncio.Event()

        async def tick() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.01)
        try:
            with pytest.raises(InvalidInput, match="not a decodable image"):  # random bytes: decoded, refused
                await fetcher.image(text, "image")
        finally:
            done.set()
            await ticker
            await fetcher.client.aclose()

    asyncio.run(run())
    assert max(gaps) < 0.08, f"the event loop waited {max(gaps) * 1000:.0f} ms"


def test_overlong_url_is_refused_before_parsing() -> None:
    async def fetch() -> None:
        fetcher = ImageFetcher(OutboundPolicy(resolver=lambda host, port: pytest.fail("resolved")))
        try:
            await fetcher.image("https://example.test/" + "a" * kleinserve.media.URL_MAX_CHARS, "images[0]")
        finally:
            await fetcher.client.aclose()

    with pytest.raises(InvalidInput, match=r"images\[0\]: the URL is longer than 8192 characters"):
        asyncio.run(fetch())
