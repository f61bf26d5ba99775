"""One writer per output directory: `OUTPUT_DIR/.lock` names the process and host that write there.

The file is created with O_EXCL, so of two commands started at once exactly one gets it; the other
stops at once naming the holder. A lock whose process is gone (same host, pid not running) is
taken over with a warning; a lock held from another host cannot be checked from here and stops
the command, naming the file to delete once that host's run is known to be over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
from collections.abc import Iterator

log = logging.getLogger(__name__)

NAME = ".lock"


class DirectoryInUse(RuntimeError):
    """Another live process writes to this directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # half-written by a process killed between create and write: no live holder


def check(directory: pathlib.Path) -> dict | None:
    """Raise DirectoryInUse if another live process holds `directory`'s lock; returns the holder of
    a stale lock (a dead process's, to be taken over), None when there is none. Reads only."""
    path = pathlib.Path(directory) / NAME
    holder = _holder(path)
    if holder is None:
        return None
    pid, host = holder.get("pid"), holder.get("host")
    if holder and host != socket.gethostname():
        raise DirectoryInUse(f"{directory} is in use by {holder.get('command', '?')} (pid {pid} on host {host}): "
                             f"one writer per directory. If that run is over, delete {path}")
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
        raise DirectoryInUse(f"{directory} is in use by {holder.get('command', '?')} (pid {pid} on host {host}): "
                             "one writer per directory; wait for it or choose another output directory")
    return holder


def acquire(directory: pathlib.Path, command: str) -> pathlib.Path:
    """Take `directory`'s lock for this process (creating the directory); returns the lock file.
    Raises DirectoryInUse naming the holder when a live process has it."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            stale = check(directory)
            if stale is not None:
                log.warning("%s: taking over the lock of pid %s on %s, which is no longer running",
                            directory, stale.get("pid"), stale.get("host"))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise DirectoryInUse(f"{directory}: could not take {path} (another process keeps taking it)")


def release(path: pathlib.Path) -> None:
    """Remove our lock file (only if it is still ours)."""
    holder = _holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def hold(directory: pathlib.Path, command: str) -> Iterator[pathlib.Path]:
    """The lock of `directory` for the duration of the block. A directory this call created is
    removed again if the block fails before anything else was written into it."""
    directory = pathlib.Path(directory)
    created = not directory.exists()
    path = acquire(directory, command)
    try:
        yield path
    finally:
        release(path)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: a run that wrote something keeps it
