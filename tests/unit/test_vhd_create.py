"""Images we create: laid out byte for byte as blktap's vhd-util lays them out, valid for
our checker, and read identically by the real peers (qemu-img/qemu-io, libvhdi)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.errors import InvalidArgument
from blktap.proto.vhd.constants import MAX_VHD_SIZE
from blktap.proto.vhd.footer import parse_footer
from blktap.proto.vhd.header import parse_header
from blktap.vhd import VhdFile, check_file, create_dynamic, create_fixed, snapshot
from tests.vhd_helpers import FIXTURES, chain_bytes, need, run, tool

MiB = 1024 * 1024
# Footer bytes that legitimately differ between two creations: timestamp, checksum, uuid.
FOOTER_VARIES = [*range(24, 28), *range(64, 84)]


def _masked(data: bytes | bytearray, spans: list[int]) -> bytes:
    out = bytearray(data)
    for i in spans:
        out[i] = 0
    return bytes(out)


def test_create_dynamic_matches_vhd_util_layout(tmp_path: Path) -> None:
    ref = (FIXTURES / "dyn-empty.vhd").read_bytes()
    path = tmp_path / "new.vhd"
    create_dynamic(str(path), 64 * MiB)
    ours = path.read_bytes()
    assert len(ours) == len(ref) == 3584
    footer_end = len(ref) - 512
    varies = FOOTER_VARIES + [footer_end + i for i in FOOTER_VARIES]
    assert _masked(ours, varies) == _masked(ref, varies)
    assert ours[:512] == ours[-512:]
    assert check_file(str(path))[0].verdict == f"{path} is valid"


def test_snapshot_matches_vhd_util_layout(tmp_path: Path) -> None:
    shutil.copyfile(FIXTURES / "base.vhd", tmp_path / "base.vhd")
    snapshot(str(tmp_path / "child.vhd"), str(tmp_path / "base.vhd"))
    ours = (tmp_path / "child.vhd").read_bytes()
    ref = (FIXTURES / "child.vhd").read_bytes()
    meta = 0x1200  # footer copy, header, BAT, batmap, three locators
    # Differences allowed: footer timestamp/checksum/uuid, header checksum and prt_ts,
    # and the BAT and batmap (the reference child has blocks written).
    varies = FOOTER_VARIES + [512 + i for i in (*range(36, 40), *range(56, 60))]
    varies += [*range(0x600, 0x680), *range(0x800 + 24, 0x800 + 28), *range(0xA00, 0xC00)]
    assert _masked(ours[:meta], varies) == _masked(ref[:meta], varies)
    header = parse_header(ours[512:1536])
    assert header.parent_timestamp == int(os.stat(tmp_path / "base.vhd").st_mtime) - 946684800
    base_uuid = parse_footer((FIXTURES / "base.vhd").read_bytes()[-512:]).uuid
    assert header.parent_uuid == base_uuid == parse_header(ref[512:1536]).parent_uuid
    results = check_file(str(tmp_path / "child.vhd"), check_parents=True)
    assert [r.valid for r in results] == [True, True]
    assert run(chain_bytes(str(tmp_path / "child.vhd"))) == run(
        chain_bytes(str(FIXTURES / "base.vhd"))
    )


def test_raw_snapshot_matches_vhd_util_layout(tmp_path: Path) -> None:
    shutil.copyfile(FIXTURES / "raw-parent.img", tmp_path / "raw-parent.img")
    snapshot(str(tmp_path / "raw-child.vhd"), str(tmp_path / "raw-parent.img"), raw_parent=True)
    ours = (tmp_path / "raw-child.vhd").read_bytes()
    ref = (FIXTURES / "raw-child.vhd").read_bytes()
    meta = 0x1200
    varies = FOOTER_VARIES + [512 + i for i in (*range(36, 40), *range(56, 60))]
    varies += [*range(0x600, 0x620), *range(0x800 + 24, 0x800 + 28), *range(0xA00, 0xC00)]
    assert _masked(ours[:meta], varies) == _masked(ref[:meta], varies)
    with VhdFile.open(str(tmp_path / "raw-child.vhd")) as vf:
        assert vf.parent is not None and vf.parent.raw
    assert check_file(str(tmp_path / "raw-child.vhd"))[0].valid


def test_allocating_writes_place_blocks_like_tapdisk(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vhd")
    create_dynamic(path, 64 * MiB)

    async def body() -> None:
        chain = await Chain.open("vhd", path, OpenOptions())
        try:
            await chain.write(0, memoryview(b"\x11" * 4096))
            await chain.write(2 * MiB + 512, memoryview(b"\x22" * 512))
        finally:
            await chain.close()

    run(body())
    data = Path(path).read_bytes()
    with VhdFile.open(path) as vf:
        assert vf.bat[0] == 7  # bitmap at 3584, data at 4096
        assert vf.bat[1] == 0x100F  # next bitmap just below a 4 KiB boundary
        assert vf.data_offset_of(1) == 0x1010 * 512
    assert data[3584] == 0xFF and data[3585:4096] == bytes(511)
    assert data[4096 : 4096 + 4096] == b"\x11" * 4096
    assert data[0x100F * 512] == 0x40  # sector 1 of block 1
    assert len(data) == 0x1010 * 512 + 2 * MiB + 512
    assert data[:512] == data[-512:]
    assert check_file(path)[0].valid


def test_sizes_past_2040_gib_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        create_dynamic(str(tmp_path / "big.vhd"), MAX_VHD_SIZE + 2 * MiB)
    assert not (tmp_path / "big.vhd").exists()
    create_dynamic(str(tmp_path / "max.vhd"), MAX_VHD_SIZE)
    with VhdFile.open(str(tmp_path / "max.vhd")) as vf:
        assert vf.size == MAX_VHD_SIZE
        assert len(vf.bat) == MAX_VHD_SIZE // (2 * MiB)
    assert check_file(str(tmp_path / "max.vhd"))[0].valid


def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.vhd"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        create_dynamic(str(path), MiB)
    assert path.read_bytes() == b"keep"


# ------------------------------------------------------------------- peers
def _fill(path: str, size: int, seed: int) -> bytearray:
    """Write a mix of aligned, unaligned, block-crossing writes; return the model."""
    rng = random.Random(seed)
    model = bytearray(size)

    async def body() -> None:
        chain = await Chain.open("vhd", path, OpenOptions())
        try:
            spots = [(0, 4096), (2 * MiB - 700, 1500), (5 * MiB, 2 * MiB), (size - 512, 512)]
            spots += [(rng.randrange(size - 9000), rng.randint(1, 9000)) for _ in range(20)]
            for off, n in spots:
                data = rng.randbytes(n)
                await chain.write(off, memoryview(data))
                model[off : off + n] = data
            await chain.write_zeroes(3 * MiB, 4096, True, False)
            model[3 * MiB : 3 * MiB + 4096] = bytes(4096)
        finally:
            await chain.close()

    run(body())
    return model


def _qemu_raw(path: str, tmp: Path) -> bytes:
    out = tmp / "qemu.raw"
    res = tool("qemu-img", "convert", "-f", "vpc", "-O", "raw", path, str(out))
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_qemu_reads_what_we_write(tmp_path: Path, kind: str) -> None:
    need("qemu-img")
    size = 16 * MiB
    path = str(tmp_path / f"{kind}.vhd")
    (create_dynamic if kind == "dynamic" else create_fixed)(path, size)
    model = _fill(path, size, seed=5)
    info = tool("qemu-img", "info", "--output=json", "-f", "vpc", path)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["virtual-size"] == size
    # qemu 7.2's vpc driver has no checker: it must say so, not report corruption.
    check = tool("qemu-img", "check", "-f", "vpc", path)
    assert check.returncode in (0, 63), check.stderr
    assert "corrupt" not in (check.stdout + check.stderr).lower()
    assert _qemu_raw(path, tmp_path) == model
    res = tool("qemu-io", "-f", "vpc", "-r", "-c", f"read -P 0 {3 * MiB} 4096", path)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout
    assert check_file(path)[0].valid


def test_we_read_what_qemu_writes(tmp_path: Path) -> None:
    need("qemu-img")
    path = str(tmp_path / "q.vhd")
    res = tool("qemu-img", "create", "-f", "vpc", "-o", "subformat=dynamic", path, "16M")
    assert res.returncode == 0, res.stderr
    cmds = ["write -P 0x5a 0 64k", "write -P 0xa5 3M 4k", "write -P 0x33 8388096 1024"]
    for cmd in cmds:
        res = tool("qemu-io", "-f", "vpc", "-c", cmd, path)
        assert res.returncode == 0, res.stderr
    ours = run(chain_bytes(path))
    assert ours == _qemu_raw(path, tmp_path)
    assert ours[:65536] == b"\x5a" * 65536 and ours[3 * MiB : 3 * MiB + 4096] == b"\xa5" * 4096


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "snapshot"])
def test_vhdiinfo_accepts_our_images(tmp_path: Path, kind: str) -> None:
    need("vhdiinfo")
    path = str(tmp_path / "img.vhd")
    if kind == "fixed":
        create_fixed(path, 8 * MiB)
    else:
        create_dynamic(path, 8 * MiB)
    if kind == "snapshot":
        child = str(tmp_path / "child.vhd")
        snapshot(child, path)
        path = child
    res = tool("vhdiinfo", path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(8388608 bytes)" in res.stdout
    expected = {"dynamic": "Dynamic", "fixed": "Fixed", "snapshot": "Differential"}[kind]
    assert expected in res.stdout
    if kind == "snapshot":
        assert "Parent filename\t\t: img.vhd" in res.stdout


@contextlib.contextmanager
def _vhdimount(image: str, mnt: Path) -> Iterator[Path]:
    need("vhdimount")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: vhdimount needs FUSE")
    mnt.mkdir()
    res = subprocess.run(["vhdimount", image, str(mnt)], capture_output=True, text=True,
                         timeout=30)
    # libvhdi refusing our image is the failure this exists to catch: never a skip.
    assert res.returncode == 0, f"vhdimount refused {image}: {res.stderr.strip()}"
    try:
        yield mnt
    finally:
        for cmd in (["fusermount", "-u", str(mnt)], ["umount", str(mnt)]):
            if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True,
                                                       timeout=30).returncode == 0:
                break
        mnt.rmdir()


def test_libvhdi_reads_what_we_write(tmp_path: Path) -> None:
    size = 16 * MiB
    path = str(tmp_path / "d.vhd")
    create_dynamic(path, size)
    model = _fill(path, size, seed=11)
    with _vhdimount(path, tmp_path / "mnt") as mnt:
        assert (mnt / "vhdi1").read_bytes() == model
