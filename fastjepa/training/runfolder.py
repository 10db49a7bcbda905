"""A run folder belongs to one run: a lock held while the run trains, and no fresh run over
another run's checkpoints unless asked (``--resume`` continues it, ``--overwrite`` replaces it).

The lock is ``fcntl.flock`` on ``<output>/.fastjepa.lock``: the kernel drops it when the
process ends, however it ends (kill -9 included), so a lock file left by a dead run never
blocks the next one; the file's text (pid, host, start time) only feeds the message, and a
run deletes the file when it ends. Under
torchrun only rank 0 takes it (rank 0 writes every file of the run; the other ranks
agree with its answer, see :meth:`fastjepa.training.trainer.Trainer._claim_output`). flock is
advisory and local to one machine's kernel: on some network file systems two machines do
not see each other's locks.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the checkpoint check still holds
    fcntl = None

LOCK_NAME = ".fastjepa.lock"


class RunFolderError(ValueError):
    """The output folder cannot be used by this run (in use, holds another run, not writable)."""


class RunLock:
    """An exclusive flock on a folder's lock file, held until :meth:`release`; a lock that
    created its file (``path``) deletes it on release, so a finished run leaves no trace."""

    def __init__(self, fd: int | None, path: Path | None = None):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            if self.path is not None:
                try:  # unlinked while held: a process waiting on this file sees it replaced and retries
                    self.path.unlink()
                except OSError:
                    pass
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __del__(self):
        self.release()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().split()
    except OSError:
        return "another process"
    if len(text) >= 3:
        return f"pid {text[0]} on {text[1]}, started {text[2]}"
    return "another process"


def _lock(folder: Path, *, create: bool) -> RunLock:
    path = folder / LOCK_NAME
    for _ in range(100):  # the file can be deleted by a run ending between our open and our flock: open it again
        if fcntl is None or (not create and not path.exists()):
            return RunLock(None)
        try:
            fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o644)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise RunFolderError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(
                f"output folder {folder} is in use by another run ({_holder(path)}): wait for it to end, or choose another --output"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # we locked a file its last holder had already deleted
            os.close(fd)
            continue
        if not create:
            return RunLock(fd)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode())
        return RunLock(fd, path)
    raise RunFolderError(f"output folder {folder}: could not take its lock {path} (it keeps being replaced)")


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints runs left in ``folder`` (any write tag), by name."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.pth.tar") if not p.name.startswith(".")), key=lambda p: p.name)


def claim(folder: str | os.PathLike, tag: str, *, resume: bool, overwrite: bool, hold: bool, say: Callable[[str], None] = print) -> RunLock:
    """Check that this run may use ``folder``; with ``hold``, create it, take its lock and
    return it (release it when the run ends). Without ``hold`` (the early check, before
    the model is built) a missing folder is not created, and the lock of an existing one is
    taken and released at once. A fresh run (not ``resume``) into a folder
    with checkpoints is refused unless ``overwrite``; then, holding the lock, the
    checkpoints of ``tag`` are deleted so that none of the old run's remain beside the new
    run's. Raises :class:`RunFolderError` with one line."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--output {folder} is a file, not a folder")
    if hold:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    elif not folder.exists():
        return RunLock(None)
    lock = _lock(folder, create=True)  # in an existing folder the early check takes it too: a read-only folder fails here
    try:
        found = checkpoints(folder)
        if found and not resume and not overwrite:
            names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise RunFolderError(
                f"output folder {folder} holds another run's checkpoint(s) ({names}): continue that run with --resume, "
                "replace it with --overwrite, or choose another --output"
            )
        if found and overwrite and not resume and hold:
            mine = [p for p in found if p.name.startswith(f"{tag}-")]
            for p in mine:
                p.unlink()
            if mine:
                say(f"fastjepa: --overwrite: deleted {len(mine)} checkpoint(s) of the previous run in {folder}")
        if not hold:
            lock.release()
        return lock
    except BaseException:
        lock.release()
        raise
