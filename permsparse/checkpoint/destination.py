"""The output folder of a run, claimed before any heavy work: writable, locked, with room for the checkpoint.

A run writes into ``OUT.partial`` (:func:`permsparse.checkpoint.save.partial_dir`) and renames it to
``OUT`` when complete. :func:`claimed` makes that folder (a read-only or unwritable place fails here, in
one line), takes an exclusive OS lock on it (``flock``: released by the kernel when the process dies, so a
killed run never leaves a stale lock) so that a second run on the same output is refused at once, and on
failure removes the folder again unless it holds progress worth resuming. :func:`check_free_space`
refuses a run whose checkpoint cannot fit the folder's file system.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..run.resume import has_progress

GIB = 2**30


class OutputError(OSError):
    """The output folder cannot be claimed or written; the message names it and why."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def claimed(staging: str | Path, out: str | Path, *, fresh: bool = False, lock: bool = True):
    """Hold ``staging`` (the partial folder of ``out``) for the ``with`` body: created, checked writable and
    locked; emptied first when ``fresh`` (``--overwrite``). Failing inside the body, the folder is removed
    unless it holds committed progress (then the same command resumes from it). Other processes of one
    distributed run pass ``lock=False``."""
    staging, out = Path(staging), Path(out)
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(err.errno, f"cannot create {staging} for --out {out}: {err.strerror or err}") from None
    fd = os.open(staging, os.O_RDONLY)
    try:
        if lock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FileExistsError(f"{staging} is locked by another permsparse run writing {out}: wait for it to "
                                      "finish or choose another --out") from None
        try:
            if fresh:
                for path in staging.iterdir():
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            _check_writable(staging, out)
            yield staging
        except BaseException:
            if lock and staging.is_dir() and not has_progress(staging):
                shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        os.close(fd)


def _check_writable(staging: Path, out: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=staging, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(err.errno, f"cannot write in {staging} for --out {out}: {err.strerror or err}") from None


def check_free_space(staging: str | Path, needed: int, what: str) -> None:
    """Refuse a run whose output (``needed`` bytes: ``what``) does not fit the free space where it is written."""
    free = shutil.disk_usage(staging).free
    if free < needed:
        raise OutputError(errno.ENOSPC, f"{staging} has {free / GIB:.2f} GiB free, and {what} need about "
                                        f"{needed / GIB:.2f} GiB: free some space or choose another --out")

