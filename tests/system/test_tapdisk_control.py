"""The tapdisk daemon against control messages built from the reference byte table."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import subprocess
import time

import pytest

from tests.helpers import (
    MESSAGE_SIZE,
    TAPDISK,
    Tapdisk,
    allocate_marker,
    error_of,
    exchange,
    message,
    params,
    split_messages,
)

# Message types (reference table).
ERROR, PID, PID_RSP, ATTACH, ATTACH_RSP, OPEN, OPEN_RSP = 1, 3, 4, 5, 6, 7, 8
PAUSE, PAUSE_RSP, RESUME, RESUME_RSP, CLOSE, CLOSE_RSP = 9, 10, 11, 12, 13, 14
DETACH, DETACH_RSP, LIST_MINORS, LIST, LIST_RSP, STATS, STATS_RSP = 15, 16, 17, 19, 20, 21, 22
FORCE_SHUTDOWN, DISK_INFO, DISK_INFO_RSP, EXIT = 23, 28, 29, 30
RDONLY, NO_O_DIRECT = 0x2, 0x200
ALL = 0xFFFF


def request(td: Tapdisk, type_: int, cookie: int = ALL, union: bytes = b"") -> list[
        tuple[int, int, bytes]]:
    return split_messages(exchange(td.ctl, message(type_, cookie, union)))


def one(td: Tapdisk, type_: int, cookie: int = ALL, union: bytes = b"") -> tuple[int, bytes]:
    replies = request(td, type_, cookie, union)
    assert len(replies) == 1, replies
    t, c, u = replies[0]
    assert c == cookie
    return t, u


def expect_error(td: Tapdisk, code: int, type_: int, cookie: int = ALL, union: bytes = b"") -> None:
    t, u = one(td, type_, cookie, union)
    assert (t, error_of(u)) == (ERROR, code), (t, error_of(u))


def list_entries(td: Tapdisk) -> list[tuple[int, int, int, str]]:
    out = []
    for t, _c, u in request(td, LIST):
        assert t == LIST_RSP
        count, minor, state = struct.unpack_from("<iii", u)
        path = u[12:268].split(b"\0", 1)[0].decode()
        out.append((count, minor, state, path))
    return out


def test_spawn_protocol(run_dir: str, tapdisk: Tapdisk) -> None:
    assert tapdisk.ctl == os.path.join(run_dir, f"ctl{tapdisk.pid}")
    assert tapdisk.alive()
    st = os.stat(tapdisk.ctl)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    t, u = one(tapdisk, PID)
    assert t == PID_RSP and struct.unpack_from("<i", u)[0] == tapdisk.pid


def test_list_empty_is_only_the_terminator(tapdisk: Tapdisk) -> None:
    assert list_entries(tapdisk) == [(0, -1, 0, "")]


@pytest.mark.parametrize("type_", [0, 2, 31, 99, 0xFFFF, LIST_MINORS, EXIT, PID_RSP, ERROR])
def test_unhandled_types_get_einval_and_the_daemon_goes_on(tapdisk: Tapdisk, type_: int) -> None:
    expect_error(tapdisk, errno.EINVAL, type_, 7)
    t, _ = one(tapdisk, PID)
    assert t == PID_RSP


def test_path_without_nul_is_einval(run_dir: str, tapdisk: Tapdisk) -> None:
    allocate_marker(run_dir, 1)
    assert one(tapdisk, ATTACH, 1)[0] == ATTACH_RSP
    union = struct.pack("<III", 0, 0, 0) + b"a" * 256 + bytes(262)
    expect_error(tapdisk, errno.EINVAL, OPEN, 1, union)
    assert one(tapdisk, PID)[0] == PID_RSP


def test_short_and_slow_requests_do_not_block_others(tapdisk: Tapdisk) -> None:
    with socket.socket(socket.AF_UNIX) as slow, socket.socket(socket.AF_UNIX) as short:
        slow.connect(tapdisk.ctl)
        slow.sendall(message(PID, ALL)[:100])
        short.connect(tapdisk.ctl)
        short.sendall(message(PID, ALL)[:10])
        short.shutdown(socket.SHUT_WR)
        assert short.recv(MESSAGE_SIZE) == b""  # closed without a reply
        assert one(tapdisk, PID)[0] == PID_RSP
        # Answered while the slow request is still pending (not queued behind it): the
        # slow connection is not closed yet.
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):
            slow.recv(1)
        slow.settimeout(10)
        assert slow.recv(MESSAGE_SIZE) == b""  # dropped after the 2 s request timeout
    assert tapdisk.alive()


def test_second_request_on_a_connection_gets_ebusy(tapdisk: Tapdisk) -> None:
    data = exchange(tapdisk.ctl, message(PID, ALL) + message(PID, 3))
    replies = split_messages(data)
    assert replies[0][0] == PID_RSP
    assert [(t, error_of(u)) for t, _c, u in replies[1:]] == [(ERROR, errno.EBUSY)]


def test_attach_needs_an_allocated_minor(run_dir: str, tapdisk: Tapdisk) -> None:
    expect_error(tapdisk, errno.ENOENT, ATTACH, 5)
    allocate_marker(run_dir, 5)
    assert one(tapdisk, ATTACH, 5)[0] == ATTACH_RSP
    expect_error(tapdisk, errno.EEXIST, ATTACH, 5)
    # Attached, never opened: a zero state word, as the C tapdisk's new VBD.
    assert list_entries(tapdisk) == [(1, 5, 0, ""), (0, -1, 0, "")]


def test_requests_for_unknown_minor_are_einval(tapdisk: Tapdisk) -> None:
    for type_ in (OPEN, CLOSE, DETACH, PAUSE, RESUME, STATS, DISK_INFO):
        expect_error(tapdisk, errno.EINVAL, type_, 9, params("aio:/nonexistent"))


def test_detach_of_last_vbd_exits(run_dir: str, tapdisk: Tapdisk) -> None:
    allocate_marker(run_dir, 0)
    assert one(tapdisk, ATTACH, 0)[0] == ATTACH_RSP
    assert one(tapdisk, DETACH, 0)[0] == DETACH_RSP
    assert tapdisk.wait_exit()
    assert not os.path.exists(tapdisk.ctl)


@pytest.fixture
def image(run_dir: str) -> str:
    path = os.path.join(run_dir, "disk.raw")
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    return path


def attach_open(run_dir: str, td: Tapdisk, minor: int, spec: str, flags: int = 0) -> bytes:
    allocate_marker(run_dir, minor)
    assert one(td, ATTACH, minor)[0] == ATTACH_RSP
    t, u = one(td, OPEN, minor, params(spec, flags))
    assert t == OPEN_RSP, (t, error_of(u))
    return u


def test_open_errors(run_dir: str, tapdisk: Tapdisk, image: str) -> None:
    allocate_marker(run_dir, 2)
    assert one(tapdisk, ATTACH, 2)[0] == ATTACH_RSP
    expect_error(tapdisk, errno.ENOENT, OPEN, 2, params(f"nosuchtype:{image}"))
    expect_error(tapdisk, errno.ENOENT, OPEN, 2, params("aio:/nonexistent/disk"))
    expect_error(tapdisk, errno.EINVAL, OPEN, 2, params("no-colon"))
    # The VBD is still attached and never opened, and can be opened properly afterwards.
    assert list_entries(tapdisk)[0] == (1, 2, 0, "")
    assert one(tapdisk, OPEN, 2, params(f"aio:{image}"))[0] == OPEN_RSP


def test_lifecycle(run_dir: str, tapdisk: Tapdisk, image: str) -> None:
    u = attach_open(run_dir, tapdisk, 3, f"aio:{image}", NO_O_DIRECT)
    sectors, sector_size, _info = struct.unpack_from("<QII", u)
    assert (sectors, sector_size) == ((8 << 20) // 512, 512)
    nbd = os.path.join(run_dir, f"nbd{tapdisk.pid}.3")
    assert stat.S_ISSOCK(os.stat(nbd).st_mode)
    assert list_entries(tapdisk) == [(1, 3, 0, f"aio:{image}"), (0, -1, 0, "")]

    t, u = one(tapdisk, DISK_INFO, 3)
    assert t == DISK_INFO_RSP and struct.unpack_from("<QI", u) == (sectors, 512)

    replies = exchange(tapdisk.ctl, message(STATS, 3))
    t, c = struct.unpack_from("<HH", replies)
    length = struct.unpack_from("<Q", replies, 8 + 8)[0]
    assert (t, c) == (STATS_RSP, 3)
    body = replies[MESSAGE_SIZE:]
    assert len(body) == length
    stats = json.loads(body)
    assert stats["name"] == f"aio:{image}"
    assert stats["images"][0]["driver"]["name"] == "aio"
    assert {"secs", "reqs_outstanding", "read_caching"} <= set(stats)

    assert one(tapdisk, PAUSE, 3)[0] == PAUSE_RSP
    assert list_entries(tapdisk)[0][2] == 0x2a
    assert one(tapdisk, RESUME, 3, params(""))[0] == RESUME_RSP
    assert list_entries(tapdisk)[0][2] == 0

    expect_error(tapdisk, errno.EBUSY, DETACH, 3)
    assert one(tapdisk, CLOSE, 3)[0] == CLOSE_RSP
    assert not os.path.exists(nbd)
    # CLOSE forgets the image name, as the C tapdisk (it frees vbd->name).
    assert list_entries(tapdisk)[0] == (1, 3, 0x2, "")
    assert one(tapdisk, DETACH, 3)[0] == DETACH_RSP
    assert tapdisk.wait_exit()


def test_force_shutdown_closes(run_dir: str, tapdisk: Tapdisk, image: str) -> None:
    attach_open(run_dir, tapdisk, 4, f"aio:{image}", NO_O_DIRECT)
    assert one(tapdisk, FORCE_SHUTDOWN, 4)[0] == CLOSE_RSP
    assert list_entries(tapdisk)[0][2] == 0x2


def test_resume_with_a_different_size_is_emediumtype(
        run_dir: str, tapdisk: Tapdisk, image: str) -> None:
    other = os.path.join(run_dir, "other.raw")
    with open(other, "wb") as f:
        f.truncate(4 << 20)
    attach_open(run_dir, tapdisk, 6, f"aio:{image}", NO_O_DIRECT)
    assert one(tapdisk, PAUSE, 6)[0] == PAUSE_RSP
    expect_error(tapdisk, errno.EMEDIUMTYPE, RESUME, 6, params(f"aio:{other}"))
    assert one(tapdisk, RESUME, 6, params(f"aio:{image}"))[0] == RESUME_RSP
    assert list_entries(tapdisk)[0][2] == 0


def test_read_only_open_changes_nothing(run_dir: str, tapdisk: Tapdisk, image: str) -> None:
    with open(image, "r+b") as f:
        f.write(b"x" * 4096)
    os.utime(image, (1_000_000_000, 1_000_000_000))
    before = os.stat(image)
    attach_open(run_dir, tapdisk, 7, f"aio:{image}", RDONLY)
    assert one(tapdisk, CLOSE, 7)[0] == CLOSE_RSP
    after = os.stat(image)
    assert (after.st_mtime_ns, after.st_atime_ns, after.st_size) == (
        before.st_mtime_ns, before.st_atime_ns, before.st_size)


def test_close_of_a_paused_vbd_fails_the_waiting_io(
        run_dir: str, tapdisk: Tapdisk, image: str) -> None:
    attach_open(run_dir, tapdisk, 8, f"aio:{image}", NO_O_DIRECT)
    assert one(tapdisk, PAUSE, 8)[0] == PAUSE_RSP
    uri = f"nbd+unix:///?socket={run_dir}/nbd{tapdisk.pid}.8"
    reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read 0 4096", uri],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        assert reader.poll() is None  # waiting for the resume
        # Answered without waiting for a resume (exchange gives up after 10 s).
        assert one(tapdisk, CLOSE, 8)[0] == CLOSE_RSP
        out, _ = reader.communicate(timeout=10)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert "read failed" in out.lower() or reader.returncode != 0, out
    assert list_entries(tapdisk)[0][2] == 0x2
    assert tapdisk.alive()


def test_foreground_logs_carry_minor_and_image(run_dir: str, image: str) -> None:
    log_path = os.path.join(run_dir, "tapdisk.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([TAPDISK, "-D"], stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        ctl = proc.stdout.readline().decode().strip()
        assert ctl == os.path.join(run_dir, f"ctl{proc.pid}")
        td = Tapdisk(proc.pid, ctl)
        attach_open(run_dir, td, 0, f"aio:{image}", NO_O_DIRECT)
        assert one(td, CLOSE, 0)[0] == CLOSE_RSP
        assert one(td, DETACH, 0)[0] == DETACH_RSP
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    with open(log_path) as f:
        lines = f.read().splitlines()
    opened = [line for line in lines if "opened" in line]
    assert opened and f"[minor=0 aio:{image}]" in opened[0], lines
