"""Outputs appear complete or not at all: write to a temporary file beside the target, rename when done."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidOptionError, OutputExistsError


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to clobber an existing output unless forced; fail early on an unwritable directory."""
    path = Path(path)
    if path.is_dir():
        raise InvalidOptionError(f"output {path} is a directory; give a file name")
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} already exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise InvalidOptionError(f"output directory {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` only if the block succeeds.

    Same directory so that the final ``os.replace`` is an atomic rename on the same filesystem. On any exception
    (including KeyboardInterrupt) the temporary file is removed and the target is untouched. The result gets the
    permissions of any new file (the umask's), not the temporary file's private 0600.
    """
    path = check_output(path, force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        readable(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def readable(path: Path) -> None:
    """Give ``path`` the permissions a newly created file gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
