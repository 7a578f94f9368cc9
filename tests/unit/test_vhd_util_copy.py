"""``vhd-util copy -n NAME -N NEW``: dynamic, differencing (flattened) and fixed sources,
the copy checked by our reader and ``vhd-util check`` and cross-checked with qemu-img
(info, compare) and libvhdi's vhdiinfo; encryption options and an existing target are
refused before anything is written."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.cli.vhd_util import main
from blktap.proto.vhd.constants import DiskType
from blktap.proto.vhd.footer import parse_footer
from blktap.vhdutil.reader import ChainReader
from tests.vhd_helpers import need

MB = 1 << 20
BLOCK = 2 * MB


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 0, (argv, out, err)
    return out


def driver_write(path: str, writes: list[tuple[int, bytes]]) -> None:
    async def go() -> None:
        chain = await Chain.open("vhd", path, OpenOptions(read_only=False, direct=False))
        try:
            for offset, data in writes:
                await chain.write(offset, memoryview(data))
            await chain.flush()
        finally:
            await chain.close()

    asyncio.run(go())


def contents(path: str) -> bytes:
    with ChainReader.open(path) as chain:
        return chain.read(0, chain.size)


def footer_of(path: str) -> tuple[int, bytes, int]:
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        foot = parse_footer(f.read(512))
    return foot.disk_type, foot.uuid, foot.current_size


def qemu_compare(a: str, fmt_a: str, b: str, fmt_b: str) -> subprocess.CompletedProcess[str]:
    need("qemu-img")
    return subprocess.run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b],
                          capture_output=True, text=True, timeout=120)


def peer_checks(copy: str, reference_raw: str, size: int) -> None:
    """qemu-img reads the copy as the reference; vhdiinfo parses it."""
    need("qemu-img")
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-f", "vpc", "--output=json", copy],
        capture_output=True, text=True, timeout=60, check=True).stdout)
    assert info["virtual-size"] == size
    cmp = qemu_compare(copy, "vpc", reference_raw, "raw")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    need("vhdiinfo")
    vi = subprocess.run(["vhdiinfo", copy], capture_output=True, text=True, timeout=60)
    assert vi.returncode == 0, vi.stdout + vi.stderr
    assert f"{size} bytes" in vi.stdout


def raw_of(data: bytes, path: Path) -> str:
    path.write_bytes(data)
    return str(path)


def test_copy_dynamic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = str(tmp_path / "src.vhd"), str(tmp_path / "dst.vhd")
    ok(capsys, "create", "-n", src, "-s", "20")
    driver_write(src, [(0, os.urandom(4096)), (3 * BLOCK + 512, os.urandom(1536)),
                       (9 * BLOCK, os.urandom(BLOCK))])
    ok(capsys, "copy", "-n", src, "-N", dst)
    assert contents(dst) == contents(src)
    kind, uid, size = footer_of(dst)
    assert (kind, size) == (DiskType.DYNAMIC, 20 * MB) and uid != footer_of(src)[1]
    assert ok(capsys, "query", "-a", "-n", dst) == "3\n"  # the blocks holding data
    assert ok(capsys, "check", "-n", dst) == f"{dst} is valid\n"
    peer_checks(dst, raw_of(contents(src), tmp_path / "src.raw"), 20 * MB)


def test_copy_differencing_is_flattened(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    base, leaf, dst = (str(tmp_path / n) for n in ("base.vhd", "leaf.vhd", "dst.vhd"))
    ok(capsys, "create", "-n", base, "-s", "16")
    driver_write(base, [(0, b"P" * BLOCK), (5 * BLOCK, b"p" * 8192)])
    ok(capsys, "snapshot", "-n", leaf, "-p", base)
    driver_write(leaf, [(4096, b"C" * 4096), (7 * BLOCK, b"c" * 512)])
    expected = contents(leaf)
    ok(capsys, "copy", "--debug", "-n", leaf, "-N", dst)
    assert footer_of(dst)[0] == DiskType.DYNAMIC
    assert ok(capsys, "query", "-p", "-n", dst) == f"{dst} has no parent\n"
    assert contents(dst) == expected  # parent blocks included, not only the leaf's
    assert ok(capsys, "query", "-a", "-n", dst) == "3\n"
    assert ok(capsys, "check", "-n", dst) == f"{dst} is valid\n"
    peer_checks(dst, raw_of(expected, tmp_path / "leaf.raw"), 16 * MB)


def test_copy_fixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = str(tmp_path / "src.vhd"), str(tmp_path / "dst.vhd")
    ok(capsys, "create", "-n", src, "-s", "8", "-r")
    payload = os.urandom(65536)
    with open(src, "r+b") as f:
        f.seek(3 * MB)
        f.write(payload)
    ok(capsys, "copy", "-n", src, "-N", dst)
    assert os.path.getsize(dst) == os.path.getsize(src)
    assert footer_of(dst)[0] == DiskType.FIXED and footer_of(dst)[1] != footer_of(src)[1]
    with open(dst, "rb") as f:
        f.seek(3 * MB)
        assert f.read(len(payload)) == payload
    assert os.stat(dst).st_blocks * 512 < 4 * MB  # holes stay holes
    assert ok(capsys, "check", "-n", dst) == ""  # a valid fixed disk prints nothing
    cmp = qemu_compare(dst, "vpc", src, "vpc")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_copy_of_a_qemu_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need("qemu-img")
    need("qemu-io")
    src, dst = str(tmp_path / "q.vhd"), str(tmp_path / "dst.vhd")
    subprocess.run(["qemu-img", "create", "-f", "vpc", "-o", "force_size=on", src, "12M"],
                   check=True, capture_output=True, timeout=60)
    subprocess.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 64k", src],
                   check=True, capture_output=True, timeout=60)
    ok(capsys, "copy", "-n", src, "-N", dst)
    cmp = qemu_compare(dst, "vpc", src, "vpc")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert ok(capsys, "check", "-n", dst) == f"{dst} is valid\n"


def test_refusals_leave_nothing_behind(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = str(tmp_path / "src.vhd"), str(tmp_path / "dst.vhd")
    ok(capsys, "create", "-n", src, "-s", "4")
    key = tmp_path / "k.key"
    key.write_bytes(os.urandom(32))
    rc, _, err = run(capsys, "copy", "-n", src, "-N", dst, "-k", str(key))
    assert rc == errno.EOPNOTSUPP and "not supported" in err
    assert run(capsys, "copy", "-n", src, "-N", dst, "-E")[0] == errno.EOPNOTSUPP
    assert run(capsys, "copy", "-n", src, "-N", dst, "-E", "-k", str(key))[0] == errno.EINVAL
    assert run(capsys, "copy", "-n", src)[0] == errno.EINVAL  # no target
    missing = str(tmp_path / "missing.vhd")
    assert run(capsys, "copy", "-n", missing, "-N", dst)[0] == errno.ENOENT
    assert not os.path.exists(dst)
    Path(dst).write_bytes(b"keep me")
    rc, _, err = run(capsys, "copy", "-n", src, "-N", dst)
    assert rc == errno.EEXIST and "exists" in err
    assert Path(dst).read_bytes() == b"keep me"


def test_unreadable_chain_leaves_no_target(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    base, leaf, dst = (str(tmp_path / n) for n in ("base.vhd", "leaf.vhd", "dst.vhd"))
    ok(capsys, "create", "-n", base, "-s", "4")
    ok(capsys, "snapshot", "-n", leaf, "-p", base)
    os.unlink(base)  # the chain cannot be read
    rc, _, _ = run(capsys, "copy", "-n", leaf, "-N", dst)
    assert rc != 0 and not os.path.exists(dst)
