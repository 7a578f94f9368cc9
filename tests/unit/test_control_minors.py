"""Minor allocation with marker files and flock, and the run directory layout."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blktap.control import minors
from blktap.control import rundir as rundir_mod
from blktap.control.errors import ControlError, MinorBusy
from blktap.control.rundir import RunDir
from blktap.errors import InvalidArgument, NotFound
from tests.helpers import short_tempdir


@pytest.fixture
def rundir() -> Iterator[RunDir]:
    with short_tempdir() as path:
        yield RunDir(Path(path) / "run", Path(path) / "dev")


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLKTAP_RUN_DIR", raising=False)
    monkeypatch.delenv("BLKTAP_DEV_DIR", raising=False)
    default = RunDir.from_env()
    assert default == RunDir(Path("/run/blktap-control"), Path("/dev/xen/blktap-2"))
    monkeypatch.setenv("BLKTAP_RUN_DIR", "/tmp/x")
    monkeypatch.setenv("BLKTAP_DEV_DIR", "/tmp/d")
    assert RunDir.from_env() == RunDir(Path("/tmp/x"), Path("/tmp/d"))
    assert RunDir.from_env({}) == default


def test_names() -> None:
    rd = RunDir(Path("/run/r"), Path("/dev/d"))
    assert str(rd.ctl_socket(12)) == "/run/r/ctl12"
    assert str(rd.marker(3)) == "/run/r/tapdisk/tapdisk-3"
    assert str(rd.nbd_socket(12, 3)) == "/run/r/nbd12.3"
    assert str(rd.tapdev(3)) == "/dev/d/tapdev3"


def test_socket_pids_and_nbd_sockets(rundir: RunDir) -> None:
    rundir.ensure()
    for name in ("ctl12", "ctl7", "ctlx", "ctl", "nbd12.0", "nbd12.5", "nbd7.1", "nbd12.x"):
        (rundir.root / name).touch()
    assert rundir.socket_pids() == [7, 12]
    assert sorted(p.name for p in rundir.nbd_sockets(12)) == ["nbd12.0", "nbd12.5"]
    assert RunDir(rundir.root / "missing", rundir.dev_dir).socket_pids() == []


def test_allocate_creates_private_dirs_and_markers(rundir: RunDir) -> None:
    assert minors.allocate(rundir) == 0
    assert stat.S_IMODE(rundir.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(rundir.minors_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(rundir.marker(0).stat().st_mode) == 0o600


def test_allocate_lowest_free(rundir: RunDir) -> None:
    assert [minors.allocate(rundir) for _ in range(4)] == [0, 1, 2, 3]
    minors.free(rundir, 1)
    minors.free(rundir, 2)
    assert minors.list_minors(rundir) == [0, 3]
    assert minors.allocate(rundir) == 1
    assert minors.allocate(rundir) == 2
    assert minors.allocate(rundir) == 4


def test_list_minors_ignores_other_names(rundir: RunDir) -> None:
    rundir.ensure()
    for name in ("tapdisk-2", "tapdisk-10", "tapdisk-x", "other", "tapdisk-99999"):
        (rundir.minors_dir / name).touch()
    assert minors.list_minors(rundir) == [2, 10]


def test_concurrent_allocations_are_distinct(rundir: RunDir) -> None:
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda _: minors.allocate(rundir), range(64)))
    assert sorted(got) == list(range(64))


def test_concurrent_allocations_across_processes(rundir: RunDir) -> None:
    code = (
        "import sys; from pathlib import Path; from blktap.control import minors;"
        "from blktap.control.rundir import RunDir;"
        "rd = RunDir(Path(sys.argv[1]), Path(sys.argv[1]));"
        "print(*[minors.allocate(rd) for _ in range(10)])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(rundir.root)], stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    got = []
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        got += [int(x) for x in out.split()]
    assert sorted(got) == list(range(40))


def test_free_of_held_minor_is_ewouldblock(rundir: RunDir) -> None:
    minor = minors.allocate(rundir)
    fd = os.open(rundir.marker(minor), os.O_RDWR)  # as a tapdisk does at ATTACH
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert minors.is_held(rundir, minor)
        with pytest.raises(MinorBusy) as info:
            minors.free(rundir, minor)
        assert info.value.errno == errno.EWOULDBLOCK == 11
        assert rundir.marker(minor).exists()
    finally:
        os.close(fd)
    assert not minors.is_held(rundir, minor)
    minors.free(rundir, minor)
    assert not rundir.marker(minor).exists()
    assert not minors.is_held(rundir, minor)


def test_free_unallocated_is_enoent(rundir: RunDir) -> None:
    with pytest.raises(NotFound) as info:
        minors.free(rundir, 5)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("minor", [-1, 16384])
def test_free_out_of_range(rundir: RunDir, minor: int) -> None:
    with pytest.raises(InvalidArgument):
        minors.free(rundir, minor)


def test_allocate_skips_a_marker_made_without_the_lock(rundir: RunDir) -> None:
    rundir.ensure()
    (rundir.minors_dir / "tapdisk-0").touch()
    assert minors.allocate(rundir) == 1


def test_allocate_when_every_minor_is_taken(
    rundir: RunDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert rundir_mod.MAX_MINOR == 16383
    monkeypatch.setattr(minors, "MAX_MINOR", 15)  # 16 minors: the same code, fewer files
    rundir.ensure()
    for minor in range(15):
        (rundir.minors_dir / f"tapdisk-{minor}").touch()
    assert minors.allocate(rundir) == 15
    with pytest.raises(ControlError) as info:
        minors.allocate(rundir)
    assert info.value.errno == errno.ENOSPC
