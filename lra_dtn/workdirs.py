"""Temporary work folders that a killed process can leave behind, and their clean-up.

A cache build or an archive extraction writes into a temporary folder beside its target and renames it
when complete, so a kill never leaves a half-written target; it can leave the temporary folder, as large
as the data. Such folders are named ``<prefix><host>-<pid>-<random>``: the next process on the same host
removes the ones whose process is gone, and leaves alone those of live processes or of other hosts
(a shared filesystem may hold both). Torch-free, so the download command can use it.
"""
from __future__ import annotations

import os
import socket
import shutil
import tempfile
from pathlib import Path


def make_work_folder(parent: Path, prefix: str) -> Path:
    """A fresh temporary folder in ``parent`` that :func:`remove_abandoned` can attribute to this process."""
    return Path(tempfile.mkdtemp(dir=parent, prefix=owned_prefix(prefix)))


def owned_prefix(prefix: str) -> str:
    """``prefix`` followed by this process's host and PID: what :func:`remove_abandoned` reads back."""
    return f"{prefix}{socket.gethostname()}-{os.getpid()}-"


def remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the folders in ``parent`` named by :func:`owned_prefix` whose process on this host is gone."""
    host_prefix = f"{prefix}{socket.gethostname()}-"
    for folder in Path(parent).glob(f"{host_prefix}*"):
        pid = folder.name.removeprefix(host_prefix).split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (someone else's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
