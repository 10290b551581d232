"""LoRA adapters as clients ask for them: the `loras` value every dialect takes, turned into the request's
`LoraChoice`s, and the list that GET /v1/loras answers.

The value is a JSON array of at most MAX_LORAS items, each `{"name": "<adapter>"}` or `{"url": "https://..."}`
with an optional `"scale"` (a number, default 1.0):

    OpenAI JSON, BFL                    "loras": [{"name": "watercolour", "scale": 0.8}]
    OpenAI multipart, Cloudflare        a form field `loras` holding that array's JSON text
    Vercel AI Gateway                   providerOptions.<any provider>.loras: the array

A name is an adapter of the server's folder (`--lora-dir`, GET /v1/loras lists them) or `sha256:<hex>` of one
downloaded before. The shape is checked here (one wording for every dialect, InvalidInput naming `loras`);
whether each adapter exists, fits the model and has a scale within range is the engine's to say, at resolve
(engine/lora.py). The count alone is checked here too, first, so that no request makes the server download
more than MAX_LORAS files.

URLs are taken only with `--allow-lora-urls`, https only, and fetched by the reference images' fetcher
(media.ImageFetcher: its outbound policy, so public addresses only unless `--allow-private-urls`, resolved
once and pinned, no redirects) up to LORA_MAX_BYTES within LORA_TIMEOUT_S. The engine's library
(Engine.adapters) checks the file against the model and keeps it under its content hash, in
`<data dir>/loras/`: the request carries `LoraChoice("sha256:<hex>", scale)`, so a queued job run again after
a restart needs no download, and a client that sends `{"name": "sha256:<hex>"}` (the job's `params.loras`
show it) downloads nothing. Each request with a URL downloads it: a URL's content may change, so a cache
keyed by URL could apply a stale adapter; the file is stored once per content all the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from kleinserve.engine.protocol import MAX_LORAS, AdapterInfo, AdapterLibrary
from kleinserve.errors import InvalidInput
from kleinserve.media import ImageFetcher
from kleinserve.types import LoraChoice

PARAM = "loras"
LORA_MAX_BYTES = 512 * 1024 * 1024  # an adapter file: rank 64 on every projection of klein 4B is ~150 MB
LORA_TIMEOUT_S = 300.0  # for the whole download: 512 MB at under 2 MB/s is refused
ALLOWED = (
    f'a JSON array of at most {MAX_LORAS} objects {{"name": "..."}} or {{"url": "https://..."}}, '
    'each with an optional numeric "scale"'
)
_KEYS = {"name", "url", "scale"}


@dataclass(frozen=True)
class LoraItem:
    """One item of a `loras` value as sent: exactly one of `name` and `url`; `scale` as given."""

    name: str | None
    url: str | None
    scale: float


def parse_loras(value: object) -> list[LoraItem]:
    """The items of a `loras` value: the array itself, or its JSON text (a form field); None or "" is none.
    InvalidInput naming `loras` (or `loras[i]`) for any other shape."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = orjson.loads(value)  # refuses NaN and Infinity, as the JSON bodies do
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"loras is not valid JSON ({exc})", param=PARAM, allowed=ALLOWED) from None
    if not isinstance(value, list):
        raise InvalidInput("loras must be an array", param=PARAM, allowed=ALLOWED)
    if len(value) > MAX_LORAS:
        raise InvalidInput(f"{len(value)} adapters given", param=PARAM, allowed=f"at most {MAX_LORAS}")
    return [_item(item, f"{PARAM}[{index}]") for index, item in enumerate(value)]


def _item(item: object, param: str) -> LoraItem:
    if not isinstance(item, dict) or not item.keys() <= _KEYS:
        raise InvalidInput(f"{param} is not a name or URL object", param=param, allowed=ALLOWED)
    name, url, scale = item.get("name"), item.get("url"), item.get("scale", 1.0)
    if (name is None) == (url is None):
        raise InvalidInput(f"{param} must give exactly one of name and url", param=param, allowed=ALLOWED)
    source = name if name is not None else url
    if not isinstance(source, str) or not source.strip():
        raise InvalidInput(f"{param}: name or url must be non-empty text", param=param, allowed=ALLOWED)
    if not isinstance(scale, int | float) or isinstance(scale, bool):
        raise InvalidInput(f"{param}: scale {scale!r} is not a number", param=param, allowed=ALLOWED)
    return LoraItem(name, url, float(scale))


class AdapterSource:
    """Turns the `loras` value of a request into its LoraChoices: names as given, URLs downloaded into
    `library` (the engine's: Engine.adapters; None where the server applies no adapters) only with
    `allow_urls`. `library.names()` is what GET /v1/loras lists."""

    def __init__(self, library: AdapterLibrary | None, fetcher: ImageFetcher, allow_urls: bool) -> None:
        self.library = library
        self.fetcher = fetcher
        self.allow_urls = allow_urls

    async def choices(self, value: object) -> tuple[LoraChoice, ...]:
        """The request's adapters, in the order given; URLs are downloaded one after another (at most
        MAX_LORAS). InvalidInput naming `loras` for a malformed value, a URL refused or not fetched, or a
        downloaded file the library refuses."""
        chosen = []
        for index, item in enumerate(parse_loras(value)):
            adapter = item.name if item.url is None else await self._download(item.url, f"{PARAM}[{index}]")
            chosen.append(LoraChoice(str(adapter), item.scale))
        return tuple(chosen)

    async def _download(self, url: str, param: str) -> str:
        """`sha256:<hex>` of the adapter at `url`, once the library has checked and stored it."""
        if not self.allow_urls:
            raise InvalidInput(
                f"{param}: adapter URLs are off on this server (it was started without --allow-lora-urls)",
                param=param,
                allowed="adapters by name: GET /v1/loras lists them",
            )
        library = self.library
        if library is None:  # scaled out: an API process has no engine to check a file against
            raise InvalidInput(f"{param}: this server applies no adapters", param=param)
        if url.lstrip()[:8].lower() != "https://":
            raise InvalidInput(f"{param}: the URL is not https", param=param, allowed="https URLs")
        data = await self.fetcher.download(url, param, LORA_MAX_BYTES, LORA_TIMEOUT_S)
        try:
            return await asyncio.to_thread(library.add, data)  # hashes and checks hundreds of MB: a thread
        except InvalidInput as refused:  # it names the file by its hash, which the caller never saw
            raise InvalidInput(f"{param} ({url}): {refused.message}", param=param) from None

    async def listing(self) -> dict[str, Any]:
        """GET /v1/loras's body: the folder's adapters (none without --lora-dir), read on a thread (the
        library reads each file's header)."""
        adapters = [] if self.library is None else await asyncio.to_thread(self.library.names)
        return {"object": "list", "data": _described(adapters)}


def _described(adapters: Sequence[AdapterInfo]) -> list[dict[str, Any]]:
    return [
        {
            "name": info.name,
            "format": info.format,
            "rank": info.rank,
            "targets": list(info.targets),
            "bytes": info.bytes,
        }
        for info in adapters
    ]
