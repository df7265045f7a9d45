"""Real storage servers on loopback for tests: a moto S3 server (server mode) and an HTTP file server.

Both are registered as pytest fixtures in tests/conftest.py:

``s3_server`` yields an :class:`S3Server`: ``endpoint`` (``http://127.0.0.1:PORT``), ``bucket`` (an empty,
freshly created bucket), ``storage`` (a ``Storage`` pointing s3fs at the endpoint),
``url(path)`` -> ``s3://bucket/path``, ``stop()`` / ``start()`` (same port, data kept).
Dummy credentials are set in the environment for the test session's process and its children.

``http_server`` yields an :class:`HttpServer` serving a temporary directory ``root`` (a Path):
``url(path)`` -> ``http://127.0.0.1:PORT/path``, ``stop()`` / ``start()`` (same port).
"""
from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from data_pipeline.storage import Storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start within {timeout}s")


class S3Server:
    """moto's S3 in server mode (real HTTP on loopback), as s3fs's own test-suite uses it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.start()
        self.bucket = f"test-{uuid.uuid4().hex[:8]}"
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=self.bucket)
        self.storage = Storage(s3_endpoint=self.endpoint, retries=8, backoff_s=0.2)

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def start(self) -> None:
        self._server.start()
        _wait_listening(self.port)

    def stop(self) -> None:
        # moto keeps its state in process memory: the bucket survives a stop/start.
        self._server.stop()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output readable
        pass


class HttpServer:
    """Python's threaded HTTP server over a directory (https-style shard URLs without TLS)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self._server: ThreadingHTTPServer | None = None
        self.start()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def start(self) -> None:
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        _wait_listening(self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
