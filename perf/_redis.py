"""Start and stop a real ``redis-server`` for the memory benchmark.

The server listens on a free loopback port with persistence off (``--save ""``,
``--appendonly no``), so its RSS is data, allocator and fragmentation only. When the binary is
missing and we run as root, the Debian package is installed with ``apt-get``; otherwise the
caller gets :class:`RedisUnavailable` and reports an error row.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from types import TracebackType

import redis

from perf._debian import find_or_install

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class RedisUnavailable(RuntimeError):
    """No redis-server binary, and it could not (or may not) be installed."""


def find_redis_server(*, install: bool = True) -> str:
    """Path of ``redis-server``; installs the Debian package first if allowed and root."""
    return find_or_install("redis-server", "redis-server", RedisUnavailable, install=install)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status_bytes(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in /proc/{pid}/status")


class RedisServer:
    """A private redis-server process; use as a context manager."""

    def __init__(self, binary: str | None = None) -> None:
        self._binary = binary
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        return self._proc.pid

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=60.0)

    def start(self) -> None:
        binary = self._binary or find_redis_server()
        self._dir = tempfile.TemporaryDirectory(prefix="rpcfast-redis-")
        self.port = free_port()
        argv = [
            binary,
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
            "--logfile",
            "",
            "--loglevel",
            "warning",
        ]
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RedisUnavailable(f"redis-server exited with {self._proc.returncode}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RedisUnavailable("redis-server did not answer PING in time")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    def rss_bytes(self) -> int:
        return proc_status_bytes(self.pid, "VmRSS")

    def peak_rss_bytes(self) -> int:
        return proc_status_bytes(self.pid, "VmHWM")

    def stop(self) -> None:
        proc = self._proc
        self._proc = None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
