"""One run per run folder: ``kdgraph train`` holds ``OUT/.kdgraph.lock`` while it runs.

The lock is an ``fcntl.flock`` on that file, which holds the owner's PID, host and start time. The
kernel drops the lock when its process ends, however it ends (SIGKILL included), so a lock file left
by a dead process is simply taken over; a live owner makes a second run fail with a
:class:`~kdgraph.errors.TrainingError` naming it. (flock is per host: on a network file system two
hosts may not see each other's locks; give each run its own ``--out`` there.)
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import TrainingError

LOCK_NAME = ".kdgraph.lock"


def make_folder(folder: Path, what: str = "run folder") -> None:
    """``mkdir -p`` with a :class:`TrainingError` naming the path and the OS's reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            reason += " (a file is in the way: the path or one of its parents is a regular file)"
        raise TrainingError(f"--out {str(folder)!r}: cannot create the {what}: {reason}. Nothing was written; "
                            f"choose a writable folder with --out.") from None


class RunLock:
    """An exclusive lock on a run folder (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        make_folder(self.folder)
        for _ in range(10):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy() from None
            try:  # the owner we raced with may have removed the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - ten lost races in a row
            raise self._busy()
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainingError(f"--out {str(self.folder)!r}: cannot create the lock file {self.path.name}: "
                                f"{e.strerror or type(e).__name__}. Choose a writable folder with --out.") from None

    def _busy(self) -> TrainingError:
        o = self.owner()
        who = (f"PID {o.get('pid', '?')} on host {o.get('host', '?')}, started {o.get('started', '?')}" if o
               else "a process that has not written its details yet")
        return TrainingError(f"{self.folder} is in use by another kdgraph train ({who}); two runs in one folder "
                             f"would overwrite each other's checkpoints. Wait for it to finish, stop it, or pass "
                             f"another --out.")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: the next run starts with a fresh file
        except OSError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None
