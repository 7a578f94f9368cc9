"""Spawning tapdisks (the real .venv/bin/tapdisk), finding the binary, stopping them."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from blktap.control import client, spawn
from blktap.control.errors import SpawnError, TimedOut
from blktap.control.rundir import RunDir
from blktap.errors import NotFound


def test_binary_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTAP_TAPDISK", "/usr/local/x/tapdisk")
    assert spawn.tapdisk_binary() == "/usr/local/x/tapdisk"


def test_binary_next_to_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLKTAP_TAPDISK", raising=False)
    assert spawn.tapdisk_binary() == str(Path(sys.executable).parent / "tapdisk")


def test_binary_from_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BLKTAP_TAPDISK", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "tapdisk"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert spawn.tapdisk_binary() == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(NotFound):
        spawn.tapdisk_binary()


def test_spawn_real_tapdisk(run_dir: str) -> None:
    rundir = RunDir.from_env()
    pid = spawn.spawn(rundir)
    try:
        assert rundir.ctl_socket(pid).exists()
        assert spawn.is_running(pid)
        assert client.get_pid(rundir, pid) == pid
        assert client.list_vbds(rundir, pid) == []
    finally:
        spawn.terminate(rundir, pid)
    assert not spawn.is_running(pid)
    assert not rundir.ctl_socket(pid).exists()


def test_spawn_passes_the_run_dir(run_dir: str, tmp_path: Path) -> None:
    other = RunDir(Path(run_dir) / "other", Path(run_dir) / "dev")
    pid = spawn.spawn(other)
    try:
        assert other.ctl_socket(pid).exists()
        assert not Path(run_dir, f"ctl{pid}").exists()
    finally:
        spawn.terminate(other, pid)


def test_spawn_failing_binary(run_dir: str, tmp_path: Path) -> None:
    script = tmp_path / "broken-tapdisk"
    script.write_text("#!/bin/sh\necho 'cannot start: no way' >&2\nexit 5\n")
    script.chmod(0o755)
    with pytest.raises(SpawnError, match=r"status 5.*no way") as info:
        spawn.spawn(RunDir.from_env(), binary=str(script))
    assert info.value.errno == 5


def test_spawn_binary_that_prints_nonsense(run_dir: str, tmp_path: Path) -> None:
    script = tmp_path / "odd-tapdisk"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    with pytest.raises(SpawnError, match="hello") as info:
        spawn.spawn(RunDir.from_env(), binary=str(script))
    assert info.value.errno == errno.EIO


def test_spawn_missing_binary(run_dir: str, tmp_path: Path) -> None:
    with pytest.raises(SpawnError) as info:
        spawn.spawn(RunDir.from_env(), binary=str(tmp_path / "nope"))
    assert info.value.errno == errno.ENOENT


def test_spawn_timeout_kills_the_child(run_dir: str, tmp_path: Path) -> None:
    script = tmp_path / "slow-tapdisk"
    marker = tmp_path / "pid"
    script.write_text(f"#!/bin/sh\necho $$ > {marker}\nexec sleep 30\n")
    script.chmod(0o755)
    with pytest.raises(TimedOut):
        spawn.spawn(RunDir.from_env(), binary=str(script), timeout=0.5)
    assert not spawn.is_running(int(marker.read_text()))


def test_is_running_and_wait_exit() -> None:
    assert spawn.is_running(os.getpid())
    assert not spawn.is_running(4000000)
    assert spawn.wait_exit(4000000, 0.1)
    assert not spawn.wait_exit(os.getpid(), 0.05)
