"""An S3 endpoint for tests: moto's server mode, in this process on a free loopback port (no MinIO binary
exists in PyPI, npm or Debian). Fixtures in tests/conftest.py: `s3_endpoint` (one server per session) and
`s3_media_url` (a fresh bucket per test, with the environment a subprocess needs to reach it).

Nothing here sets os.environ: in-process code gets an explicit client (`client(media.endpoint)`), subprocesses
the variables (`{**os.environ, **media.env}`), which `kleinserve.objects.s3_client` reads as boto3 does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGION = "us-east-1"
MEDIA_PREFIX = "kleinserve"  # a prefix inside the bucket, so that code adding it is exercised


class S3Media(NamedTuple):
    """A fresh bucket: `url` for --media-url (`s3://<bucket>/<prefix>`), `env` for a process to reach it."""

    url: str
    env: dict[str, str]

    @property
    def bucket(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.strip("/")

    @property
    def endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]


ACCESS_KEY = SECRET_KEY = "testing"  # moto takes any credentials


def environment(endpoint: str) -> dict[str, str]:
    """The variables boto3 (and so `kleinserve.objects.s3_client`) needs to reach `endpoint`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


@functools.cache
def client(endpoint: str, attempts: int = 3) -> S3Client:
    """An S3 client for `endpoint` (path-style addressing), one per endpoint: making one takes ~0.3 s, and
    boto3 clients are thread-safe."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": attempts}),
    )


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port), stopped on exit; yields its URL."""
    access_log = logging.getLogger("werkzeug")  # moto's server logs every request at INFO
    level = access_log.level
    access_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        access_log.setLevel(level)


def new_bucket(endpoint: str) -> S3Media:
    """A new, empty bucket on `endpoint` with its --media-url and environment."""
    bucket = f"test-{secrets.token_hex(6)}"
    client(endpoint).create_bucket(Bucket=bucket)
    return S3Media(f"s3://{bucket}/{MEDIA_PREFIX}", environment(endpoint))
