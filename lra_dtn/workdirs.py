"""Files and folders written under a temporary name and renamed into place, and the clean-up of the
temporary folders a killed process can leave behind.

A file written through :func:`atomic_file` is seen whole or not at all (results, tables, checkpoints,
download records).

A cache build or an archive extraction writes into a temporary folder beside its target and renames it
when complete, so a kill never leaves a half-written target; it can leave the temporary folder, as large
as the data. Such folders are named ``<prefix><host>-<pid>-<random>``: the next process on the same host
removes the ones whose process is gone, and leaves alone those of live processes or of other hosts
(a shared filesystem may hold both). Torch-free, so the download command can use it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


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


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends, removed
    if it raises. So readers see the old file or the new one, never a part. The file gets the
    permissions a plain ``open`` would give (``mkstemp`` makes it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`), synced to disk."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
