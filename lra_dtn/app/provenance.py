"""What a run's JSON records about the code and software that produced it."""
from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "datasets", "einops", "reformer-pytorch", "lra-dtn"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[pkg] = importlib.metadata.version(pkg)
    return found


def git_commit() -> str | None:
    """The commit of the code that ran (with ``+dirty`` for uncommitted changes), if in a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")
