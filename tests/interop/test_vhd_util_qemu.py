"""Images vhd-util creates, resizes, fills and coalesces, read back by qemu's vpc driver
(qemu-img info/convert, qemu-io) and libvhdi's vhdiinfo.

qemu does not follow parent chains, so it is the oracle for fixed and dynamic disks
only; its vpc driver implements no ``qemu-img check``, so the consistency check is our
own ``vhd-util check`` (validated against the C tool's verdicts elsewhere). qemu is only
a reader here: when it allocates a block in a blktap-layout image it puts it right after
the BAT, over blktap's batmap (and a differencing disk's parent locators), so data is
written with the project's ``vhd`` driver instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.cli.vhd_util import main
from blktap.vhdutil.reader import ChainReader
from tests.helpers import FIXTURES

MB = 1 << 20


def vhd_util(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, (argv, out, err)
    return out


def driver_write(path: str, writes: list[tuple[int, bytes]]) -> None:
    """Write through the project's vhd driver (the leaf of the chain at ``path``)."""

    async def go() -> None:
        chain = await Chain.open("vhd", path, OpenOptions(read_only=False, direct=False))
        try:
            for offset, data in writes:
                await chain.write(offset, memoryview(data))
            await chain.flush()
        finally:
            await chain.close()

    asyncio.run(go())


def qemu_io(path: str, *cmds: str) -> str:
    argv = ["qemu-io", "-f", "vpc"]
    for c in cmds:
        argv += ["-c", c]
    proc = subprocess.run([*argv, path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout


def qemu_info(path: str) -> dict[str, object]:
    proc = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", path],
                          capture_output=True, text=True, timeout=60, check=True)
    info: dict[str, object] = json.loads(proc.stdout)
    return info


def qemu_raw(path: str, tmp_path: Path) -> bytes:
    out = tmp_path / (Path(path).name + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", path, str(out)],
                   check=True, timeout=60, capture_output=True)
    data = out.read_bytes()
    out.unlink()
    return data


def ours(path: str) -> bytes:
    with ChainReader.open(path) as chain:
        return chain.read(0, chain.size)


def vhdiinfo(path: str) -> str:
    proc = subprocess.run(["vhdiinfo", path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def assert_valid(capsys: pytest.CaptureFixture[str], path: str) -> None:
    rc = main(["check", "-n", path])
    out, _ = capsys.readouterr()
    assert rc == 0, out


WRITES = [
    (0, b"\x11" * 4096),
    (2 * MB, b"\x22" * (2 * MB)),
    (6143 * 1024, b"\x33" * 2048),
    (63 * MB, b"\x44" * 512),
]


def test_created_dynamic_is_read_by_qemu_and_libvhdi(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "d.vhd")
    vhd_util(capsys, "create", "-n", path, "-s", "64")
    info = qemu_info(path)
    assert info["virtual-size"] == 64 * MB and info["format"] == "vpc"
    assert "Dynamic" in vhdiinfo(path) and "64 MiB" in vhdiinfo(path)
    assert qemu_raw(path, tmp_path) == bytes(64 * MB)
    driver_write(path, WRITES)
    assert_valid(capsys, path)
    assert ours(path) == qemu_raw(path, tmp_path)
    out = qemu_io(path, "read -P 0x33 6143k 2k", "read -P 0 6145k 1k", "read -P 0x22 2M 2M")
    assert "read 2048/2048" in out and "read 2097152/2097152" in out


def test_created_fixed_is_read_by_qemu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "f.vhd")
    vhd_util(capsys, "create", "-n", path, "-s", "8", "-r")
    assert qemu_info(path)["virtual-size"] == 8 * MB
    assert "Fixed" in vhdiinfo(path)
    driver_write(path, [(MB, b"\x5a" * 65536)])
    assert_valid(capsys, path)
    data = ours(path)
    assert data == qemu_raw(path, tmp_path)
    assert data[MB : MB + 65536] == b"\x5a" * 65536


def test_fill_keeps_contents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "d.vhd")
    vhd_util(capsys, "create", "-n", path, "-s", "64")
    driver_write(path, WRITES)
    before = qemu_raw(path, tmp_path)
    vhd_util(capsys, "fill", "-n", path)
    assert_valid(capsys, path)
    assert vhd_util(capsys, "query", "-n", path, "-a") == "32\n"
    assert qemu_raw(path, tmp_path) == before
    assert ours(path) == before


@pytest.mark.parametrize("fixture", ["dyn-data.vhd", "base.vhd"])
def test_resize_with_journal_moves_blocks(
    fixture: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """600 MiB needs a three-sector BAT: the first block (at 3584) moves out of its way."""
    path = str(tmp_path / fixture)
    shutil.copyfile(FIXTURES / fixture, path)
    assert vhd_util(capsys, "read", "-n", path, "-b", "0") == "block: 0: offset: 3584\n"
    journal = str(tmp_path / "resize.journal")
    vhd_util(capsys, "resize", "-n", path, "-s", "600", "-j", journal)
    assert not Path(journal).exists()
    assert vhd_util(capsys, "read", "-n", path, "-b", "0") != "block: 0: offset: 3584\n"
    assert_valid(capsys, path)
    assert qemu_info(path)["virtual-size"] == 600 * MB
    assert f"({600 * MB} bytes)" in vhdiinfo(path)
    # qemu: the first 64 MiB as before, zeros after.
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "vpc", "-F", "vpc", str(FIXTURES / fixture), path],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert vhd_util(capsys, "query", "-n", path, "-v", "-S") == "600\n600\n"
    # The grown image takes new writes anywhere.
    driver_write(path, [(590 * MB, b"\x66" * (2 * MB))])
    assert_valid(capsys, path)
    assert "read 2097152/2097152" in qemu_io(path, "read -P 0x66 590M 2M")
    with ChainReader.open(path) as chain, ChainReader.open(str(FIXTURES / fixture)) as orig:
        assert chain.read(0, 64 * MB) == orig.read(0, 64 * MB)


def test_resize_fast_within_preallocated_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "p.vhd")
    vhd_util(capsys, "create", "-n", path, "-s", "16", "-S", "64")
    driver_write(path, [(15 * MB, b"\x77" * MB)])
    vhd_util(capsys, "resize", "-n", path, "-s", "64", "-f")
    assert_valid(capsys, path)
    assert qemu_info(path)["virtual-size"] == 64 * MB
    data = qemu_raw(path, tmp_path)
    assert data[15 * MB : 16 * MB] == b"\x77" * MB and not any(data[16 * MB :])
    rc = main(["resize", "-n", path, "-s", "65", "-f"])
    assert rc == 22  # past the BAT's capacity: needs a journal
    assert "journal" in capsys.readouterr().err


def test_resize_fixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "fixed.vhd")
    shutil.copyfile(FIXTURES / "fixed.vhd", path)
    vhd_util(capsys, "resize", "-n", path, "-s", "32", "-j", str(tmp_path / "j"))
    assert_valid(capsys, path)
    data = qemu_raw(path, tmp_path)
    assert len(data) == 32 * MB
    assert hashlib.sha256(data[: 16 * MB]).hexdigest() == (
        "3585953794fd6080f9c659638b8e8dc12255fd4d7bf051eae847da36805fb124"
    )
    assert not any(data[16 * MB :])  # the old footer's bytes read as zeros now


def test_resize_shrinks_dynamic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "d.vhd")
    shutil.copyfile(FIXTURES / "dyn-data.vhd", path)
    before = qemu_raw(path, tmp_path)
    vhd_util(capsys, "resize", "-n", path, "-s", "32", "-j", str(tmp_path / "j"))
    assert not (tmp_path / "j").exists()
    assert_valid(capsys, path)
    assert vhd_util(capsys, "query", "-n", path, "-v", "-a") == "32\n4\n"  # block 31 dropped
    assert qemu_raw(path, tmp_path) == before[: 32 * MB]
    assert "(33554432 bytes)" in vhdiinfo(path)


def test_resize_refuses_qemu_images_and_fixed_shrink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, size in (("qemu-dyn.vhd", "128"), ("fixed.vhd", "8")):
        path = str(tmp_path / name)
        shutil.copyfile(FIXTURES / name, path)
        before = Path(path).read_bytes()
        assert main(["resize", "-n", path, "-s", size, "-j", str(tmp_path / "j")]) == 22
        err = capsys.readouterr().err
        assert "not created by xen" in err or "shrinking the fixed disk" in err
        assert Path(path).read_bytes() == before
        assert not (tmp_path / "j").exists()


def test_coalesce_result_read_by_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A child holding partial and whole blocks coalesced into a base: qemu reads the
    result (a dynamic disk) as the chain read before."""
    base = str(tmp_path / "base.vhd")
    child = str(tmp_path / "child.vhd")
    vhd_util(capsys, "create", "-n", base, "-s", "64")
    driver_write(base, WRITES)
    vhd_util(capsys, "snapshot", "-n", child, "-p", base)
    driver_write(child, [
        (2 * MB, b"\x99" * (2 * MB)),
        (10 * MB, b"\xaa" * (4 * MB)),
        (512, b"\xbb" * 1024),
        (40 * MB + 4096, b"\xcc" * 8192),
        (62 * MB, b"\xdd" * (2 * MB)),
    ])
    want = ours(child)
    assert want[2 * MB : 4 * MB] == b"\x99" * (2 * MB)
    vhd_util(capsys, "coalesce", "-n", child)
    assert_valid(capsys, base)
    assert qemu_raw(base, tmp_path) == want
    assert "Dynamic" in vhdiinfo(base)
