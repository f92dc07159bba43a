"""A real ZooKeeper server (Debian's ``zookeeper`` package; ``make deps`` installs it).

One standalone server per test session, on a free loopback port with a temporary data directory.
Tests that use it get its ``host:port`` and a fresh root path of their own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"  # its manifest names the other jars
START_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    """ZooKeeper's ``ruok`` four-letter command: ``imok`` once it serves."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"ruok")
            return s.recv(16) == b"imok"
    except OSError:
        return False


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``127.0.0.1:<port>`` of a ZooKeeper server running for the whole session."""
    java = shutil.which("java")
    if java is None or not os.path.exists(ZOOKEEPER_JAR):
        pytest.skip("ZooKeeper is not installed (run `make deps`)")
    home = tmp_path_factory.mktemp("zookeeper")
    port = _free_port()
    config = home / "zoo.cfg"
    config.write_text(
        "\n".join(
            [
                "tickTime=500",
                f"dataDir={home / 'data'}",
                f"clientPort={port}",
                "clientPortAddress=127.0.0.1",
                "admin.enableServer=false",
                "minSessionTimeout=1000",
                "maxSessionTimeout=30000",
                "4lw.commands.whitelist=ruok",
                "",
            ]
        )
    )
    with open(home / "zookeeper.log", "wb") as out:
        proc = subprocess.Popen(
            [
                java,
                "-Xmx128m",
                "-XX:+UseSerialGC",
                "-Dzookeeper.admin.enableServer=false",
                "-cp",
                ZOOKEEPER_JAR,
                "org.apache.zookeeper.server.ZooKeeperServerMain",
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(port):
            if proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited ({proc.returncode}); see {home}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ZooKeeper did not answer within {START_TIMEOUT} s")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def zk_root() -> str:
    """A root path no other test uses."""
    return f"/rpcfast-test/{uuid.uuid4().hex}"
