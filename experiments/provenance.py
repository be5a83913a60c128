"""What an experiment ran on: git commit, Python, platform and package versions."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "driftsched",
    "fastapi",
    "uvicorn",
    "httpx",
    "httptools",
    "uvloop",
    "pydantic",
    "river",
    "prometheus-client",
    "numpy",
    "scipy",
    "matplotlib",
    "tqdm",
)


def versions() -> dict[str, Any]:
    """Git commit and count of modified tracked files, Python, platform, CPUs, packages."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    pkgs = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pkgs[name] = metadata.version(name)
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_files": None if status is None else len(status.splitlines()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": pkgs,
    }
