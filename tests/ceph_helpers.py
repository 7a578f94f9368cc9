"""A throwaway Ceph cluster for the tests (scripts/ceph-cluster.sh), started once per run.

:func:`shared_cluster` starts it on first use in a private short directory and stops it
(everything removed) when the test process ends, however it ends (atexit, and a detached
watcher for deaths that skip atexit); the ``ceph_cluster`` fixture of
tests/system/test_rbd.py and the ``rbd`` conformance case (tests/conformance.py) share it.
Images get unique names; each user removes its own.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = str(REPO / "scripts" / "ceph-cluster.sh")
_DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd", "rbd")


@dataclass(frozen=True)
class Cluster:
    dir: str
    conf: str

    def env(self) -> dict[str, str]:
        """The environment for the ceph/rbd/rados tools and for tapdisk: CEPH_CONF."""
        return {**os.environ, "CEPH_CONF": self.conf}

    def rbd(self, *args: str, timeout: float = 120, input: bytes | None = None) -> str:
        """Run the ``rbd`` tool on this cluster; fails the test on a non-zero exit."""
        proc = subprocess.run(["rbd", "--conf", self.conf, *args], capture_output=True,
                              timeout=timeout, input=input)
        assert proc.returncode == 0, (args, proc.stderr.decode())
        return proc.stdout.decode()

    def qemu_uri(self, name: str) -> str:
        """The image as qemu's own rbd driver names it."""
        return f"rbd:{name}:conf={self.conf}"

    def daemon_pid(self, name: str) -> int:
        """The pid of ``mon.a``, ``mgr.x`` or ``osd.0``."""
        with open(os.path.join(self.dir, "run", f"{name}.pid")) as f:
            return int(f.read().strip())


_counter = itertools.count()


def unique_image(prefix: str = "img") -> str:
    """A fresh image name (unique in this run)."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def ceph_unavailable() -> str | None:
    """Why the cluster cannot run here, or None."""
    for tool in _DAEMONS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs the Ceph packages)"
    try:
        import rbd  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return "the rbd Python module is not importable (scripts/setup.sh links it into .venv)"
    return None


_cluster: Cluster | None = None
_failed: str | None = None


def shared_cluster() -> Cluster:
    """The run's cluster, started on first call; skips the test when Ceph is missing.

    A failed start fails this and every later caller (with the script's message)."""
    global _cluster, _failed
    why = ceph_unavailable()
    if why is not None:
        pytest.skip(why)
    if _failed is not None:
        pytest.fail(_failed)
    if _cluster is None:
        path = tempfile.mkdtemp(prefix="ceph-", dir="/tmp")  # short: socket paths
        atexit.register(_stop, path)
        _watch(path)
        proc = subprocess.run([SCRIPT, "start", path], capture_output=True, text=True,
                              timeout=180)
        if proc.returncode != 0:
            _failed = f"scripts/ceph-cluster.sh start failed:\n{proc.stderr}"
            pytest.fail(_failed)
        conf = proc.stdout.strip().splitlines()[-1]
        assert conf == os.path.join(path, "ceph.conf"), proc.stdout
        _cluster = Cluster(path, conf)
    return _cluster


def stop_shared_cluster() -> None:
    """Stop the run's cluster now (the session fixture's finaliser); idempotent."""
    global _cluster
    if _cluster is not None:
        _stop(_cluster.dir)
        _cluster = None


def _watch(path: str) -> None:
    """A detached watcher that stops the cluster once this process is gone, also when
    it dies without running atexit (SIGTERM from a timeout, SIGKILL)."""
    me = os.getpid()
    script = (f"while kill -0 {me} 2>/dev/null; do sleep 2; done; "
              f"{shlex.quote(SCRIPT)} stop {shlex.quote(path)}; rm -rf {shlex.quote(path)}")
    # Backgrounded by the shell, which exits at once: the watcher is nobody's child here.
    subprocess.run(["sh", "-c", f"({script}) </dev/null >/dev/null 2>&1 &"],
                   check=True, timeout=30, start_new_session=True)


def _stop(path: str) -> None:
    if os.path.isdir(path):
        subprocess.run([SCRIPT, "stop", path], capture_output=True, timeout=120)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def rbd_image(tmp: Path, initial: bytes) -> Iterator[str]:
    """An RBD image on the shared cluster holding ``initial`` (``rbd import``), as the
    rbd driver names it (``rbd/NAME:conf=...``); removed afterwards."""
    cluster = shared_cluster()
    name = unique_image("conf")
    source = tmp / f"{name}.raw"
    source.write_bytes(initial)
    cluster.rbd("import", str(source), f"rbd/{name}")
    source.unlink()
    try:
        yield f"rbd/{name}:conf={cluster.conf}"
    finally:
        cluster.rbd("rm", "--no-progress", f"rbd/{name}")
