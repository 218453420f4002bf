"""A local stand-in for the Hugging Face Hub and raw.githubusercontent.com, for ``kebench data fetch`` tests.

It answers what ``huggingface_hub`` asks (reference/field-anchors-2026-12.md §4.2):
``HEAD``/``GET /datasets/{repo}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag`` and
``Content-Length``, ``GET`` with ``Range: bytes=N-`` (206), and 404 + ``X-Error-Code: EntryNotFound`` for
anything else; raw GitHub paths ``/{owner}/{repo}/{commit}/{path}`` the same way without the Hub headers.
Faults are switched per path: altered bytes, a connection dropped halfway through the body (once, or
then failing every retry with a 500).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_HUB = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class FakeHub:
    """``files``: URL path (unquoted, as the manifest's ``url("")`` gives it) -> bytes."""

    files: dict[str, bytes]
    altered: set[str] = field(default_factory=set)
    drop_once: set[str] = field(default_factory=set)
    drop_then_fail: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._dropped: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self, path: str) -> list[str]:
        """The Range headers of the GETs of ``path`` so far ("" for none)."""
        return [range_ for method, seen, range_ in self.requests if method == "GET" and seen == path]

    def _content(self, path: str) -> bytes:
        data = self.files[path]
        if path in self.altered:
            data = bytes([data[0] ^ 0x01]) + data[1:]  # same size: only the hash can tell
        return data

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        range_header = handler.headers.get("Range", "")
        self.requests.append((handler.command, path, range_header))
        if path not in self.files:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = self._content(path)
        hub = _HUB.match(path)
        if body and path in self.drop_then_fail and path in self._dropped:
            handler.send_response(500)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start = 0
        match = _RANGE.match(range_header) if body else None
        if match:
            start = min(int(match.group(1)), len(data))
        handler.send_response(206 if match else 200)
        if hub:
            handler.send_header("X-Repo-Commit", hub.group("revision"))
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Accept-Ranges", "bytes")
        if match:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if not body:
            return
        if path in (self.drop_once | self.drop_then_fail) and path not in self._dropped and not match:
            self._dropped.add(path)
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)  # the connection drops halfway through the body
            handler.close_connection = True
            return
        handler.wfile.write(data[start:])
