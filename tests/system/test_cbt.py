"""Changed block tracking end to end: ``tap-ctl create -C``, ``unpause -c``, ``cbt-util``
and the incremental backup they exist for.

The backup workflow, on raw and VHD images, through the VBD's NBD socket and through its
kernel block device: a full copy of the disk; a log (``cbt-util create``); the VBD opened
with it; a client writes (qemu-io: writes, unaligned writes, write-zeroes, discard; fio:
random 4 KiB writes, logged with ``--write_iolog``); ``cbt-util get -b`` must name exactly
the 64 KiB blocks those requests touched; copying only those blocks from the export
(``qemu-img convert`` of a raw window per run of blocks) onto the full copy must give the
disk byte for byte. Then what must keep every bit: pause/unpause, unpause onto a new log,
a tapdisk restart, kill -9, and the storage manager's VHD snapshot sequence (``cbt-util
set -p/-c`` chaining the logs, ``coalesce`` merging them). And what is better than the C
filter: once a flush (or a FUA write) is answered, the log's pages holding its bits are
no longer dirty in the page cache: they were written to the disk, not merely left to the
kernel's writeback (read from /proc/<pid>/pagemap and /proc/kpageflags).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from blktap.control import Control, OpenOptions
from tests.compat.test_sm_blktap2 import (
    find,
    launch,
    pause,
    shutdown,
    stats,
    unpause,
)
from tests.helpers import (
    BIN,
    TAP_CTL,
    VHD_UTIL,
    Tapdisk,
    allocate_marker,
    error_of,
    exchange,
    host_block_device_support,
    message,
    params,
    split_messages,
)
from tests.nbd_helpers import RawClient, request
from tests.system.test_tap_ctl import assert_clean, parse_list, qemu_io

CBT_UTIL = str(BIN / "cbt-util")
BLOCK = 64 << 10
MiB = 1 << 20
SIZE = 64 * MiB
SIZE_MB = SIZE // MiB

TOOLS = ("qemu-io", "qemu-img", "nbdcopy", "fio", "blkdiscard")
_missing = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"tools missing: {', '.join(_missing)}")

_blockdev_ok, _blockdev_why = host_block_device_support()
needs_blockdev = pytest.mark.skipif(not _blockdev_ok,
                                    reason=f"no FUSE+loop block device here: {_blockdev_why}")

# The client's requests: (offset, length) of each write. Aligned and unaligned writes,
# one crossing a block boundary, a long one, the last sector; then write-zeroes and a
# discard, which mark their blocks too.
WRITES = [(0, 4096), (BLOCK, 512), (1048064, 1024), (10 * MiB, 3 * MiB), (SIZE - 512, 512),
          (5 * MiB + 100, 1000)]
ZEROES = [(20 * MiB, MiB)]
DISCARDS = [(30 * MiB, 128 << 10)]


# --------------------------------------------------------------------------- helpers


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(args, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr.decode())
    return proc


def tapctl(*args: str) -> str:
    return run(TAP_CTL, *args).stdout.decode()


def cbt(*args: str) -> bytes:
    return run(CBT_UTIL, *args).stdout


def new_log(path: Path, size: int = SIZE) -> str:
    cbt("create", "-n", str(path), "-s", str(size))
    return str(path)


def logged(log: str) -> set[int]:
    """The blocks ``cbt-util get -b`` names."""
    bitmap = cbt("get", "-n", log, "-b")
    return {i * 8 + b for i, byte in enumerate(bitmap) if byte for b in range(8)
            if byte >> b & 1}


def blocks(requests: Iterable[tuple[int, int]]) -> set[int]:
    """The 64 KiB blocks that ``(offset, length)`` requests touch."""
    out: set[int] = set()
    for offset, length in requests:
        out.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
    return out


def make_image(kind: str, path: Path) -> str:
    """A disk of SIZE with data in it (so that a copy has something to get wrong)."""
    if kind == "vhd":
        run(VHD_UTIL, "create", "-n", str(path), "-s", str(SIZE_MB))
    else:
        with open(path, "wb") as f:
            f.truncate(SIZE)
            for i in range(0, SIZE, 4 * MiB):
                f.seek(i + 12345)
                f.write(os.urandom(70000))
    return str(path)


def create(kind: str, img: str, log: str | None, *flags: str) -> tuple[int, int, str]:
    """``tap-ctl create -a KIND:IMG [-C LOG]``: (pid, minor, printed device)."""
    extra = ["-C", log] if log is not None else []
    device = tapctl("create", "-a", f"{kind}:{img}", *extra, *flags).strip()
    (entry,) = [e for e in parse_list(tapctl("list")) if e.get("args") == f"{kind}:{img}"]
    return int(entry["pid"]), int(entry["minor"]), device


def sock(run_dir: str, pid: int, minor: int) -> str:
    return f"{run_dir}/nbd{pid}.{minor}"


def uri(run_dir: str, pid: int, minor: int) -> str:
    return f"nbd+unix:///?socket={sock(run_dir, pid, minor)}"


def full_copy(source: str, dest: Path) -> None:
    """The whole disk from the NBD export ``source`` into the raw file ``dest``."""
    run("nbdcopy", source, str(dest))
    assert dest.stat().st_size == SIZE


def client_writes(target: str) -> set[int]:
    """qemu-io's writes, zeroes and discards on the export; the blocks they touch."""
    cmds = [f"write -P 0x{(i * 37 + 11) & 0xFF:02x} {o} {n}" for i, (o, n) in enumerate(WRITES)]
    cmds += [f"write -z {o} {n}" for o, n in ZEROES]
    cmds += [f"discard {o} {n}" for o, n in DISCARDS]
    qemu_io(target, *cmds)
    return blocks(WRITES + ZEROES + DISCARDS)


def fio_writes(tmp_path: Path, *target: str, offset: int, size: int, ios: int = 64,
               seed: int = 1) -> set[int]:
    """fio's random 4 KiB writes at QD8 in ``[offset, offset+size)`` (``target`` is
    ``--ioengine=nbd --uri=...`` or a device); the blocks its I/O log says it wrote."""
    iolog = tmp_path / f"fio-{seed}-{offset}.iolog"
    run("fio", "--name=cbt", *target, "--rw=randwrite", "--bs=4k", "--iodepth=8",
        f"--offset={offset}", f"--size={size}", f"--number_ios={ios}",
        f"--randseed={seed}", f"--write_iolog={iolog}", "--output-format=json")
    written = []
    for line in iolog.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[-3] == "write":
            written.append((int(fields[-2]), int(fields[-1])))
    assert written, iolog.read_text()
    return blocks(written)


def runs(wanted: set[int]) -> list[tuple[int, int]]:
    """Sorted blocks as (first, count) runs of consecutive blocks."""
    out: list[tuple[int, int]] = []
    for b in sorted(wanted):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def apply_from_export(socket_path: str, changed: set[int], copy: Path, tmp_path: Path) -> None:
    """Incremental backup: read only the ``changed`` blocks from the NBD export on
    ``socket_path`` (one ``qemu-img convert`` of a raw window per run of blocks) and write
    them into ``copy`` at their offsets."""
    piece = tmp_path / "piece.raw"
    with open(copy, "r+b") as out:
        for first, count in runs(changed):
            window = {"driver": "raw", "offset": first * BLOCK, "size": count * BLOCK,
                      "file": {"driver": "nbd",
                               "server": {"type": "unix", "path": socket_path}}}
            piece.unlink(missing_ok=True)
            run("qemu-img", "convert", "-f", "raw", "-O", "raw",
                "json:" + json.dumps(window), str(piece))
            data = piece.read_bytes()
            assert len(data) == count * BLOCK
            out.seek(first * BLOCK)
            out.write(data)


def apply_from_device(device: str, changed: set[int], copy: Path) -> None:
    """Incremental backup from the block device: pread each run of changed blocks."""
    fd = os.open(device, os.O_RDONLY)
    try:
        with open(copy, "r+b") as out:
            for first, count in runs(changed):
                data = os.pread(fd, count * BLOCK, first * BLOCK)
                assert len(data) == count * BLOCK
                out.seek(first * BLOCK)
                out.write(data)
    finally:
        os.close(fd)


def same_disk(source: str, copy: Path, tmp_path: Path) -> None:
    """``copy`` holds exactly what the export ``source`` serves (a fresh full read)."""
    now = tmp_path / "now.raw"
    now.unlink(missing_ok=True)
    full_copy(source, now)
    assert now.read_bytes() == copy.read_bytes()


def destroy(pid: int, minor: int) -> None:
    tapctl("destroy", "-p", str(pid), "-m", str(minor))


@pytest.fixture
def cbt_run_dir(run_dir: str) -> Iterator[str]:
    """``run_dir`` that must be clean at the end: no tapdisk, socket or marker."""
    yield run_dir
    fuse = os.path.join(run_dir, "fuse")  # the block device frontend's mount point
    if os.path.isdir(fuse) and not os.listdir(fuse):
        os.rmdir(fuse)
    assert_clean(run_dir)


# ------------------------------------------------------------------ backup over NBD


@pytest.mark.parametrize("kind", ["aio", "vhd"])
def test_backup_workflow_over_nbd(cbt_run_dir: str, tmp_path: Path, kind: str) -> None:
    img = make_image(kind, tmp_path / f"disk.{kind}")
    log = new_log(tmp_path / "disk.cbtlog")
    pid, minor, _ = create(kind, img, log)
    try:
        source = uri(cbt_run_dir, pid, minor)
        copy = tmp_path / "backup.raw"
        full_copy(source, copy)
        assert logged(log) == set()  # reading marks nothing

        expected = client_writes(source)
        expected |= fio_writes(tmp_path, "--ioengine=nbd", f"--uri={source}",
                               offset=32 * MiB, size=16 * MiB)
        assert logged(log) == expected

        apply_from_export(sock(cbt_run_dir, pid, minor), logged(log), copy, tmp_path)
        same_disk(source, copy, tmp_path)

        # tap-ctl as with the C tapdisk: list shows the image only; stats lists the log
        # first among the images.
        (entry,) = parse_list(tapctl("list"))
        assert entry["args"] == f"{kind}:{img}"
        doc = json.loads(tapctl("stats", "-p", str(pid), "-m", str(minor)))
        assert doc["name"] == f"{kind}:{img}"
        assert [i["name"] for i in doc["images"]] == [log, img]
        assert doc["images"][0]["driver"] == {"type": 9, "name": "log", "status": 0}
        assert doc["images"][1]["hits"][1] > 0
        (listed,) = json.loads(tapctl("list", "--json"))
        assert (listed["chain"], listed["cbt_log"]) == ([img], log)
    finally:
        destroy(pid, minor)
    # The header is the storage manager's: the filter never changes it.
    assert cbt("get", "-n", log, "-f") == b"0\n"
    assert cbt("get", "-n", log, "-s") == f"{SIZE}\n".encode()


@needs_blockdev
@pytest.mark.parametrize("kind", ["aio", "vhd"])
def test_backup_workflow_through_the_block_device(
        cbt_run_dir: str, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTAP_BLOCKDEV", "on")
    img = make_image(kind, tmp_path / f"disk.{kind}")
    log = new_log(tmp_path / "disk.cbtlog")
    pid, minor, device = create(kind, img, log)
    try:
        assert os.path.realpath(device).startswith("/dev/loop")
        copy = tmp_path / "backup.raw"
        with open(device, "rb") as f, open(copy, "wb") as out:
            shutil.copyfileobj(f, out, 4 * MiB)
        assert logged(log) == set()

        pattern = tmp_path / "pattern"
        pattern.write_bytes(os.urandom(3 * BLOCK))
        run("dd", f"if={pattern}", f"of={device}", "bs=4096", "seek=100", "oflag=direct",
            "conv=notrunc,fsync", "status=none")  # 192 KiB at 400 KiB: blocks 6..9
        expected = blocks([(100 * 4096, 3 * BLOCK)])
        expected |= fio_writes(tmp_path, "--ioengine=libaio", "--direct=1",
                               f"--filename={device}", offset=40 * MiB, size=8 * MiB)
        run("blkdiscard", "-o", str(50 * MiB), "-l", str(256 << 10), device)
        expected |= blocks([(50 * MiB, 256 << 10)])
        assert logged(log) == expected

        apply_from_device(device, logged(log), copy)
        with open(device, "rb") as f:
            assert f.read() == copy.read_bytes()
    finally:
        destroy(pid, minor)


@needs_blockdev
def test_unpause_c_under_fuse_passthrough_is_refused_and_leaves_the_vbd_usable(
        cbt_run_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw VBD whose block device the kernel serves by FUSE passthrough cannot take a
    log at resume (the kernel writes the file past every layer): unpause -c fails with
    EBUSY and says why; the VBD stays paused without the log, so a plain unpause works
    and the log is left untouched."""
    monkeypatch.setenv("BLKTAP_BLOCKDEV", "on")
    monkeypatch.setenv("BLKTAP_FUSE_PASSTHROUGH", "on")  # read-write devices too
    img = make_image("aio", tmp_path / "disk.raw")
    pid, minor, device = create("aio", img, None)
    try:
        doc = json.loads(tapctl("stats", "-p", str(pid), "-m", str(minor)))
        blockdev = doc.get("blockdev", {})
        if blockdev.get("io_path") != "passthrough":
            # Only a kernel without the feature may skip this (the reason says so).
            assert "kernel" in blockdev.get("passthrough_reason", ""), blockdev
            pytest.skip(f"no FUSE passthrough here: {blockdev.get('passthrough_reason')}")
        tapctl("pause", "-p", str(pid), "-m", str(minor))
        log = new_log(tmp_path / "late.cbtlog")
        proc = subprocess.run([TAP_CTL, "unpause", "-p", str(pid), "-m", str(minor), "-c", log],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 16 and "passthrough" in proc.stderr.lower(), proc.stderr
        (entry,) = parse_list(tapctl("list"))
        assert entry["state"] == "0x2a"
        tapctl("unpause", "-p", str(pid), "-m", str(minor))
        run("dd", "if=/dev/zero", f"of={device}", "bs=4096", "count=1", "oflag=direct",
            "conv=notrunc,fsync", "status=none")
        assert logged(log) == set()
    finally:
        destroy(pid, minor)


# ------------------------------------------------------ what must keep every bit


def test_pause_unpause_new_log_and_restart_keep_every_bit(cbt_run_dir: str,
                                                          tmp_path: Path) -> None:
    img = make_image("aio", tmp_path / "disk.raw")
    log = new_log(tmp_path / "a.cbtlog")
    pid, minor, _ = create("aio", img, log)
    source = uri(cbt_run_dir, pid, minor)
    copy = tmp_path / "backup.raw"
    full_copy(source, copy)
    first = client_writes(source)
    assert logged(log) == first

    # pause/unpause without -c: the same log, every bit kept, new writes marked.
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    assert logged(log) == first
    tapctl("unpause", "-p", str(pid), "-m", str(minor))
    second = fio_writes(tmp_path, "--ioengine=nbd", f"--uri={source}", offset=40 * MiB,
                        size=8 * MiB, seed=2)
    assert logged(log) == first | second

    # unpause -c: later writes go to the new log only; the old one is left as it was.
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    log2 = new_log(tmp_path / "b.cbtlog")
    tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", log2)
    third = fio_writes(tmp_path, "--ioengine=nbd", f"--uri={source}", offset=48 * MiB,
                       size=8 * MiB, seed=3)
    assert logged(log) == first | second
    assert logged(log2) == third
    doc = json.loads(tapctl("stats", "-p", str(pid), "-m", str(minor)))
    assert doc["images"][0]["name"] == log2
    # a later plain unpause keeps the new log (as the C tapdisk keeps its logpath)
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    tapctl("unpause", "-p", str(pid), "-m", str(minor))
    fourth = blocks([(56 * MiB, 4096)])
    qemu_io(source, f"write -P 0x44 {56 * MiB} 4096")
    assert logged(log2) == third | fourth
    destroy(pid, minor)

    # a tapdisk restart on the same log: the bits are still there, new ones join them.
    pid, minor, _ = create("aio", img, log2)
    source = uri(cbt_run_dir, pid, minor)
    fifth = blocks([(60 * MiB, 8192)])
    qemu_io(source, f"write -P 0x55 {60 * MiB} 8192")
    assert logged(log2) == third | fourth | fifth
    cbt("coalesce", "-p", log, "-c", log2)
    assert logged(log2) == first | second | third | fourth | fifth
    apply_from_export(sock(cbt_run_dir, pid, minor), logged(log2), copy, tmp_path)
    same_disk(source, copy, tmp_path)
    destroy(pid, minor)


def test_unpause_c_adds_a_log_to_a_vbd_opened_without_one(cbt_run_dir: str,
                                                          tmp_path: Path) -> None:
    """Enabling CBT on an attached disk: pause, create the log, unpause -c."""
    img = make_image("aio", tmp_path / "disk.raw")
    pid, minor, _ = create("aio", img, None)
    source = uri(cbt_run_dir, pid, minor)
    qemu_io(source, "write 0 4096")
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    log = new_log(tmp_path / "late.cbtlog")
    tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", log)
    qemu_io(source, f"write {7 * BLOCK} 4096")
    assert logged(log) == {7}
    destroy(pid, minor)


def test_control_library_opens_and_unpauses_with_a_log(cbt_run_dir: str,
                                                       tmp_path: Path) -> None:
    """The control library (what tap-ctl is built on): OpenOptions(log_path=...) and
    Control.unpause(log_path=...)."""
    ctl = Control()
    img = make_image("aio", tmp_path / "disk.raw")
    log1, log2 = new_log(tmp_path / "1.cbtlog"), new_log(tmp_path / "2.cbtlog")
    vbd = ctl.create(f"aio:{img}", OpenOptions(log_path=log1))
    try:
        target = uri(cbt_run_dir, vbd.pid, vbd.minor)
        qemu_io(target, f"write {9 * BLOCK} 512")
        ctl.pause(vbd.pid, vbd.minor)
        ctl.unpause(vbd.pid, vbd.minor, log_path=log2)
        qemu_io(target, f"write {11 * BLOCK} 512")
        assert (logged(log1), logged(log2)) == ({9}, {11})
        assert ctl.details(ctl.list()[0]).cbt_log == log2
    finally:
        ctl.destroy(vbd.pid, vbd.minor)


def test_kill_9_after_flushed_writes_keeps_their_bits(cbt_run_dir: str,
                                                      tmp_path: Path) -> None:
    img = make_image("vhd", tmp_path / "disk.vhd")
    log = new_log(tmp_path / "disk.cbtlog")
    pid, minor, _ = create("vhd", img, log)
    source = uri(cbt_run_dir, pid, minor)
    expected = client_writes(source)  # qemu-io flushes before it exits
    expected |= fio_writes(tmp_path, "--ioengine=nbd", f"--uri={source}", offset=40 * MiB,
                           size=16 * MiB, ios=200)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged(log) == expected
    # the dead tapdisk's minor and sockets: cleaned up by the run_dir fixture
    for name in os.listdir(cbt_run_dir):
        if name.startswith(("ctl", "nbd")):
            os.unlink(os.path.join(cbt_run_dir, name))
    marker = os.path.join(cbt_run_dir, "tapdisk", f"tapdisk-{minor}")
    if os.path.exists(marker):
        tapctl("free", "-m", str(minor))


# ------------------------------------------------- durability better than the C filter


def _dirty_pages(pid: int, path: str) -> list[bool] | None:
    """For each page of ``pid``'s mapping of ``path`` that is present: whether the page
    cache holds it dirty (KPF_DIRTY). None when the file is not mapped."""
    with open(f"/proc/{pid}/maps") as f:
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                  for line in f if line.rstrip().endswith(" " + path)]
    if not ranges:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    out = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        for start, end in ranges:
            for addr in range(start, end, page):
                pm.seek(addr // page * 8)
                (entry,) = struct.unpack("<Q", pm.read(8))
                if not entry >> 63:
                    continue  # not present
                pfn = entry & ((1 << 55) - 1)
                kf.seek(pfn * 8)
                (flags,) = struct.unpack("<Q", kf.read(8))
                out.append(bool(flags >> 4 & 1))
    return out


def _nbd_request(client: RawClient, cmd: int, cookie: int, offset: int = 0,
                 data: bytes = b"", flags: int = 0) -> None:
    client.sock.sendall(request(cmd, cookie, offset, len(data), flags) + data)
    magic, error, handle = struct.unpack(">IIQ", client.recv_exact(16))
    assert (magic, error, handle) == (0x67446698, 0, cookie)


@pytest.mark.skipif(not os.access("/proc/kpageflags", os.R_OK),
                    reason="/proc/kpageflags is not readable here")
@pytest.mark.parametrize("how", ["flush", "fua"])
def test_bits_are_on_disk_when_the_flush_or_fua_write_is_answered(
        cbt_run_dir: str, tmp_path: Path, how: str) -> None:
    """The C filter leaves its bits to the kernel's writeback (a host crash loses them);
    ours are written back (msync) before the flush, or the FUA write, is answered."""
    img = make_image("aio", tmp_path / "disk.raw")
    log = new_log(tmp_path / "disk.cbtlog")
    pid, minor, _ = create("aio", img, log)
    client = RawClient(f"{cbt_run_dir}/nbd{pid}.{minor}")
    try:
        client.handshake()
        seen_dirty = False
        for attempt in range(4):  # the kernel may write the page back on its own first
            block = 100 + 200 * attempt  # a bit in a byte no earlier write touched
            if how == "fua":
                _nbd_request(client, 1, attempt, block * BLOCK, b"\x77" * 4096, flags=1)
            else:
                _nbd_request(client, 1, attempt, block * BLOCK, b"\x77" * 4096)
                pages = _dirty_pages(pid, log)
                assert pages is not None and len(pages) >= 1
                seen_dirty |= any(pages)
                _nbd_request(client, 3, 1000 + attempt)
            pages = _dirty_pages(pid, log)
            assert pages is not None and not any(pages), (how, pages)
            assert block in logged(log)
            if how == "fua" or seen_dirty:
                break
        if how == "flush" and not seen_dirty:
            pytest.skip("the log's page was never seen dirty before a flush")
    finally:
        client.close()
        destroy(pid, minor)


# ------------------------------------------------------ the C tap-ctl's bytes


def _c_log_path(path: str) -> bytes:
    """The 256 bytes the C tap-ctl sends after an OPEN or RESUME with ADD_LOG: the path,
    its NUL, then whatever its stack buffer held (``snprintf`` into an uninitialised
    ``char[256]``)."""
    raw = path.encode() + b"\0"
    return raw + bytes((0xA5 + i) & 0xFF for i in range(256 - len(raw)))


def _ask(td: Tapdisk, data: bytes, reply_type: int) -> None:
    ((type_, _cookie, union),) = split_messages(exchange(td.ctl, data))
    assert type_ == reply_type, (type_, error_of(union))


def test_open_and_resume_with_add_log_as_the_c_tap_ctl_sends_them(
        run_dir: str, tapdisk: Tapdisk, tmp_path: Path) -> None:
    img = make_image("aio", tmp_path / "disk.raw")
    log1, log2 = new_log(tmp_path / "1.cbtlog"), new_log(tmp_path / "2.cbtlog")
    allocate_marker(run_dir, 0)
    add_log = 0x010
    _ask(tapdisk, message(5, 0), 6)  # ATTACH
    _ask(tapdisk, message(7, 0, params(f"aio:{img}", add_log)) + _c_log_path(log1), 8)
    target = uri(run_dir, tapdisk.pid, 0)
    qemu_io(target, f"write {3 * BLOCK} 4096")
    assert logged(log1) == {3}
    _ask(tapdisk, message(9, 0), 10)  # PAUSE
    _ask(tapdisk, message(11, 0, params("", add_log)) + _c_log_path(log2), 12)  # RESUME
    qemu_io(target, f"write {5 * BLOCK} 4096")
    assert (logged(log1), logged(log2)) == ({3}, {5})
    _ask(tapdisk, message(13, 0), 14)  # CLOSE
    _ask(tapdisk, message(15, 0), 16)  # DETACH


# ------------------------------------------------------------------ refusals


def test_open_refusals(cbt_run_dir: str, tmp_path: Path) -> None:
    img = make_image("aio", tmp_path / "disk.raw")
    cases = [
        ([str(tmp_path / "missing.cbtlog")], 2, "No such file"),  # ENOENT, as the C tapdisk
        ([new_log(tmp_path / "small.cbtlog", size=SIZE // 2)], 22, "bitmap"),
        ([new_log(tmp_path / "ok.cbtlog"), "-R"], 22, "writable"),
    ]
    for extra, status, text in cases:
        proc = subprocess.run([TAP_CTL, "create", "-a", f"aio:{img}", "-C", *extra],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == status, (extra, proc.returncode, proc.stderr)
        assert text.lower() in proc.stderr.lower(), proc.stderr
        assert parse_list(tapctl("list")) == []
    assert logged(str(tmp_path / "ok.cbtlog")) == set()

    # unpause -c on a read-only VBD: refused, and the VBD stays paused.
    pid, minor, _ = create("aio", img, None, "-R")
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    proc = subprocess.run([TAP_CTL, "unpause", "-p", str(pid), "-m", str(minor), "-c",
                           str(tmp_path / "ok.cbtlog")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 22 and "writable" in proc.stderr, proc.stderr
    (entry,) = parse_list(tapctl("list"))
    assert entry["state"] == "0x2a"
    tapctl("unpause", "-p", str(pid), "-m", str(minor))
    destroy(pid, minor)


# ------------------------------------------------ the storage manager's CBT sequence


def test_storage_manager_cbt_sequence_with_a_vhd_snapshot(cbt_run_dir: str,
                                                          tmp_path: Path) -> None:
    """As xapi-project/sm drives CBT on a file SR (VDI.py, blktap2.py, FileSR.py):

    enable (``_create_cbt_log``: create, flag 1); attach (``activate``: flag 0, then
    ``TapCtl.open ... -C LOG``); writes; snapshot (``_do_snapshot``: pause; the leaf
    becomes the hidden parent and a new leaf takes its name; ``_cbt_snapshot``: the log
    is renamed to the snapshot's, flagged 1, a new log is created for the VDI, flagged 0,
    and the two are chained with ``set -p``/``set -c``; ``TapCtl.unpause ... -a LEAF -c
    LOG``); more writes; detach (close, flag 1). The incremental backup between the
    full copy and now is the snapshot's log coalesced into the VDI's.
    """
    vdi_uuid, snap_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    zero = "00000000-0000-0000-0000-000000000000"
    leaf = tmp_path / f"{vdi_uuid}.vhd"
    run(VHD_UTIL, "create", "-n", str(leaf), "-s", str(SIZE_MB))
    log = tmp_path / f"{vdi_uuid}.cbtlog"
    new_log(log)
    cbt("set", "-n", str(log), "-f", "1")

    cbt("set", "-n", str(log), "-f", "0")
    tap = launch(cbt_run_dir, "vhd", str(leaf), {"rdonly": False, "cbtlog": str(log)})
    source = uri(cbt_run_dir, tap.pid, tap.minor)
    copy = tmp_path / "backup.raw"
    full_copy(source, copy)
    first = client_writes(source)
    assert logged(str(log)) == first
    assert stats(tap.pid, tap.minor)["images"][0]["name"] == str(log)

    pause(tap.pid, tap.minor)
    base = tmp_path / f"{snap_uuid}.vhd"
    os.rename(leaf, base)
    run(VHD_UTIL, "snapshot", "-n", str(leaf), "-p", str(base))
    snap_log = tmp_path / f"{snap_uuid}.cbtlog"
    os.rename(log, snap_log)
    cbt("set", "-n", str(snap_log), "-f", "1")
    assert cbt("get", "-n", str(snap_log), "-p").decode().strip() == zero
    new_log(log)
    cbt("set", "-n", str(log), "-f", "1")
    cbt("set", "-n", str(log), "-f", "0")  # the VDI was attached
    child = cbt("get", "-n", str(snap_log), "-c").decode().strip()
    cbt("set", "-n", str(log), "-p", snap_uuid)
    cbt("set", "-n", str(log), "-c", child)
    cbt("set", "-n", str(snap_log), "-c", vdi_uuid)
    unpause(tap.pid, tap.minor, "vhd", str(leaf), cbtlog=str(log))
    paused = find(minor=tap.minor)
    assert paused is not None and paused.path == str(leaf) and paused.is_running()

    second = fio_writes(tmp_path, "--ioengine=nbd", f"--uri={source}", offset=24 * MiB,
                        size=24 * MiB, ios=100)
    second |= blocks([(0, 512)])
    qemu_io(source, "write -P 0x99 0 512")
    assert logged(str(snap_log)) == first
    assert logged(str(log)) == second
    assert cbt("get", "-n", str(log), "-p").decode().strip() == snap_uuid
    assert cbt("get", "-n", str(snap_log), "-c").decode().strip() == vdi_uuid

    cbt("coalesce", "-p", str(snap_log), "-c", str(log))
    assert logged(str(log)) == first | second
    apply_from_export(sock(cbt_run_dir, tap.pid, tap.minor), logged(str(log)), copy,
                      tmp_path)
    same_disk(source, copy, tmp_path)

    shutdown(tap)
    cbt("set", "-n", str(log), "-f", "1")
    assert cbt("get", "-n", str(log), "-f") == b"1\n"
