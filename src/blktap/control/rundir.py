"""Where the control library finds things: the run directory and the device directory.

Layout (as the C tools name things; see :mod:`blktap.paths`): ``<run>/ctl<pid>`` control
sockets, ``<run>/tapdisk/tapdisk-<minor>`` minor markers, ``<run>/nbd<pid>.<minor>`` NBD
sockets, ``<dev>/tapdev<minor>`` kernel block devices. The run directory is
``$BLKTAP_RUN_DIR`` or ``/run/blktap-control``; the device directory ``$BLKTAP_DEV_DIR`` or
``/dev/xen/blktap-2``. Both are read when :meth:`RunDir.from_env` is called, not at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blktap import paths

__all__ = ["MAX_MINOR", "RunDir", "private"]

log = logging.getLogger(__name__)

MAX_MINOR = paths.MAX_MINOR
"""Minors are 0..16383, as in the C implementation."""

_CTL_NAME = re.compile(r"ctl([0-9]+)")
_NBD_NAME = re.compile(r"nbd([0-9]+)\.([0-9]+)")


def private(directory: Path) -> None:
    """Make ``directory`` mode 0700 if the caller owns it and it lets others in: its
    sockets are the keys to every VBD (other owners' directories are left alone)."""
    st = directory.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        log.warning("%s was mode %o; making it 0700", directory, st.st_mode & 0o7777)
        directory.chmod(0o700)


@dataclass(frozen=True)
class RunDir:
    """A run directory and a device directory, with the names of what lives there."""

    root: Path
    dev_dir: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RunDir:
        """From ``$BLKTAP_RUN_DIR`` / ``$BLKTAP_DEV_DIR`` (of ``environ``, default os.environ)."""
        env = os.environ if environ is None else environ
        return cls(
            root=Path(env.get(paths.RUN_DIR_ENV) or paths.DEFAULT_RUN_DIR),
            dev_dir=Path(env.get(paths.DEV_DIR_ENV) or paths.DEFAULT_DEV_DIR),
        )

    @property
    def minors_dir(self) -> Path:
        """``<run>/tapdisk``: the directory of minor markers."""
        return self.root / paths.MINOR_DIR

    def ctl_socket(self, pid: int) -> Path:
        """``<run>/ctl<pid>``: the control socket of tapdisk ``pid``."""
        return self.root / f"ctl{pid}"

    def marker(self, minor: int) -> Path:
        """``<run>/tapdisk/tapdisk-<minor>``: the marker that reserves ``minor``."""
        return self.minors_dir / f"tapdisk-{minor}"

    def nbd_socket(self, pid: int, minor: int) -> Path:
        """``<run>/nbd<pid>.<minor>``: the NBD export of VBD ``minor`` of tapdisk ``pid``."""
        return self.root / f"nbd{pid}.{minor}"

    def tapdev(self, minor: int) -> Path:
        """``<dev>/tapdev<minor>``: the kernel block device of ``minor``, where there is one."""
        return self.dev_dir / f"tapdev{minor}"

    def ensure(self) -> None:
        """Create the run and minors directories (mode 0700) if they are missing; one of
        ours that lets others in (group or other bits) is made 0700."""
        for directory in (self.root, self.minors_dir):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700, parents=True)
            private(directory)

    def socket_pids(self) -> list[int]:
        """Pids named by ``ctl<pid>`` entries, ascending. Not checked for liveness."""
        return sorted(int(m.group(1)) for m in self._matches(_CTL_NAME))

    def nbd_sockets(self, pid: int) -> list[Path]:
        """The ``nbd<pid>.<minor>`` entries of tapdisk ``pid``."""
        return [self.root / m.group(0) for m in self._matches(_NBD_NAME) if int(m.group(1)) == pid]

    def _matches(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return [m for m in map(pattern.fullmatch, names) if m is not None]
