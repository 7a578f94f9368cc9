"""The changed-block log served over NBD as ``qemu:dirty-bitmap:<name>``, seen by real
clients: nbdinfo (``--list``, ``--content``, ``--map=CONTEXT``), qemu-img map with
qemu's ``x-dirty-bitmap`` option, libnbd (a connection kept open across ``tap-ctl
unpause -c``), and the incremental backup a client makes from the context alone.

The VBDs are ``tap-ctl create -C LOG`` tapdisks (helpers of tests/system/test_cbt.py).
The bitmap is named after the log file without ``.cbtlog`` (the storage manager's
``<vdi-uuid>.cbtlog`` gives the VDI's uuid).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.proto.cbt import HEADER_SIZE
from tests.system.test_cbt import (
    BLOCK,
    SIZE,
    apply_from_export,
    client_writes,
    create,
    destroy,
    fio_writes,
    full_copy,
    logged,
    make_image,
    new_log,
    run,
    same_disk,
    sock,
    tapctl,
    uri,
)
from tests.system.test_tap_ctl import assert_clean

nbd = pytest.importorskip("nbd")

TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "fio")
_missing = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"tools missing: {', '.join(_missing)}")

PREFIX = "qemu:dirty-bitmap:"


@pytest.fixture
def clean_dir(run_dir: str) -> Iterator[str]:
    """``run_dir`` that must be clean at the end: no tapdisk, socket or marker."""
    yield run_dir
    assert_clean(run_dir)


def uuid_log(tmp_path: Path) -> tuple[str, str]:
    """A new log named as the storage manager names it: (path, bitmap name)."""
    name = str(uuid.uuid4())
    return new_log(tmp_path / f"{name}.cbtlog"), name


def nbdinfo_map(target: str, context: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map=CONTEXT --json``: (offset, length, flags) of each extent."""
    out = run("nbdinfo", f"--map={context}", "--json", target).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def dirty_blocks(extents: list[tuple[int, int, int]], size: int = SIZE) -> set[int]:
    """The blocks the extents call dirty (flag 1), after checking that they tile the
    export in order and that every boundary is a block boundary or the export's end."""
    out: set[int] = set()
    pos = 0
    for offset, length, flags in extents:
        assert offset == pos and length > 0, extents
        assert flags in (0, 1), extents
        end = offset + length
        assert end % BLOCK == 0 or end == size, extents
        if flags:
            out.update(range(offset // BLOCK, -(-end // BLOCK)))
        pos = end
    assert pos == size
    return out


@pytest.mark.parametrize("kind", ["aio", "vhd"])
def test_nbdinfo_map_names_exactly_the_changed_blocks(clean_dir: str, tmp_path: Path,
                                                      kind: str) -> None:
    img = make_image(kind, tmp_path / f"disk.{kind}")
    log, name = uuid_log(tmp_path)
    pid, minor, _ = create(kind, img, log)
    try:
        target = uri(clean_dir, pid, minor)
        assert dirty_blocks(nbdinfo_map(target, PREFIX + name)) == set()
        expected = client_writes(target)
        expected |= fio_writes(tmp_path, "--ioengine=nbd", f"--uri={target}",
                               offset=40 << 20, size=8 << 20)
        assert dirty_blocks(nbdinfo_map(target, PREFIX + name)) == expected
        assert logged(log) == expected
        # The allocation context is still served beside it.
        alloc = nbdinfo_map(target, "base:allocation")
        assert sum(length for _, length, _ in alloc) == SIZE
        # A bitmap of another name is not offered: nbdinfo refuses to map it.
        other = subprocess.run(["nbdinfo", f"--map={PREFIX}other", target],
                               capture_output=True, timeout=60)
        assert other.returncode != 0
    finally:
        destroy(pid, minor)


def test_list_and_content_show_the_context_only_with_a_log(clean_dir: str,
                                                           tmp_path: Path) -> None:
    img = make_image("aio", tmp_path / "disk.raw")
    log, name = uuid_log(tmp_path)
    pid, minor, _ = create("aio", img, log)
    plain = make_image("aio", tmp_path / "plain.raw")
    pid2, minor2, _ = create("aio", plain, None)
    try:
        target = uri(clean_dir, pid, minor)
        listing = json.loads(run("nbdinfo", "--list", "--json", target).stdout)
        (export,) = listing["exports"]
        assert export["contexts"] == ["base:allocation", PREFIX + name]
        content = run("nbdinfo", "--content", target).stdout.decode()
        assert f"\t\t{PREFIX}{name}\n" in content
        without = json.loads(run("nbdinfo", "--json", uri(clean_dir, pid2, minor2)).stdout)
        (export,) = without["exports"]
        assert export["contexts"] == ["base:allocation"]
    finally:
        destroy(pid, minor)
        destroy(pid2, minor2)


def test_qemu_img_map_with_x_dirty_bitmap(clean_dir: str, tmp_path: Path) -> None:
    """qemu reads the context's flags as base:allocation's (flag 1 is NBD_STATE_HOLE), so
    ``qemu-img map`` shows the dirty ranges as ``"data": false, "present": false`` and
    the clean ones as ``"data": true``."""
    img = make_image("aio", tmp_path / "disk.raw")
    log, name = uuid_log(tmp_path)
    pid, minor, _ = create("aio", img, log)
    try:
        target = uri(clean_dir, pid, minor)
        expected = client_writes(target)
        opts = (f"driver=nbd,server.type=unix,server.path={sock(clean_dir, pid, minor)},"
                f"x-dirty-bitmap={PREFIX}{name}")
        out = run("qemu-img", "map", "--output=json", "--image-opts", opts).stdout
        entries = json.loads(out)
        extents = []
        for e in entries:
            assert e["data"] == e["present"] and e["zero"] is False, e
            extents.append((e["start"], e["length"], 0 if e["data"] else 1))
        # qemu merges neighbours alike, so boundaries fall between dirty and clean runs.
        assert dirty_blocks(extents) == expected
        assert all(a[2] != b[2] for a, b in itertools.pairwise(extents))
        # Without the option, the same export maps allocation as usual (data, zeroes).
        plain = json.loads(run("qemu-img", "map", "--output=json", "--image-opts",
                               opts.rsplit(",", 1)[0]).stdout)
        assert any(e["data"] for e in plain) and any(e["zero"] for e in plain)
    finally:
        destroy(pid, minor)


def test_incremental_backup_from_the_context_alone(clean_dir: str, tmp_path: Path) -> None:
    """Full copy; writes; copy only what the context reports onto the full copy: the
    disk, byte for byte. Done twice, the second time onto a new log of the same name
    after ``tap-ctl pause`` / ``unpause -c`` (the storage manager's CBT snapshot)."""
    img = make_image("vhd", tmp_path / "disk.vhd")
    log, name = uuid_log(tmp_path)
    pid, minor, _ = create("vhd", img, log)
    try:
        target = uri(clean_dir, pid, minor)
        copy = tmp_path / "backup.raw"
        full_copy(target, copy)
        written = client_writes(target)
        written |= fio_writes(tmp_path, "--ioengine=nbd", f"--uri={target}",
                              offset=33 << 20, size=4 << 20, seed=7)
        changed = dirty_blocks(nbdinfo_map(target, PREFIX + name))
        assert changed == written
        apply_from_export(sock(clean_dir, pid, minor), changed, copy, tmp_path)
        same_disk(target, copy, tmp_path)

        # The snapshot: the old log moves aside, a new one of the same name takes over.
        tapctl("pause", "-p", str(pid), "-m", str(minor))
        Path(log).rename(tmp_path / "old.cbtlog")
        new_log(Path(log))
        tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", log)
        assert dirty_blocks(nbdinfo_map(target, PREFIX + name)) == set()
        again = fio_writes(tmp_path, "--ioengine=nbd", f"--uri={target}",
                           offset=50 << 20, size=2 << 20, seed=9)
        changed = dirty_blocks(nbdinfo_map(target, PREFIX + name))
        assert changed == again
        apply_from_export(sock(clean_dir, pid, minor), changed, copy, tmp_path)
        same_disk(target, copy, tmp_path)
    finally:
        destroy(pid, minor)


def _status(h: object, length: int, offset: int, flags: int = 0) -> dict[str, list[int]]:
    """libnbd block_status: context -> its flat [length, flags, ...] list."""
    seen: dict[str, list[int]] = {}

    def cb(context: str, offset_: int, entries: list[int], err: object) -> int:
        seen[context] = list(entries)
        return 0

    h.block_status(length, offset, cb, flags)  # type: ignore[attr-defined]
    return seen


def test_a_connection_follows_unpause_c(clean_dir: str, tmp_path: Path) -> None:
    """One libnbd connection, both contexts: REQ_ONE gives one extent per context; after
    pause / unpause -c onto a new log of the same name, the same connection reads the new
    log; after unpause -c onto a log of another name, its requests fail (EIO) and a new
    connection offers the new name."""
    img = make_image("aio", tmp_path / "disk.raw")
    log, name = uuid_log(tmp_path)
    pid, minor, _ = create("aio", img, log)
    h = nbd.NBD()
    try:
        h.add_meta_context("base:allocation")
        h.add_meta_context(PREFIX + name)
        h.connect_uri(uri(clean_dir, pid, minor))
        assert h.can_meta_context(PREFIX + name) and h.can_meta_context("base:allocation")
        h.pwrite(b"x" * 4096, 3 * BLOCK + 100)
        h.pwrite(b"y" * (2 * BLOCK), 6 * BLOCK)
        seen = _status(h, 10 * BLOCK, BLOCK)
        assert seen[PREFIX + name] == [2 * BLOCK, 0, BLOCK, 1, 2 * BLOCK, 0, 2 * BLOCK, 1,
                                       3 * BLOCK, 0]
        assert sum(seen["base:allocation"][0::2]) <= 10 * BLOCK
        # REQ_ONE: one extent, clipped to the request.
        seen = _status(h, 1000, 3 * BLOCK + 5, nbd.CMD_FLAG_REQ_ONE)
        assert seen[PREFIX + name] == [1000, 1]
        assert len(seen["base:allocation"]) == 2

        tapctl("pause", "-p", str(pid), "-m", str(minor))
        Path(log).rename(tmp_path / "old.cbtlog")
        new_log(Path(log))
        tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", log)
        assert _status(h, 10 * BLOCK, BLOCK)[PREFIX + name] == [10 * BLOCK, 0]
        h.pwrite(b"z", 9 * BLOCK)
        assert _status(h, 2 * BLOCK, 8 * BLOCK)[PREFIX + name] == [BLOCK, 0, BLOCK, 1]

        other = new_log(tmp_path / "renamed.cbtlog")
        tapctl("pause", "-p", str(pid), "-m", str(minor))
        tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", other)
        with pytest.raises(nbd.Error) as info:
            _status(h, BLOCK, 0)
        assert info.value.errnum == 5  # EIO
        h.pread(512, 0)  # the connection still serves
        fresh = json.loads(run("nbdinfo", "--json", uri(clean_dir, pid, minor)).stdout)
        assert fresh["exports"][0]["contexts"] == ["base:allocation", PREFIX + "renamed"]
    finally:
        del h  # closes the connection
        destroy(pid, minor)


def test_many_extents_over_several_replies_and_bits_from_before_the_open(
        clean_dir: str, tmp_path: Path) -> None:
    """A log whose every other block was marked before the VBD opened it (a log kept
    across a restart), on a 512 MiB disk: 8192 alternating extents, more than one reply
    may carry (4096); nbdinfo asks again and gets every one."""
    size = 512 << 20
    img = tmp_path / "big.raw"
    with open(img, "wb") as f:
        f.truncate(size)
    name = str(uuid.uuid4())
    log = new_log(tmp_path / f"{name}.cbtlog", size)
    with open(log, "r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(b"\x55" * (size // BLOCK // 8))  # blocks 0, 2, 4, ...
    pid, minor, _ = create("aio", str(img), log)
    try:
        extents = nbdinfo_map(uri(clean_dir, pid, minor), PREFIX + name)
        assert len(extents) == size // BLOCK
        assert dirty_blocks(extents, size) == set(range(0, size // BLOCK, 2))
    finally:
        destroy(pid, minor)


def test_unpause_c_adds_the_context_for_new_connections(clean_dir: str,
                                                        tmp_path: Path) -> None:
    """A VBD opened without a log offers no bitmap; ``unpause -c`` adds one: connections
    made after it offer the context, one made before it still has none."""
    img = make_image("aio", tmp_path / "disk.raw")
    pid, minor, _ = create("aio", img, None)
    target = uri(clean_dir, pid, minor)
    h = nbd.NBD()
    try:
        h.add_meta_context(PREFIX + "late")
        h.connect_uri(target)
        assert not h.can_meta_context(PREFIX + "late")
        tapctl("pause", "-p", str(pid), "-m", str(minor))
        log = new_log(tmp_path / "late.cbtlog")
        tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", log)
        listing = json.loads(run("nbdinfo", "--json", target).stdout)
        assert listing["exports"][0]["contexts"] == ["base:allocation", PREFIX + "late"]
        assert dirty_blocks(nbdinfo_map(target, PREFIX + "late")) == set()
        h.pwrite(b"w" * 512, 7 * BLOCK)  # the old connection's write is logged too
        assert dirty_blocks(nbdinfo_map(target, PREFIX + "late")) == {7}
        assert not h.can_meta_context(PREFIX + "late")
    finally:
        del h
        destroy(pid, minor)
