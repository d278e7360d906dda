"""Writing files atomically, with one-line errors a user can act on.

A file lmscope writes (a saved view, a collection shard, a collection's manifest) is first written
under a temporary name in the same folder and then renamed onto its final name. A rename within one
folder is atomic on POSIX and Windows, so a reader sees either the old file, or no file, or the whole
new one: a full disk or an interrupted run never leaves a truncated page or shard that reads as valid.

Errors become :class:`~lmscope.errors.LmscopeError` naming the file and what to do: a missing folder,
a target that is a folder, no permission, no space left. The temporary file is removed on any error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from lmscope.errors import LmscopeError

__all__ = ["check_writable", "file_error", "write_atomic", "write_with"]

TEMP_PREFIX = ".lmscope-tmp-"


def file_error(path: str | os.PathLike[str], error: OSError, doing: str = "write") -> LmscopeError:
    """A one-line :class:`LmscopeError` for ``error`` raised while ``doing`` something to ``path``."""
    code = error.errno
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", None):
        what = "no space left on the device: free some space or write somewhere else"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "permission denied: choose a folder you may write to"
    elif code == errno.ENOENT:
        what = f"the folder {Path(path).parent} does not exist: create it first"
    elif code == errno.EISDIR:
        what = "it is a folder: give a file name"
    elif code == errno.ENOTDIR:
        what = "a part of the path is a file, not a folder"
    elif code == errno.ENAMETOOLONG:
        what = "the name is too long"
    else:
        what = " ".join((error.strerror or str(error)).split())
    return LmscopeError(f"cannot {doing} {path}: {what}")


def check_writable(path: str | os.PathLike[str]) -> Path:
    """``path`` if a file may be written there (its folder exists, it is not a folder); else a clear error.

    Meant for checking an output path before long work (loading a model, running it), so the user
    learns about a typo at once; the write itself still reports what goes wrong then.
    """
    path = Path(path)
    if path.is_dir():
        raise LmscopeError(f"cannot write {path}: it is a folder: give a file name")
    parent = path.parent
    if not parent.exists():
        raise LmscopeError(f"cannot write {path}: the folder {parent} does not exist: create it first")
    if not parent.is_dir():
        raise LmscopeError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise LmscopeError(f"cannot write {path}: permission denied: choose a folder you may write to")
    return path


def write_with(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result onto ``path`` (atomic; cleaned up on error)."""
    path = Path(path)
    if path.is_dir():
        raise LmscopeError(f"cannot write {path}: it is a folder: give a file name")
    temporary = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise file_error(path, error) from error
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return path


def write_atomic(path: str | os.PathLike[str], data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically: a temporary name in the same folder, then a rename."""
    payload = data.encode(encoding) if isinstance(data, str) else data

    def write(temporary: Path) -> None:
        with open(temporary, "xb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())

    return write_with(path, write)
