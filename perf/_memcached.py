"""Start and stop a real ``memcached`` for the key-value benchmark.

The server listens on a free loopback TCP port (UDP off). Clients are pymemcache clients with
``noreply`` off, so a ``set`` returns only after the server's ``STORED``: a round trip, the
thing being measured. When the binary is missing and we run as root, the Debian package is
installed with ``apt-get``; otherwise the caller gets :class:`MemcachedUnavailable`.
"""

from __future__ import annotations

import os
import subprocess
import time
from types import TracebackType

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError

from perf._debian import find_or_install
from perf._redis import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 256


class MemcachedUnavailable(RuntimeError):
    """No memcached binary, and it could not (or may not) be installed."""


def find_memcached(*, install: bool = True) -> str:
    """Path of ``memcached``; installs the Debian package first if allowed and root."""
    return find_or_install("memcached", "memcached", MemcachedUnavailable, install=install)


class MemcachedServer:
    """A private memcached process; use as a context manager."""

    def __init__(
        self, binary: str | None = None, memory_mb: int = DEFAULT_MEMORY_MB, threads: int = 4
    ) -> None:
        self._binary = binary
        self.memory_mb = memory_mb
        self.threads = threads
        self.port = 0
        self.argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("memcached is not running")
        return self._proc.pid

    def client(self, timeout: float = 60.0) -> Client:
        """A client that waits for every reply (``default_noreply=False``), Nagle off."""
        return Client(
            ("127.0.0.1", self.port),
            connect_timeout=timeout,
            timeout=timeout,
            no_delay=True,
            default_noreply=False,
        )

    def start(self) -> None:
        binary = self._binary or find_memcached()
        self.port = free_port()
        self.argv = [
            binary,
            "-l",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "0",
            "-m",
            str(self.memory_mb),
            "-t",
            str(self.threads),
        ]
        if os.geteuid() == 0:  # memcached refuses to run as root unless told which user
            self.argv += ["-u", "root"]
        self._proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self._proc.poll() is not None:
                    raise MemcachedUnavailable(f"memcached exited with {self._proc.returncode}")
                client = self.client(timeout=1.0)
                try:
                    client.version()
                    return
                except (OSError, MemcacheError):
                    pass
                finally:
                    client.close()
                if time.monotonic() > deadline:
                    raise MemcachedUnavailable("memcached did not answer 'version' in time")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

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

    def __enter__(self) -> MemcachedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
