"""A real https file server on loopback for the tests of downloads by URL: its own CA (trustme), whose
certificate bundle a client trusts through SSL_CERT_FILE (outbound.py reads it), and a certificate for
`localhost`.

    with HttpsFiles({"/fox.safetensors": data}) as files:
        files.url("/fox.safetensors")   # "https://localhost:<port>/fox.safetensors"
        files.ca_path                    # the CA bundle to trust
        files.hits["/fox.safetensors"]   # GETs answered so far
"""

from __future__ import annotations

import http.server
import ssl
import tempfile
import threading
from collections import Counter
from pathlib import Path
from types import TracebackType

import trustme


class HttpsFiles:
    """Serves `files` (path -> bytes; anything else 404) over TLS on 127.0.0.1 until the block ends."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.hits: Counter[str] = Counter()
        authority = trustme.CA()
        self._folder = tempfile.TemporaryDirectory(prefix="https-files-")
        self.ca_path = Path(self._folder.name) / "ca.pem"
        authority.cert_pem.write_to_path(str(self.ca_path))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("localhost").configure_cert(context)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                body = outer.files.get(self.path)
                outer.hits[self.path] += 1
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet tests

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"https://localhost:{self._server.server_address[1]}{path}"

    def __enter__(self) -> HttpsFiles:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._folder.cleanup()
