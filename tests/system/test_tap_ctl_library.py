"""The control library (blktap.control) against real tapdisks: create's undo at every
step, destroy's postconditions, find/list/details/stats through the typed API."""

from __future__ import annotations

import errno
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blktap.control import Control, Created, OpenOptions, RunDir, TapEntry, minors, spawn
from blktap.control.errors import SpawnError, TapdiskError
from blktap.errors import BlktapError, Busy, InvalidArgument


def image(tmp_path: Path, name: str = "disk.img", size: int = 32 << 20) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def live_tapdisks(rundir: RunDir) -> list[int]:
    return [pid for pid in rundir.socket_pids() if spawn.is_running(pid)]


def assert_clean(ctl: Control) -> None:
    rd = ctl.rundir
    assert ctl.list() == []
    assert live_tapdisks(rd) == []
    names = set(os.listdir(rd.root)) - {"tapdisk", "dev"}
    assert names == set()
    assert minors.list_minors(rd) == []
    assert not rd.minors_dir.exists() or list(rd.minors_dir.iterdir()) == []


@pytest.fixture
def ctl(run_dir: str) -> Control:
    return Control()


def test_create_destroy(ctl: Control, tmp_path: Path) -> None:
    img = image(tmp_path)
    vbd = ctl.create(f"aio:{img}")
    assert vbd.minor == 0
    assert vbd.device == ctl.rundir.marker(0)
    assert vbd.info.size == 32 << 20 and vbd.info.sector_size == 512
    assert spawn.is_running(vbd.pid)
    assert ctl.list() == [TapEntry(vbd.pid, 0, 0, "aio", img)]
    assert ctl.find(f"aio:{img}") == TapEntry(vbd.pid, 0, 0, "aio", img)
    assert ctl.find(f"aio:{img}.other") is None
    assert ctl.find(f"vhd:{img}") is None
    assert ctl.pid(vbd.pid) == vbd.pid
    assert ctl.disk_info(vbd.pid, vbd.minor) == vbd.info
    stats = ctl.stats(vbd.pid, vbd.minor)
    assert stats["name"] == f"aio:{img}" and stats["images"][0]["name"] == img
    assert isinstance(ctl.stats(vbd.pid, 0xFFFF), list)
    details = ctl.details(ctl.list()[0])
    assert details.nbd_socket == ctl.rundir.nbd_socket(vbd.pid, 0)
    assert details.chain == (img,)
    ctl.destroy(vbd.pid, vbd.minor)
    # destroy of the last VBD returns once its tapdisk has exited.
    assert not spawn.is_running(vbd.pid)
    assert_clean(ctl)


def test_two_vbds_in_one_tapdisk(ctl: Control, tmp_path: Path) -> None:
    a, b = image(tmp_path, "a.img"), image(tmp_path, "b.img")
    pid = ctl.spawn()
    first, second = ctl.allocate(), ctl.allocate()
    for minor, img in ((first, a), (second, b)):
        ctl.attach(pid, minor)
        ctl.open(pid, minor, f"aio:{img}", OpenOptions(read_only=True))
    assert [(e.pid, e.minor, e.path) for e in ctl.list()] == [(pid, first, a), (pid, second, b)]
    ctl.destroy(pid, first)
    assert spawn.is_running(pid)  # it still serves the other VBD
    ctl.destroy(pid, second)
    assert not spawn.is_running(pid)
    assert_clean(ctl)


def test_create_undoes_a_failed_spawn(
    ctl: Control, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLKTAP_TAPDISK", "/bin/false")
    with pytest.raises(SpawnError) as info:
        ctl.create(f"aio:{image(tmp_path)}")
    assert info.value.errno == 1
    assert_clean(ctl)


def test_create_undoes_a_failed_attach(
    ctl: Control, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make ATTACH fail for real: the marker the tapdisk must lock vanishes after allocate.
    real_allocate = minors.allocate

    def allocate_then_lose_marker(rundir: RunDir) -> int:
        minor = real_allocate(rundir)
        rundir.marker(minor).unlink()
        return minor

    spawned: list[int] = []
    real_spawn = spawn.spawn

    def spawn_and_record(rundir: RunDir) -> int:
        spawned.append(real_spawn(rundir))
        return spawned[-1]

    monkeypatch.setattr(minors, "allocate", allocate_then_lose_marker)
    monkeypatch.setattr(spawn, "spawn", spawn_and_record)
    with pytest.raises(TapdiskError) as info:
        ctl.create(f"aio:{image(tmp_path)}")
    assert info.value.errno == errno.ENOENT and info.value.request == "ATTACH"
    # The C library leaves this tapdisk running; ours must not.
    assert len(spawned) == 1 and not spawn.is_running(spawned[0])
    assert_clean(ctl)


def test_create_undoes_a_failed_open(ctl: Control, tmp_path: Path) -> None:
    with pytest.raises(TapdiskError) as info:
        ctl.create(f"aio:{tmp_path}/missing.img")
    assert info.value.errno == errno.ENOENT and info.value.request == "OPEN"
    assert_clean(ctl)


def test_create_refuses_a_second_writer(ctl: Control, tmp_path: Path) -> None:
    img = image(tmp_path)
    vbd = ctl.create(f"aio:{img}")
    with pytest.raises(Busy) as info:
        ctl.create(f"aio:{img}")
    assert info.value.errno == errno.EBUSY
    with pytest.raises(Busy):
        ctl.create(f"aio:{os.path.dirname(img)}/./disk.img", OpenOptions(no_o_direct=True))
    assert len(ctl.list()) == 1
    ctl.destroy(vbd.pid, vbd.minor)
    assert_clean(ctl)


def test_create_rejects_bad_images_before_doing_anything(ctl: Control) -> None:
    for bad in ("noprefix", ":/x", "aio:", "aio:/" + "x" * 300):
        with pytest.raises(InvalidArgument):
            ctl.create(bad)
    assert_clean(ctl)


def test_destroy_stops_at_the_first_error(ctl: Control, tmp_path: Path) -> None:
    vbd = ctl.create(f"aio:{image(tmp_path)}")
    with pytest.raises(BlktapError):
        ctl.destroy(vbd.pid, vbd.minor + 1)  # no such VBD in that tapdisk
    assert len(ctl.list()) == 1
    ctl.destroy(vbd.pid, vbd.minor)
    assert_clean(ctl)


def test_paused_destroy_and_timeout(ctl: Control, tmp_path: Path) -> None:
    vbd = ctl.create(f"aio:{image(tmp_path)}")
    ctl.pause(vbd.pid, vbd.minor, timeout=10)
    assert ctl.list()[0].state == 0x2A
    ctl.destroy(vbd.pid, vbd.minor, timeout=10)
    assert_clean(ctl)


def test_list_survives_a_dead_tapdisk(ctl: Control, tmp_path: Path) -> None:
    vbd = ctl.create(f"aio:{image(tmp_path)}")
    subprocess.run(["kill", "-9", str(vbd.pid)], check=True)
    assert spawn.wait_exit(vbd.pid, 10)
    # Its sockets stay behind; list skips the dead tapdisk and shows the orphan minor.
    assert ctl.list() == [TapEntry(minor=vbd.minor)]
    spawn.terminate(ctl.rundir, vbd.pid)  # removes the stale sockets
    ctl.free(vbd.minor)
    assert_clean(ctl)


def test_device_path_prefers_the_block_device(ctl: Control) -> None:
    minor = ctl.allocate()
    assert ctl.device_path(minor) == str(ctl.rundir.marker(minor))
    ctl.rundir.dev_dir.mkdir(parents=True, exist_ok=True)
    ctl.rundir.tapdev(minor).touch()
    assert ctl.device_path(minor) == str(ctl.rundir.tapdev(minor))
    ctl.rundir.tapdev(minor).unlink()
    ctl.free(minor)
    assert_clean(ctl)


def test_concurrent_writers_of_one_image_get_one_vbd(ctl: Control, tmp_path: Path) -> None:
    img = image(tmp_path)

    def attempt(_: int) -> object:
        try:
            return Control().create(f"aio:{img}")
        except Busy as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, range(4)))
    made = [r for r in results if isinstance(r, Created)]
    refused = [r for r in results if isinstance(r, Busy)]
    assert len(made) == 1 and len(refused) == 3
    assert len(ctl.list()) == 1
    ctl.destroy(made[0].pid, made[0].minor)
    assert_clean(ctl)
