"""The data cache folder, and building into it safely from several processes at once.

Several processes (torchrun ranks, parallel sweep runs) may ask for the same cached artifact at
the same moment. Each artifact is a folder built by one process under an exclusive `fcntl`
lock, in a temporary folder next to it, and published with an atomic `os.rename`: a reader
either sees no folder or the complete one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "STABILITY_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Returns the cache folder: `cache_dir`, else $STABILITY_CACHE, else ~/.cache/stability."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "stability"
    return Path(cache_dir).expanduser()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on `path` (created if missing) for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Makes sure the folder `target` exists, calling `build(tmp_folder)` at most once.

    The first caller builds into a fresh temporary folder beside `target` and renames it to
    `target`; callers arriving meanwhile wait on the lock and then find it done. A failed build
    leaves nothing behind, so the next caller tries again.

    Args:
        target: The folder to publish, e.g. `~/.cache/stability/sample-<hash>`.
        build: Writes the artifact's files into the folder it is given.

    Returns:
        `target`.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f"{target.name}.lock"):
        if target.is_dir():  # built by another process while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
