"""Atomic output: the destination directory appears complete or not at all."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not force:
        raise ValueError(f"destination {dst} already exists: pass --force to replace it")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} is a file, not a directory")


@contextmanager
def atomic_directory(dst: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside ``dst``; when the block ends, it becomes ``dst``.

    If the block raises, the directory is removed and ``dst`` is untouched. With
    ``force`` an existing ``dst`` is replaced (moved aside, then deleted).
    """
    dst = Path(dst)
    check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        check_destination(dst, force)
        if dst.exists():
            old = tmp.with_suffix(".old")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
