"""Where permsparse keeps what it builds once (converted and trained models, sampled text), and how a built
folder appears there whole or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$PERMSPARSE_CACHE``, else the user's cache directory."""
    env = os.environ.get("PERMSPARSE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("permsparse"))


@contextmanager
def replacing(folder: Path):
    """A fresh staging folder beside ``folder`` to write into; when the block ends without an error it
    replaces ``folder`` (one of an earlier build is moved aside, then removed), else it is removed. Readers
    see the old folder or the new one, never a half-written one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    replaced = folder.with_name(f".{folder.name}-replaced-{os.getpid()}")
    try:
        yield staging
        if folder.exists():
            os.replace(folder, replaced)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
