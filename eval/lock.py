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

Two takers at once: a lock is never seen half-written, because it is written to a file of its own and then
hard-linked into place (`os.link` fails if a lock is there: taken), and every later rewrite is an
`os.replace`. So an unreadable lock is not one being written by this module: it is a leftover (a crash of an
older version, which created the file empty and then wrote it, or a damaged file). One younger than
UNREADABLE_STALE_S is treated as held (an older version may be between its two steps); an older one is
stale. A stale lock is taken over under an exclusive `flock` of the folder (takers of one folder decide one
at a time) by renaming it aside and checking that the renamed file is the one judged stale (same inode,
same bytes); if it is gone another taker got there first, and the taker tries again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path

from dreambooth_singlora.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
UNREADABLE_STALE_S = 30.0  # an unreadable lock younger than this is held (see the module docstring)
ATTEMPTS = 10  # create, or take over a stale lock and create again: each failure means another taker won a step


def alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def parse_pids(data: bytes) -> list[int] | None:
    """The pids a lock file's bytes name, or None if they are not a lock (empty, half-written, damaged)."""
    try:
        pids = json.loads(data.decode("utf-8"))["pids"]
        return [int(p) for p in pids]
    except (ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _takeover_guard(folder: Path):
    """An exclusive flock of `folder` itself for the block: takers of one folder decide one at a time. Where the
    file system refuses a flock on a folder (some network file systems) the block runs unguarded, and the
    rename-and-check of `FolderLock._take_over` is what keeps two takers apart."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            logger.debug("no flock on %s (%s): taking over without it", folder, e)
        yield
    finally:
        os.close(fd)  # releases the flock


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
        self._take()
        FolderLock._held[key] = [self, 1]
        return self

    def __exit__(self, *exc) -> None:
        key = self.folder.resolve()
        entry = FolderLock._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del FolderLock._held[key]
            entry[0].path.unlink(missing_ok=True)

    def _take(self) -> None:
        """Write the lock file naming this process, taking over a stale one; UserError if it is held."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pids = [os.getpid()]
        for _ in range(ATTEMPTS):
            if self._create():
                return
            self._take_over()  # UserError if held; returns once the stale lock is gone (by this taker or another)
        raise UserError(f"could not take the lock {self.path}: other processes keep taking it; rerun")

    def _tmp(self, kind: str) -> Path:
        return self.path.with_name(f"{LOCK_NAME}.{kind}-{os.getpid()}-{threading.get_ident()}")

    def _create(self) -> bool:
        """Put a complete lock file naming self.pids in place unless one is there (then False)."""
        tmp = self._tmp("new")
        try:
            tmp.write_text(json.dumps({"pids": self.pids}), encoding="utf-8")
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self) -> None:
        """Remove the lock in place if it is stale (UserError if it is held); returns at once if it is gone."""
        with _takeover_guard(self.folder):
            try:
                with open(self.path, "rb") as f:
                    seen, data = os.fstat(f.fileno()), f.read()
            except FileNotFoundError:
                return  # released, or taken over by another taker: try to create again
            except OSError as e:
                raise UserError(f"{self.folder} is held by a lock file this process cannot read ({self.path}: "
                                f"{e.strerror}); delete it only if no driver runs on this folder") from None
            holders = parse_pids(data)
            if holders is None:
                age = time.time() - seen.st_mtime
                if age < UNREADABLE_STALE_S:
                    raise UserError(f"{self.folder} is held: its lock file {self.path} is unreadable and "
                                    f"{age:.0f} s old (another driver may be writing it); rerun in a minute, or "
                                    "delete the file if no driver runs on this folder")
            else:
                live = [p for p in holders if alive(p)]
                if live:
                    raise UserError(f"{self.folder} is in use by process {live[0]} (lock file {self.path}): wait "
                                    "for it to end or stop it; delete the lock file only if that process is not yours")
            aside = self._tmp("stale")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return  # another taker removed it first
            moved = os.stat(aside)
            same = (moved.st_dev, moved.st_ino) == (seen.st_dev, seen.st_ino) and aside.read_bytes() == data
            if not same:  # replaced since it was judged (only a taker without the flock can): put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:  # a third taker's lock is in place: the holder of the one moved aside lost it
                    logger.warning("the lock %s changed while it was taken over; a driver may have lost it",
                                   self.path)
                aside.unlink(missing_ok=True)
                return  # decide again on what is in place now
            aside.unlink()
            logger.warning("taking over the stale lock %s (%s)", self.path,
                           "unreadable" if holders is None else
                           f"its processes {', '.join(map(str, holders)) or 'none'} have ended")

    def _write(self) -> None:
        tmp = self._tmp("tmp")
        tmp.write_text(json.dumps({"pids": self.pids}), encoding="utf-8")
        os.replace(tmp, self.path)

    @classmethod
    def add_pid(cls, pid: int) -> None:
        """Record a child process in every lock this process holds (the folder stays held while it lives)."""
        for lock, _ in cls._held.values():
            lock.pids.append(pid)
            lock._write()
