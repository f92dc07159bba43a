"""Peer servers from Debian packages: find the binary, installing the package when allowed."""

from __future__ import annotations

import os
import shutil
import subprocess


def find_or_install(
    binary: str, package: str, unavailable: type[Exception], *, install: bool
) -> str:
    """Path of ``binary``; installs ``package`` first if allowed and root, else raises
    ``unavailable`` with the reason."""
    path = shutil.which(binary)
    if path is not None:
        return path
    if not install:
        raise unavailable(f"{binary} is not installed")
    if os.geteuid() != 0:
        raise unavailable(f"{binary} is not installed (apt-get install needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", package]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # a stale package list: refresh it once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    path = shutil.which(binary)
    if path is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise unavailable(f"apt-get install {package} failed: {tail[0]}")
    return path
