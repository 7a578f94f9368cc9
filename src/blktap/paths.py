"""The run directory layout shared by tapdisk and tap-ctl, as the C tools name things.

``<run_dir>/ctl<pid>`` control sockets, ``<run_dir>/tapdisk/tapdisk-<minor>`` minor markers,
``<run_dir>/nbd<pid>.<minor>`` NBD sockets, ``<dev_dir>/tapdev<minor>`` block devices.
"""

from __future__ import annotations

import os

RUN_DIR_ENV = "BLKTAP_RUN_DIR"
DEFAULT_RUN_DIR = "/run/blktap-control"
DEV_DIR_ENV = "BLKTAP_DEV_DIR"
DEFAULT_DEV_DIR = "/dev/xen/blktap-2"
MINOR_DIR = "tapdisk"
MAX_MINOR = 16383


def run_dir(override: str | None = None) -> str:
    """The run directory: ``override``, else $BLKTAP_RUN_DIR, else /run/blktap-control."""
    return override or os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


def dev_dir(override: str | None = None) -> str:
    """The block device directory: ``override``, else $BLKTAP_DEV_DIR, else the C default."""
    return override or os.environ.get(DEV_DIR_ENV) or DEFAULT_DEV_DIR


def control_socket(rundir: str, pid: int) -> str:
    return os.path.join(rundir, f"ctl{pid}")


def minor_dir(rundir: str) -> str:
    return os.path.join(rundir, MINOR_DIR)


def minor_marker(rundir: str, minor: int) -> str:
    return os.path.join(rundir, MINOR_DIR, f"tapdisk-{minor}")


def nbd_socket(rundir: str, pid: int, minor: int) -> str:
    return os.path.join(rundir, f"nbd{pid}.{minor}")


def tapdev(devdir: str, minor: int) -> str:
    return os.path.join(devdir, f"tapdev{minor}")


def ensure_dir(path: str) -> None:
    """Create ``path`` (and parents) with mode 0700 if missing."""
    os.makedirs(path, mode=0o700, exist_ok=True)
