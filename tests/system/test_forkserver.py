"""The tapdisk fork server (blktap.tapdisk.forkserver), seen from outside as tap-ctl and
the kernel see it: which process listens on the run directory's abstract socket, who
forked whom (/proc/PID/stat), process names, umask, and that the tapdisks serve.
"""

from __future__ import annotations

import os
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blktap.control import client
from blktap.control.rundir import RunDir
from blktap.control.spawn import _spawn_forked as spawn_forked
from tests.helpers import (
    TAP_CTL,
    Tapdisk,
    is_fork_server,
    process_socket_inodes,
    short_tempdir,
    spawn_tapdisk,
)
from tests.system.test_tap_ctl import image, ok, parse_list, tapdisk_pids


def abstract_inodes(run_dir: str) -> set[int]:
    """Inodes of sockets bound to the run directory's fork server address."""
    st = os.stat(run_dir)
    where = zlib.crc32(os.path.realpath(run_dir).encode())
    name = f"@blktap-tapdisk-{os.geteuid()}-{st.st_dev:x}-{st.st_ino:x}-{where:08x}"
    found = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].strip() == name:
                found.add(int(fields[6]))
    return found


def servers(run_dir: str) -> list[int]:
    """Processes holding the run directory's fork server socket."""
    inodes = abstract_inodes(run_dir)
    if not inodes:
        return []
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and inodes & process_socket_inodes(int(e))]


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat_fields(pid)[0] in ("Z", "X"):
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_tapdisks_are_forked_by_one_server(run_dir: str) -> None:
    first, second = spawn_tapdisk(), spawn_tapdisk()
    try:
        (server,) = servers(run_dir)
        assert is_fork_server(server) and comm(server) == "tapdisk-forksrv"
        for td in (first, second):
            state, ppid, _pgrp, session = stat_fields(td.pid)[:4]
            assert state not in ("Z", "X")
            assert comm(td.pid) == "tapdisk" and not is_fork_server(td.pid)
            assert int(session) != os.getsid(0)  # detached into a session of its own
            assert int(ppid) != server  # forked twice: not the server's child
            assert os.path.exists(td.ctl)
        assert first.pid != second.pid
        listed = {int(e["pid"]) for e in parse_list(ok("list")) if "pid" in e}
        assert listed == {first.pid, second.pid}
        assert sorted(tapdisk_pids(run_dir)) == sorted([first.pid, second.pid])
    finally:
        first.kill()
        second.kill()


def test_create_through_the_server_adopts_the_callers_umask(
    run_dir: str, tmp_path: Path
) -> None:
    ok("spawn")  # starts the server; later tapdisks come from it
    (server,) = servers(run_dir)
    img = image(tmp_path)
    proc = subprocess.run([TAP_CTL, "create", "-a", f"aio:{img}"], capture_output=True,
                          text=True, umask=0o027, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    (entry,) = [e for e in parse_list(ok("list")) if e.get("minor") == "0"]
    pid = int(entry["pid"])
    assert int(stat_fields(pid)[1]) != server
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Umask:\t0027" in status
    with open(img, "rb") as f:
        assert f.read(4096) == bytes(4096)
    ok("destroy", "-p", str(pid), "-m", "0")


def test_parallel_launchers_share_one_server(run_dir: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        tapdisks = list(pool.map(lambda _: spawn_tapdisk(), range(8)))
    try:
        assert len({td.pid for td in tapdisks}) == 8
        assert len(servers(run_dir)) == 1
        assert all(comm(td.pid) == "tapdisk" for td in tapdisks)
    finally:
        for td in tapdisks:
            td.kill()


def test_off_runs_tapdisk_itself(run_dir: str) -> None:
    td = spawn_tapdisk(dict(os.environ, BLKTAP_FORKSERVER="off"))
    try:
        assert servers(run_dir) == []
        assert comm(td.pid) == "tapdisk"
        assert td.pid in tapdisk_pids(run_dir)
    finally:
        td.kill()


def test_server_leaves_when_idle(run_dir: str) -> None:
    td = spawn_tapdisk(dict(os.environ, BLKTAP_FORKSERVER="1"))
    td.kill()
    (server,) = servers(run_dir)
    assert wait_gone(server, 10)
    assert servers(run_dir) == []


def test_server_leaves_with_its_run_directory() -> None:
    with short_tempdir() as path:
        env = dict(os.environ, BLKTAP_RUN_DIR=path, BLKTAP_DEV_DIR=f"{path}/dev",
                   BLKTAP_BLOCKDEV="off")
        td: Tapdisk = spawn_tapdisk(env)
        td.kill()
        (server,) = servers(path)
    assert wait_gone(server, 10)


def test_the_server_answers_once_the_tapdisk_listens(run_dir: str) -> None:
    """tap-ctl's direct request (blktap.prefork.tapdisk_request): the server started by
    the tapdisk command (run by python3) serves this process (python), and the tapdisk
    it forks answers on its control socket as soon as the request returns: the "ok"
    comes after the socket listens, so no caller polls for it."""
    first = spawn_tapdisk()
    pids = [first.pid]
    try:
        (server,) = servers(run_dir)
        rundir = RunDir.from_env()
        env = dict(os.environ, BLKTAP_RUN_DIR=run_dir, BLKTAP_DEV_DIR=f"{run_dir}/dev")
        for _ in range(3):
            pid = spawn_forked(rundir, env, 20.0)
            assert pid is not None, "the server declined a spawner of its own installation"
            pids.append(pid)
            assert client.get_pid(rundir, pid) == pid  # at once: no retry, no sleep
            assert comm(pid) == "tapdisk" and int(stat_fields(pid)[1]) != server
        assert servers(run_dir) == [server]
    finally:
        for pid in pids:
            Tapdisk(pid, f"{run_dir}/ctl{pid}").kill()
