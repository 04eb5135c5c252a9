"""A run's output directory: made and checked writable before anything is loaded, locked against a second run
writing into it at the same time, and refused to a new run when an earlier run's work is there.

The lock is an OS lock (`flock`) on `output_dir/.dpo-jax.lock`, which also holds the holder's pid and host so that
a refused run can name it. The OS drops the lock when its process dies, however it dies, so a lock file left by
a killed run is simply taken over (with a warning naming it). `flock` is reliable on local disks; over NFS the
Linux client maps it to NFS locks (unless mounted `nolock`); on gcsfuse and other FUSE mounts without lock
support it only excludes runs on the same machine.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".dpo-jax.lock"
_held: dict[Path, "Claim"] = {}  # directories this process holds: claiming one again adds a hold


class Claim:
    """This process's hold on an output_dir; `release` (or leaving a `with` block) gives one hold back.
    A claim of nothing (another process than 0 of a run) does nothing."""

    def __init__(self, directory: Path | None, fd: int | None = None, created: bool = False):
        self.directory, self.fd, self.created, self.holds = directory, fd, created, 1

    def release(self) -> None:
        if self.directory is None or self.holds == 0:
            return
        self.holds -= 1
        if self.holds:
            return
        del _held[self.directory]
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds it (a record left means a dead holder)
            lock = self.directory / LOCK_FILE
            if self.created and os.listdir(self.directory) == [LOCK_FILE]:
                lock.unlink()  # a run that wrote nothing leaves nothing: not even the directory it made
                self.directory.rmdir()
            os.close(self.fd)  # drops the OS lock
            self.fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *_) -> None:
        self.release()


def claim(directory: str | Path, *, enabled: bool = True) -> Claim:
    """Make `directory` (with its parents) and lock it for this process, or raise UserError: it is a file, it
    cannot be made or written, or a live run holds it (named by pid and host). With `enabled` false (processes
    other than 0 of a run, which share process 0's directory) nothing is done."""
    if not enabled:
        return Claim(None)
    path = Path(directory).absolute()
    key = Path(os.path.realpath(path))
    if key in _held:
        _held[key].holds += 1
        return _held[key]
    created = _make(path)
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # root ignores permissions, but not a read-only filesystem
        raise UserError(f"output_dir {path} is not writable ({e.strerror}): give a directory you can write "
                        f"to") from e
    if not _lock(fd, path):
        holder = _record(fd)
        os.close(fd)
        raise UserError(f"output_dir {path} is in use by another run ({_describe(holder)}): wait for it to end or "
                        f"stop it, or give another output_dir")
    previous = _record(fd)
    if previous:
        elsewhere = previous.get("host") != socket.gethostname()
        log.warning("output_dir %s: taking over the lock of %s, which ended without releasing it%s", path,
                    _describe(previous), " (on another machine: if it still runs there, this filesystem does not "
                    "lock across machines; stop one of the two)" if elsewhere else "")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n", 0)
    _held[key] = held = Claim(key, fd, created)
    return held


def earlier_run(directory: str | Path) -> str | None:
    """What an earlier run left in `directory` that a new run would overwrite: "checkpoints", "metrics.jsonl"
    (a run with save_strategy no), or None."""
    path = Path(directory)
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return "checkpoints"
    if (path / "metrics.jsonl").is_file() and (path / "metrics.jsonl").stat().st_size:
        return "metrics.jsonl"
    return None


def _make(path: Path) -> bool:
    """Make `path` a directory; whether it was made now."""
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"output_dir {path} is a file, not a directory: give a directory (a new one, or the "
                            f"run's own to continue it)")
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, or that this user may not enter or write
        raise UserError(f"output_dir {path} cannot be created ({e.strerror or e}): give a directory you can "
                        f"write to") from e
    return created


def _lock(fd: int, path: Path) -> bool:
    """Take the OS lock on `fd` without waiting; False when another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return False
        log.warning("output_dir %s: this filesystem has no file locks (%s); nothing stops a second run from "
                    "writing into it at the same time", path, e.strerror)
    return True


def _record(fd: int) -> dict:
    """The holder's record in the lock file ({} when empty or unreadable)."""
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _describe(record: dict) -> str:
    if not record:
        return "a process that has not written its pid yet"
    return f"pid {record.get('pid')} on host {record.get('host')}, since {record.get('since')}"
