"""A folder held by one live process: the lock file `<folder>/.lock` with the holder's pids.

    with FolderLock(out):                # UserError if a live process of another driver holds `out`
        proc = subprocess.Popen(...)
        FolderLock.add_pid(proc.pid)     # every lock this process holds now names the trainer too

The lock records the process that took it and the children it starts (JSON: {"pids": [...]}), so a folder
stays held while any of them lives, even after the driver itself was killed and its trainer writes on.
A lock whose pids are all gone is stale: the next driver takes it over (with a log line). The same process
taking a folder it already holds just holds it (nested `with` blocks); the file is removed when the
outermost block ends. Liveness is `kill(pid, 0)` on this machine: a lock written on another host (a shared
file system) is not checked, and an unrelated process that reused a dead holder's pid keeps the folder
held until it ends (the error names the pid, so a person can check it and delete the file).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dreambooth_singlora.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class FolderLock:
    """Hold `folder` for this process (see the module docstring)."""

    _held: dict = {}  # resolved folder -> [lock, depth]: the locks this process holds

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.pids: list[int] = []

    def __enter__(self) -> "FolderLock":
        key = self.folder.resolve()
        if key in FolderLock._held:
            FolderLock._held[key][1] += 1
            return FolderLock._held[key][0]
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a race with another taker: read again and decide again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holders = self._holders()
                live = [p for p in holders if alive(p)]
                if live:
                    raise UserError(f"{self.folder} is in use by process {live[0]} (lock file {self.path}): wait for "
                                    "it to end or stop it; delete the lock file only if that process is not yours")
                logger.warning("taking over the stale lock %s (its processes %s have ended)", self.path,
                               ", ".join(map(str, holders)) or "unknown")
                self.path.unlink(missing_ok=True)
                continue
            os.close(fd)
            self.pids = [os.getpid()]
            self._write()
            FolderLock._held[key] = [self, 1]
            return self
        raise UserError(f"could not take the lock {self.path}: other processes keep taking it")

    def __exit__(self, *exc) -> None:
        key = self.folder.resolve()
        entry = FolderLock._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del FolderLock._held[key]
            entry[0].path.unlink(missing_ok=True)

    def _holders(self) -> list[int]:
        try:
            return [int(p) for p in json.loads(self.path.read_text(encoding="utf-8"))["pids"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # unreadable or half-written: no live holder named

    def _write(self) -> None:
        tmp = self.path.with_name(f"{LOCK_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"pids": self.pids}), encoding="utf-8")
        os.replace(tmp, self.path)

    @classmethod
    def add_pid(cls, pid: int) -> None:
        """Record a child process in every lock this process holds (the folder stays held while it lives)."""
        for lock, _ in cls._held.values():
            lock.pids.append(pid)
            lock._write()
