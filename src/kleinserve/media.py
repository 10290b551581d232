"""Images in and out of the API: decoding uploads safely, fetching reference URLs, signed result URLs.

Inputs: every reference image, whatever the dialect, goes through `decode_image`, which reads the header
first and refuses anything over MAX_INPUT_PIXELS before a pixel is decoded (decompression bombs included),
then decodes fully so that truncated files fail here with a clear message. Only PNG, JPEG, WebP and GIF are
opened: Pillow's other formats are attack surface no client needs (EPS, for one, runs Ghostscript).
Animated images give their first frame; palette, CMYK, 16-bit and alpha images are converted by the engine
(`references.to_rgb`). A job's prepared references wait as objects `inputs/<job id>-<index>.png`
(`ReferenceStore`) until the job ends.

Outputs returned as URLs are stored as objects `media/<name>` (objects.py: `<data dir>/media/` by default, or
an S3 bucket) and served at
`/media/<name>?expires=<unix seconds>&signature=<hex HMAC-SHA256(secret, "<name>:<expires>")>`; the secret is
created on first start and kept in the data dir (or shared by every API process: `media_secret_from_env`),
so links survive a restart and nobody can forge one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pybase64
from PIL import Image, UnidentifiedImageError

from kleinserve.errors import Forbidden, InvalidInput, KleinError, NotFound
from kleinserve.objects import LocalObjects, ObjectStore
from kleinserve.outbound import OutboundClient, OutboundPolicy
from kleinserve.types import ImageFormat

MAX_INPUT_PIXELS = 4 * 1024 * 1024  # 4 megapixels per reference image
URL_TIMEOUT_S = 10.0  # for the whole download, not per read: a slow trickle cannot hold a request open
URL_MAX_BYTES = 20 * 1024 * 1024
URL_MAX_CHARS = 8192  # what common HTTP servers accept in a request line
URL_MAX_CONNECTIONS = 100  # reference downloads at once (others wait for a connection, within their timeout)
MEDIA_TTL_S = 600
SECRET_BYTES = 32
MEDIA_SECRET_ENV = "KLEINSERVE_MEDIA_SECRET"
MEDIA_PREFIX = "media/"  # object keys of result images
INPUTS_PREFIX = "inputs/"  # object keys of a job's prepared reference images
_MEDIA_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # one object key segment (objects.py)
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
    """Raw base64 or a `data:<type>;base64,<data>` URL -> bytes (surrounding whitespace allowed, none
    inside). Call it on a worker thread: pybase64 lets go of the GIL while it decodes, so the event loop runs
    on (the standard library held it, ~0.2 s for 45 MB)."""
    payload = text
    if text[:64].lstrip().startswith("data:"):
        comma = text.find(",")
        if comma < 0:
            raise InvalidInput(f"{param} is a data URL without data", param=param, allowed="a base64 image")
        payload = text[comma + 1 :]
    if payload[:1].isspace() or payload[-1:].isspace():  # copied only when there is something to strip
        payload = payload.strip()
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass  # pybase64 refuses padding past the end, which the standard library (the rule here) accepts
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"{param} is not valid base64", param=param, allowed="a URL or base64 image"
        ) from None


def decode_base64_image(text: str, param: str) -> Image.Image:
    """Raw base64 or a data URL -> a decoded image (decode_base64, then decode_image): call it on a thread."""
    return decode_image(decode_base64(text, param), param)


class ImageFetcher:
    """Turns the strings clients send for images (http(s) URL, data URL or bare base64) into PIL images.

    URLs are fetched through an `OutboundClient` of the fetcher's own (its own connection pool; only to
    addresses its policy allows, resolved once and pinned: see outbound.py) within URL_TIMEOUT_S for the whole
    download and up to URL_MAX_BYTES. Failures are InvalidInput naming the parameter: "the URL could not be
    fetched: ..." with a short reason.
    """

    def __init__(self, policy: OutboundPolicy) -> None:
        self.client = OutboundClient(policy, max_connections=URL_MAX_CONNECTIONS)

    async def image(self, text: str, param: str) -> Image.Image:
        # The scheme from the first characters: a large base64 text is not scanned (or copied) on the loop.
        head = text[:64].lstrip().lower()
        if head.startswith(("http://", "https://")):
            data = await self.download(text, param)
            return await asyncio.to_thread(decode_image, data, param)  # decoding takes a while: off the loop
        if "://" in head:
            raise InvalidInput(
                f"{param} has an unsupported URL scheme", param=param, allowed="http(s) or data URLs"
            )
        return await asyncio.to_thread(decode_base64_image, text, param)

    async def download(
        self, url: str, param: str, max_bytes: int | None = None, timeout_s: float | None = None
    ) -> bytes:
        """The body of `url` (HTTP 200 only, no redirects, at most `max_bytes`, within `timeout_s` for the
        whole download); InvalidInput naming `param` otherwise. None: a reference image's limits,
        URL_MAX_BYTES and URL_TIMEOUT_S (read at each call); LoRA adapters (api/loras.py) pass larger ones."""
        if len(url) > URL_MAX_CHARS:  # checked first: parsing a huge "URL" would hold the event loop
            raise InvalidInput(f"{param}: the URL is longer than {URL_MAX_CHARS} characters", param=param)
        url = url.strip()
        limit = URL_MAX_BYTES if max_bytes is None else max_bytes
        timeout = URL_TIMEOUT_S if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):  # resolving included
                return await self._get(url, param, limit, timeout)
        except TimeoutError:
            raise _unfetchable(param, f"it took longer than {timeout:g} s") from None
        except httpx.ConnectError:
            raise _unfetchable(param, "the connection failed") from None
        except httpx.HTTPError as exc:
            raise _unfetchable(param, type(exc).__name__) from None

    async def _get(self, url: str, param: str, limit: int, timeout_s: float) -> bytes:
        async with self.client.stream("GET", url, param, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise _unfetchable(param, f"the server answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _unfetchable(param, f"it is larger than {limit} bytes")
            chunks = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise _unfetchable(param, f"it is larger than {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)


def _unfetchable(param: str, reason: str) -> InvalidInput:
    return InvalidInput(f"{param}: the URL could not be fetched: {reason}", param=param)


@dataclass(frozen=True)
class MediaFile:
    """Where a valid signed link leads (MediaStore.open): exactly one of `path` (a local file, sent as is),
    `url` (a presigned URL to redirect to) and `data` (the object's bytes, sent by the API process)."""

    name: str
    path: Path | None = None
    url: str | None = None
    data: bytes | None = None

    @property
    def media_type(self) -> str:
        return mimetypes.guess_type(self.name)[0] or "application/octet-stream"


class MediaStore:
    """Result images (`media/<name>` in an ObjectStore), served through expiring HMAC-signed links.

    Any API process holding the same `secret` can serve the links of any other (scale-out: the secret is
    shared through the database or KLEINSERVE_MEDIA_SECRET). With `redirect`, a link to an object in a
    remote store answers 302 to a presigned URL valid for the link's remaining life (for a bucket endpoint
    clients can reach; a gone object is then the bucket's 404), instead of the API process sending the bytes.
    """

    def __init__(
        self, objects: ObjectStore, secret: bytes, ttl_s: int = MEDIA_TTL_S, *, redirect: bool = False
    ) -> None:
        self.objects = objects
        self.secret = secret
        self.ttl_s = ttl_s
        self.redirect = redirect

    @classmethod
    def in_data_dir(cls, data_dir: Path, ttl_s: int = MEDIA_TTL_S) -> MediaStore:
        """The one-box store: files in `<data dir>/media/`, signed with the data dir's secret.key."""
        return cls(LocalObjects(data_dir), load_or_create_secret(data_dir / "secret.key"), ttl_s)

    def save(self, data: bytes, fmt: ImageFormat, group: str = "") -> str:
        """Store bytes; returns the name: `group` (letters, digits, '-') then a random, unguessable part.
        Blocking: call it off the event loop."""
        name = f"{group}{secrets.token_urlsafe(18)}.{fmt.value}"
        self.objects.put(MEDIA_PREFIX + name, data)
        return name

    def remove_group(self, group: str) -> int:
        """Delete every image saved with `group` (a non-empty prefix of names); returns how many. Blocking."""
        keys = self.objects.keys(MEDIA_PREFIX + group)
        for key in keys:
            self.objects.delete(key)
        return len(keys)

    def read(self, name: str) -> bytes:
        """The stored bytes of `name`; NotFound when gone. Blocking."""
        return self.objects.get(self._key(name))

    def remove(self, name: str) -> None:
        """Delete a stored image (gone already is fine), as of a job that could not be committed. Blocking."""
        self.objects.delete(self._key(name))

    def signed_path(self, name: str, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self.ttl_s)
        return f"/media/{name}?expires={expires}&signature={self._sign(name, expires)}"

    def open(self, name: str, expires: int, signature: str, now: float | None = None) -> MediaFile:
        """What a signed link leads to; Forbidden when expired or tampered with, NotFound when gone.
        Blocking (a remote store is read or asked): call it off the event loop."""
        if not hmac.compare_digest(self._sign(name, expires), signature):
            raise Forbidden("the media link's signature is not valid")
        now = now if now is not None else time.time()
        if expires < now:
            raise Forbidden("the media link has expired")
        key = self._key(name)
        if self.redirect and (url := self.objects.presigned_url(key, max(1, int(expires - now)))):
            return MediaFile(name, url=url)
        if (path := self.objects.local_path(key)) is not None:
            return MediaFile(name, path=path)
        return MediaFile(name, data=self.objects.get(key))

    def expired(self, finished: float | None, now: float | None = None) -> bool:
        """Whether the images of a job that ended at `finished` (Unix s) are past their lifetime (deleted by
        remove_expired, or about to be): their links must not be handed out any more."""
        return finished is not None and (now if now is not None else time.time()) - finished > self.ttl_s

    def remove_expired(self, now: float | None = None) -> int:
        """Delete images older than the link lifetime (no link to them is still valid); returns the count."""
        cutoff = (now if now is not None else time.time()) - self.ttl_s
        return self.objects.delete_older_than(MEDIA_PREFIX, cutoff)

    def _key(self, name: str) -> str:
        # One segment only: a link can never reach outside media/ (the secret key, the database).
        if not _MEDIA_NAME.fullmatch(name):
            raise NotFound("no such media file")
        return MEDIA_PREFIX + name

    def _sign(self, name: str, expires: int) -> str:
        return hmac.new(self.secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()


class ReferenceStore:
    """A job's reference images as PNG objects (`inputs/{job id}-{index}.png`) from submit until the job ends,
    so that a queued job, or one a crash interrupted, can run after a restart (or on another worker). Stored
    as given: pass RGB images and PNG keeps them exactly.

    `objects` is an ObjectStore, or a directory of the store's own holding `{job id}-{index}.png` (the
    in-process worker's `inputs_dir`: the same files as `LocalObjects(data_dir)` under inputs/).
    """

    def __init__(self, objects: ObjectStore | Path) -> None:
        self.objects, self.prefix = (
            (LocalObjects(objects), "") if isinstance(objects, Path) else (objects, INPUTS_PREFIX)
        )

    def key(self, job_id: str, index: int) -> str:
        return f"{self.prefix}{job_id}-{index}.png"

    def save(self, job_id: str, images: Sequence[Image.Image]) -> None:
        for index, image in enumerate(images):
            encoded = io.BytesIO()
            image.save(encoded, format="PNG")
            self.objects.put(self.key(job_id, index), encoded.getvalue())

    def load(self, job_id: str, count: int) -> list[Image.Image]:
        loaded = []
        for index in range(count):
            with Image.open(io.BytesIO(self.objects.get(self.key(job_id, index)))) as image:
                loaded.append(image.copy())
        return loaded

    def remove(self, job_id: str, count: int) -> None:
        for index in range(count):
            self.objects.delete(self.key(job_id, index))


def media_secret_from_env(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The link signing secret of KLEINSERVE_MEDIA_SECRET (hex, at least SECRET_BYTES bytes), for API
    processes that share no data dir; None when unset. InvalidInput naming the variable when unusable."""
    text = (os.environ if environ is None else environ).get(MEDIA_SECRET_ENV, "").strip()
    if not text:
        return None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < SECRET_BYTES:
        raise InvalidInput(
            f"{MEDIA_SECRET_ENV} is not a usable secret",
            param=MEDIA_SECRET_ENV,
            allowed=f"at least {2 * SECRET_BYTES} hex digits ({SECRET_BYTES} bytes): `openssl rand -hex 32`",
        )
    return secret


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
