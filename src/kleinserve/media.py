"""Images in and out of the API: decoding uploads safely, fetching reference URLs, signed result URLs.

Inputs: every reference image, whatever the dialect, goes through `decode_image`, which reads the header
first and refuses anything over MAX_INPUT_PIXELS before a pixel is decoded (decompression bombs included),
then decodes fully so that truncated files fail here with a clear message. Only PNG, JPEG, WebP and GIF are
opened: Pillow's other formats are attack surface no client needs (EPS, for one, runs Ghostscript).
Animated images give their first frame; palette, CMYK, 16-bit and alpha images are converted by the engine
(`references.to_rgb`). A job's decoded references wait in `<data dir>/inputs/` (`ReferenceStore`) until the
job ends.

Outputs returned as URLs are written under `<data dir>/media/` and served at
`/media/<name>?expires=<unix seconds>&signature=<hex HMAC-SHA256(secret, "<name>:<expires>")>`; the secret is
created on first start and kept in the data dir, so links survive a restart and nobody can forge one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import ipaddress
import os
import secrets
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from kleinserve.errors import Forbidden, InvalidInput, KleinError, NotFound
from kleinserve.types import ImageFormat

MAX_INPUT_PIXELS = 4 * 1024 * 1024  # 4 megapixels per reference image
URL_TIMEOUT_S = 10.0  # for the whole download, not per read: a slow trickle cannot hold a request open
URL_MAX_BYTES = 20 * 1024 * 1024
MEDIA_TTL_S = 600
SECRET_BYTES = 32
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # Pillow format ids (JPEG includes multi-picture JPEG)


def decode_image(data: bytes, param: str) -> Image.Image:
    """Bytes of an image file -> a fully decoded PIL image (first frame); InvalidInput naming `param`."""
    if not data:
        raise InvalidInput(f"{param} is empty", param=param, allowed="a PNG, JPEG, WebP or GIF image")
    try:
        # Pillow itself refuses sizes over 2 * Image.MAX_IMAGE_PIXELS (~179 MP) in `open` and warns above
        # ~89 MP; either way the size check below refuses the image before a pixel is decoded. (No
        # warnings.catch_warnings here: it swaps process-global state, and decoding runs on worker threads.)
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise InvalidInput(
                f"{param} is {width}x{height} pixels", param=param, allowed="at most 4 megapixels"
            )
        image.seek(0)
        image.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning where it is an error
        raise InvalidInput(
            f"{param} is a decompression bomb", param=param, allowed="at most 4 megapixels"
        ) from None
    except UnidentifiedImageError:
        raise InvalidInput(
            f"{param} is not a decodable image", param=param, allowed="a PNG, JPEG, WebP or GIF image"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"{param} is damaged or truncated ({exc})", param=param) from None
    return image.copy() if getattr(image, "is_animated", False) else image


def decode_base64(text: str, param: str) -> bytes:
    """Raw base64 or a `data:<type>;base64,<data>` URL -> bytes."""
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"{param} is not valid base64", param=param, allowed="a URL or base64 image"
        ) from None


class ImageFetcher:
    """Turns the strings clients send for images (http(s) URL, data URL or bare base64) into PIL images.

    URLs are fetched with a timeout and a size cap; hosts resolving to loopback, private, link-local or
    otherwise non-public addresses are refused unless `allow_private` (SSRF protection).
    """

    def __init__(self, client: httpx.AsyncClient, allow_private: bool = False) -> None:
        self.client = client
        self.allow_private = allow_private

    async def image(self, text: str, param: str) -> Image.Image:
        text = text.strip()
        if text[:8].lower().startswith(("http://", "https://")):
            data = await self.download(text, param)
        elif "://" in text:
            raise InvalidInput(
                f"{param} has an unsupported URL scheme", param=param, allowed="http(s) or data URLs"
            )
        else:
            data = decode_base64(text, param)
        return await asyncio.to_thread(decode_image, data, param)  # decoding takes a while: not on the loop

    async def download(self, url: str, param: str) -> bytes:
        # Resolving blocks: on a worker thread, never on the event loop.
        await asyncio.to_thread(check_public_url, url, param, self.allow_private)
        timeout = URL_TIMEOUT_S
        try:
            async with asyncio.timeout(timeout):
                return await self._get(url, param)
        except TimeoutError:
            raise InvalidInput(f"{param}: {url} took longer than {timeout:g} s", param=param) from None
        except httpx.HTTPError as exc:
            raise InvalidInput(f"{param}: cannot fetch {url} ({type(exc).__name__})", param=param) from None

    async def _get(self, url: str, param: str) -> bytes:
        limit = URL_MAX_BYTES
        async with self.client.stream("GET", url, timeout=URL_TIMEOUT_S, follow_redirects=False) as response:
            if response.status_code != 200:
                raise InvalidInput(f"{param}: {url} answered HTTP {response.status_code}", param=param)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise InvalidInput(f"{param}: {url} is larger than {limit} bytes", param=param)
            chunks = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise InvalidInput(f"{param}: {url} is larger than {limit} bytes", param=param)
                chunks.append(chunk)
            return b"".join(chunks)


def check_public_url(url: str, param: str, allow_private: bool) -> None:
    """Refuse URLs whose host resolves to a non-public address (unless allowed)."""
    host = urlsplit(url).hostname
    if not host:
        raise InvalidInput(f"{param}: {url} has no host", param=param)
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise InvalidInput(f"{param}: cannot resolve {host}", param=param) from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            raise InvalidInput(
                f"{param}: {host} resolves to a private or loopback address ({ip})",
                param=param,
                allowed="public http(s) URLs (start the server with --allow-private-urls to allow others)",
            )


class MediaStore:
    """Result images on disk, served through expiring HMAC-signed URLs."""

    def __init__(self, directory: Path, secret: bytes, ttl_s: int = MEDIA_TTL_S) -> None:
        self.directory = directory
        self.secret = secret
        self.ttl_s = ttl_s
        directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def in_data_dir(cls, data_dir: Path, ttl_s: int = MEDIA_TTL_S) -> MediaStore:
        return cls(data_dir / "media", load_or_create_secret(data_dir / "secret.key"), ttl_s)

    def save(self, data: bytes, fmt: ImageFormat) -> str:
        """Store bytes; returns the file name (random, unguessable)."""
        name = f"{secrets.token_urlsafe(18)}.{fmt.value}"
        (self.directory / name).write_bytes(data)
        return name

    def signed_path(self, name: str, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self.ttl_s)
        return f"/media/{name}?expires={expires}&signature={self._sign(name, expires)}"

    def open(self, name: str, expires: int, signature: str, now: float | None = None) -> Path:
        """The file for a signed link; Forbidden when expired or tampered with, NotFound when gone."""
        if not hmac.compare_digest(self._sign(name, expires), signature):
            raise Forbidden("the media link's signature is not valid")
        if expires < (now if now is not None else time.time()):
            raise Forbidden("the media link has expired")
        path = self.directory / name
        if "/" in name or not path.is_file():
            raise NotFound("no such media file")
        return path

    def remove_expired(self, now: float | None = None) -> int:
        """Delete files older than the link lifetime (no link to them is still valid); returns the count."""
        cutoff = (now if now is not None else time.time()) - self.ttl_s
        removed = 0
        for path in self.directory.iterdir():
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _sign(self, name: str, expires: int) -> str:
        return hmac.new(self.secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()


class ReferenceStore:
    """A job's reference images as PNG files (`{job id}-{index}.png`) from submit until the job ends, so that
    a queued job, or one a crash interrupted, can run after a restart. Stored as given: pass RGB images and
    PNG keeps them exactly."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str, index: int) -> Path:
        return self.directory / f"{job_id}-{index}.png"

    def save(self, job_id: str, images: Sequence[Image.Image]) -> None:
        for index, image in enumerate(images):
            image.save(self.path(job_id, index), format="PNG")

    def load(self, job_id: str, count: int) -> list[Image.Image]:
        loaded = []
        for index in range(count):
            with Image.open(self.path(job_id, index)) as image:
                loaded.append(image.copy())
        return loaded

    def remove(self, job_id: str, count: int) -> None:
        for index in range(count):
            self.path(job_id, index).unlink(missing_ok=True)


def load_or_create_secret(path: Path) -> bytes:
    """The server's signing secret: 32 random bytes created on first start, readable by the owner only.

    Written to a private temporary file and linked into place, so that the file never exists half-written
    (an empty secret would make every link forgeable) and two servers starting at once agree on one secret.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(SECRET_BYTES))
            with contextlib.suppress(FileExistsError):  # another server was first: use its secret
                os.link(draft, path)
        finally:
            draft.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) < SECRET_BYTES:
        raise KleinError(f"{path} holds {len(secret)} bytes, not a {SECRET_BYTES}-byte secret: delete it")
    return secret
