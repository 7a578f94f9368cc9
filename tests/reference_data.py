"""The reference data the tests compare against, carried in the repository.

``tests/data/<kind>.tar.xz`` holds the images and logs made by the C tools (see
``tests/data/README.md``). :func:`reference_dir` unpacks an archive the first time a test
process asks for it, into a temporary directory that is removed when the process exits, and
returns the same directory on every later call. Treat the files as read-only: copy before
writing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
KINDS = ("vhd", "cbt")

_lock = threading.Lock()
_unpacked: dict[str, Path] = {}


def reference_dir(kind: str) -> Path:
    """The directory holding the unpacked ``tests/data/<kind>.tar.xz`` (``kind`` in KINDS).

    Raises ValueError for an unknown kind and FileNotFoundError if the archive is missing.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reference data {kind!r}; expected one of {', '.join(KINDS)}")
    with _lock:
        found = _unpacked.get(kind)
        if found is None:
            found = _unpack(kind)
            _unpacked[kind] = found
        return found


def _unpack(kind: str) -> Path:
    archive = DATA / f"{kind}.tar.xz"
    if not archive.is_file():
        raise FileNotFoundError(f"reference data archive {archive} is missing")
    top = Path(tempfile.mkdtemp(prefix=f"blktap-ref-{kind}-"))
    atexit.register(shutil.rmtree, top, ignore_errors=True)
    with tarfile.open(archive, "r:xz") as tar:
        # Members are "<kind>/<file>"; tarfile keeps the holes of --sparse members.
        tar.extractall(top, filter="data")
    root = top / kind
    if not root.is_dir():
        raise FileNotFoundError(f"{archive} holds no {kind}/ directory")
    # The archive stores the directory read-only; it must stay removable at exit.
    os.chmod(root, 0o755)
    return root
