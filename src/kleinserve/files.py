"""Private files: the data dir holds prompts, webhook secrets, key digests, result and reference images, and
none of it is for the machine's other users. Directories are made 0700 and files 0600, whatever the umask;
a data dir made by an older version is closed (0700) when the server opens it. SQLite gives a database's
-wal and -shm files the database file's own mode, so creating that file 0600 covers them.
Guarded by tests/api/test_job_edges.py::test_data_dir_files_are_private.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter (its parents are created as the umask says)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def private_database(path: Path) -> Path:
    """A database path whose file exists and is private (SQLite's own files then are too).

    An existing file is only chmod-ed, never opened: closing any descriptor of a file drops every POSIX lock
    this process holds on it, so opening and closing the database beside a live SQLite connection made
    another process believe it was the last user, checkpoint and delete the WAL under it (the server then no
    longer saw keys made by `kleinserve keys create`: test_auth_media.py::test_revoked_key_is_refused_by_...).
    """
    private_dir(path.parent)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another thread was first
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    os.chmod(path, FILE_MODE)  # one an older version made readable by all
    return path


def open_private(path: Path) -> BinaryIO:
    """A new file (or an emptied one) for writing, readable by its owner only."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb")
