"""Debian packages a cluster fixture needs, installed when missing (a fresh CI machine has none of them)."""

import os
import shutil
import subprocess

import pytest


def installed(reason_now, *packages: str) -> None:
    """Install the Debian packages a fixture needs when they are missing: a fresh CI machine has none of
    them. Skips with the reason where that cannot be done."""
    if reason_now() is None:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            capture_output=True,
            timeout=900,
            env=env,
        )
    reason = reason_now()
    if reason:
        pytest.skip(reason)
