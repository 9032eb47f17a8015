"""An exclusive lock file that keeps two processes from owning one state directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from computeplane.domain.errors import ConflictError


class PidLock:
    """Holds an exclusive ``flock`` on ``path`` for the life of the process.

    The file contains the holder's process id, so the error for a second process can name
    the first. The kernel drops the lock when the holder exits, even after ``kill -9``.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock; raise ConflictError naming the holder if another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise ConflictError(
                f"{self.what} is in use by another computeplane process (pid {holder}); "
                "stop it first, or give this one its own --data-dir.",
                code="state_dir_locked",
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
