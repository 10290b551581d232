"""The object-store seam: where media (results, a job's reference images) lives, as named byte strings.

    objects = open_objects(media_url, data_dir)  # None: LocalObjects(data_dir); "s3://bucket/prefix": S3
    objects.put("media/x.png", data)
    objects.get("media/x.png")                   # NotFound when there is no such object
    objects.delete_older_than("media/", time.time() - 600)

Keys are '/'-separated relative names ("media/<name>", "inputs/<job id>-<index>.png"). Each segment is made of
[A-Za-z0-9._-] and does not start with '.' (so '..', '.', hidden files and LocalObjects' drafts are no keys);
no leading, trailing or double '/'. Anything else is refused with InvalidInput(param="key") before any I/O.

LocalObjects keeps today's layout under the data dir (`<data dir>/media/<name>`, `<data dir>/inputs/...`),
private (0700 directories, 0600 files), each object written to a draft and renamed into place, so a reader
never sees half an object. S3Objects talks to any S3-compatible endpoint with boto3 (an optional extra:
`pip install 'kleinserve[scale]'`), configured the standard way from the environment: AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or AWS_DEFAULT_REGION. Its failures
are StoreUnavailable (503: the request may be sent again), a missing key NotFound.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import re
import secrets
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from kleinserve.errors import InvalidInput, NotFound, StoreUnavailable
from kleinserve.files import open_private, private_dir

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
_KEY = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_PREFIX = re.compile(rf"(?:{_SEGMENT}/)*(?:{_SEGMENT})?")  # a key, a key with a trailing '/', or ""
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules, in short
S3_TIMEOUT_S = 10.0  # to connect, and for each read
S3_ATTEMPTS = 3  # per call, the first included (botocore's "standard" retry mode: backoff with jitter)
S3_DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes


class ObjectStore(Protocol):
    """Named byte strings. Every method is blocking: call it on a worker thread, never on the event loop."""

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any object there; readers see the old or the new bytes."""

    def get(self, key: str) -> bytes:
        """The bytes under `key`; NotFound when there are none."""

    def delete(self, key: str) -> None:
        """Remove the object under `key`; a missing one is fine."""

    def delete_older_than(self, prefix: str, cutoff: float) -> int:
        """Remove the objects in the folder `prefix` ("media/": never "", which in LocalObjects would be the
        whole data dir, database included) last written before `cutoff` (Unix s); returns how many."""

    def keys(self, prefix: str) -> list[str]:
        """The keys starting with `prefix` (a string prefix: "media/" or "inputs/job-"), sorted."""

    def presigned_url(self, key: str, ttl_s: int) -> str | None:
        """A URL anyone may GET the object from for `ttl_s` seconds; None for a store without them (local)."""

    def local_path(self, key: str) -> Path | None:
        """The file holding the object in a local store (NotFound when there is none); None if remote."""


def check_key(key: str) -> str:
    """`key` if it is a valid object key (module docstring); InvalidInput otherwise."""
    if not _KEY.fullmatch(key):
        raise InvalidInput(
            f"{key!r} is not a valid object key", param="key", allowed="names like media/x.png"
        )
    return key


def _check_prefix(prefix: str, folder: bool = False) -> str:
    """`prefix` if valid (and, with `folder`, a non-empty one ending in '/'); InvalidInput otherwise."""
    if not _PREFIX.fullmatch(prefix) or (folder and not prefix.endswith("/")):
        raise InvalidInput(f"{prefix!r} is not a valid key prefix", param="prefix", allowed="like media/")
    return prefix


class LocalObjects:
    """Objects as private files under `root` (the data dir): key "media/x.png" is `<root>/media/x.png`."""

    def __init__(self, root: Path) -> None:
        self.root = private_dir(root)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._make_parents(path)
        draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        try:
            with open_private(draft) as handle:
                handle.write(data)
            os.replace(draft, path)
        finally:
            draft.unlink(missing_ok=True)  # only still there when writing failed

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(NotADirectoryError):
            self._path(key).unlink(missing_ok=True)

    def delete_older_than(self, prefix: str, cutoff: float) -> int:
        removed = 0
        for path, key in self._walk(_check_prefix(prefix, folder=True), drafts=True):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another process
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += key is not None  # a draft a crash left behind goes too, uncounted
        return removed

    def keys(self, prefix: str) -> list[str]:
        return sorted(key for _, key in self._walk(prefix, drafts=False) if key is not None)

    def presigned_url(self, key: str, ttl_s: int) -> str | None:
        check_key(key)
        return None

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"no object {key}")
        return path

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _make_parents(self, path: Path) -> None:
        # Each folder between the root and the file private, not just the last (private_dir's parents
        # follow the umask).
        for folder in reversed(path.relative_to(self.root).parents[:-1]):
            private_dir(self.root / folder)

    def _walk(self, prefix: str, drafts: bool) -> Iterator[tuple[Path, str | None]]:
        """The files under `prefix` with their keys (None for a draft, listed only if `drafts`)."""
        folder = self.root / _check_prefix(prefix).rpartition("/")[0]
        if not folder.is_dir():
            return
        for dirpath, _, filenames in os.walk(folder):
            for filename in filenames:
                path = Path(dirpath, filename)
                key = path.relative_to(self.root).as_posix()
                if _KEY.fullmatch(key) and key.startswith(prefix):
                    yield path, key
                elif drafts and filename.startswith("."):
                    yield path, None


class S3Objects:
    """Objects in an S3 bucket under `prefix` (key "media/x.png" is `<prefix>/media/x.png`) through `client`,
    a boto3 S3 client (`s3_client()` builds one from the environment). Thread-safe, as boto3 clients are."""

    def __init__(self, bucket: str, prefix: str, client: S3Client) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = client

    def put(self, key: str, data: bytes) -> None:
        # The content type travels with the object, so a presigned link serves it right.
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        with self._errors(key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._name(key), Body=data, ContentType=content_type
            )

    def get(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"].read()

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def delete_older_than(self, prefix: str, cutoff: float) -> int:
        old = [
            key
            for key, written in self._list(_check_prefix(prefix, folder=True))
            if written.timestamp() < cutoff
        ]
        for start in range(0, len(old), S3_DELETE_BATCH):
            batch: list[ObjectIdentifierTypeDef] = [
                {"Key": self.prefix + key} for key in old[start : start + S3_DELETE_BATCH]
            ]
            with self._errors(prefix):
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            if failed := answer.get("Errors"):
                raise StoreUnavailable(f"the object store did not delete {len(failed)} objects")
        return len(old)

    def keys(self, prefix: str) -> list[str]:
        return sorted(key for key, _ in self._list(prefix))

    def presigned_url(self, key: str, ttl_s: int) -> str | None:
        with self._errors(key):  # signed locally: no request
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._name(key)}, ExpiresIn=ttl_s
            )

    def local_path(self, key: str) -> Path | None:
        check_key(key)
        return None

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _list(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """(key, last written) of the objects under `prefix` (keys outside the naming rules skipped)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + _check_prefix(prefix)
        )
        with self._errors(prefix):
            for page in pages:
                for entry in page.get("Contents", []):
                    key = entry["Key"].removeprefix(self.prefix)
                    if _KEY.fullmatch(key):
                        yield key, entry["LastModified"]

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """botocore's failures in kleinserve's words: a missing object NotFound, anything else 503."""
        from botocore.exceptions import BotoCoreError, ClientError  # boto3 is an optional extra

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no object {key}") from None
            reason = f"{error.get('Code', '?')}: {error.get('Message', '')}"
            raise StoreUnavailable(f"the object store refused {key} ({reason})") from exc
        except BotoCoreError as exc:  # endpoint unreachable, timed out, no credentials ...
            raise StoreUnavailable(f"the object store cannot be reached ({exc})") from exc


def s3_client(endpoint_url: str | None = None) -> S3Client:
    """A boto3 S3 client configured from the environment (module docstring), `endpoint_url` overriding
    AWS_ENDPOINT_URL(_S3). Path-style addressing, so that a local endpoint (moto, MinIO) works without DNS."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise InvalidInput(
            "S3 media needs boto3", param="--media-url", allowed="after pip install 'kleinserve[scale]'"
        ) from None
    config = Config(
        s3={"addressing_style": "path"},
        connect_timeout=S3_TIMEOUT_S,
        read_timeout=S3_TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": S3_ATTEMPTS},
    )
    # botocore reads AWS_DEFAULT_REGION only; AWS_REGION is the name most other tools use.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def open_objects(media_url: str | None, data_dir: Path) -> ObjectStore:
    """The store `--media-url` names: None for the data dir (LocalObjects), `s3://bucket/prefix` for S3 (the
    client from the environment); anything else InvalidInput naming --media-url. No I/O for S3 here."""
    if media_url is None:
        return LocalObjects(data_dir)
    parts = urlsplit(media_url)
    prefix = parts.path.strip("/")
    if (
        parts.scheme != "s3"
        or not _BUCKET.fullmatch(parts.netloc)
        or parts.query
        or parts.fragment
        or (prefix and not _KEY.fullmatch(prefix))
    ):
        raise InvalidInput(
            f"--media-url {media_url!r} is not an S3 location",
            param="--media-url",
            allowed="s3://bucket/prefix (bucket: 3-63 of a-z 0-9 . -), or none for the data dir",
        )
    return S3Objects(parts.netloc, prefix, s3_client())
