"""vhd-util against the reference images made by the C vhd-util/tapdisk: check verdicts,
coalesce results, dumps, and our snapshots read through libvhdi's vhdimount.

Chains are read with the project's ``vhd`` driver through ``blktap.block.chain.Chain``
(an implementation independent of vhd-util's own reader) and compared with the
manifest's sha256 of each virtual disk, as the C tapdisk read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions, registered_types
from blktap.cli.vhd_util import main
from blktap.vhdutil.reader import ChainReader
from tests.helpers import FIXTURES

MANIFEST: dict[str, dict[str, Any]] = {
    i["file"]: i for i in json.loads((FIXTURES / "manifest.json").read_text())["images"]
}
CHUNK = 4 << 20


def copy(tmp_path: Path, *names: str) -> list[str]:
    out = []
    for name in names:
        shutil.copyfile(FIXTURES / name, tmp_path / name)
        out.append(str(tmp_path / name))
    return out


def sha_reader(path: str) -> str:
    """sha256 of the virtual disk through vhd-util's own chain reader."""
    h = hashlib.sha256()
    with ChainReader.open(path) as chain:
        for off in range(0, chain.size, CHUNK):
            h.update(chain.read(off, min(CHUNK, chain.size - off)))
    return h.hexdigest()


def sha_driver(path: str) -> str:
    """sha256 of the virtual disk through the project's vhd driver and chain."""
    if "vhd" not in registered_types():
        pytest.fail("the vhd image driver is not registered (blktap.block.drivers.vhd)")

    async def go() -> str:
        chain = await Chain.open("vhd", path, OpenOptions(read_only=True, direct=False))
        try:
            h = hashlib.sha256()
            buf = bytearray(CHUNK)
            for off in range(0, chain.size, CHUNK):
                n = min(CHUNK, chain.size - off)
                view = memoryview(buf)[:n]
                await chain.read(off, view)
                h.update(view)
            return h.hexdigest()
        finally:
            await chain.close()

    return asyncio.run(go())


def vhd_util(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------ check
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_check_gives_reference_verdict(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy(tmp_path, name)
    for parent in ("base.vhd", "child.vhd", "raw-parent.img"):
        if not (tmp_path / parent).exists():
            copy(tmp_path, parent)
    monkeypatch.chdir(tmp_path)  # the reference verdicts name the file as given
    rc, out, _ = vhd_util(capsys, "check", "-n", name, "-p")
    expected = MANIFEST[name]["reference_check"]
    if expected.startswith("valid (fixed disk"):
        assert (rc, out) == (0, "")
    elif expected.endswith("is valid"):
        assert rc == 0
        assert out.splitlines()[0] == expected
    else:
        assert rc == 22
        assert out.splitlines()[0] == expected


@pytest.mark.parametrize("name", sorted(n for n in MANIFEST if n.endswith(".vhd")))
def test_reader_matches_manifest(name: str) -> None:
    assert sha_reader(str(FIXTURES / name)) == MANIFEST[name]["virtual_sha256"]


# --------------------------------------------------------------------------- coalesce
def test_coalesce_child_into_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, child = copy(tmp_path, "base.vhd", "child.vhd")
    child_before = Path(child).read_bytes()
    rc, out, err = vhd_util(capsys, "coalesce", "-n", child)
    assert (rc, out, err) == (0, "Coalesced 4225 sectors\n", "")  # check -s: 0x1081
    assert Path(child).read_bytes() == child_before  # the child is left alone
    want = MANIFEST["child.vhd"]["virtual_sha256"]
    assert want == MANIFEST["coalesced-base.vhd"]["virtual_sha256"]
    assert sha_driver(base) == want
    assert sha_reader(base) == want
    assert vhd_util(capsys, "check", "-n", base)[1] == f"{base} is valid\n"
    # Same layout as the C tool's result.
    assert os.path.getsize(base) == os.path.getsize(FIXTURES / "coalesced-base.vhd")
    # qemu reads a dynamic disk fully: compare with the C tool's coalesced base.
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "vpc", "-F", "vpc", base,
         str(FIXTURES / "coalesced-base.vhd")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_coalesce_grandchild_into_child(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, child, grand = copy(tmp_path, "base.vhd", "child.vhd", "grandchild.vhd")
    base_before = Path(base).read_bytes()
    assert vhd_util(capsys, "coalesce", "-n", grand)[0] == 0
    assert Path(base).read_bytes() == base_before
    assert sha_driver(child) == MANIFEST["grandchild.vhd"]["virtual_sha256"]
    assert vhd_util(capsys, "check", "-n", child, "-p")[0] == 0


def test_coalesce_into_raw_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, child = copy(tmp_path, "raw-parent.img", "raw-child.vhd")
    assert vhd_util(capsys, "coalesce", "-n", child)[0] == 0
    assert hashlib.sha256(Path(raw).read_bytes()).hexdigest() == (
        MANIFEST["raw-child.vhd"]["virtual_sha256"]
    )


def test_coalesce_sparse_keeps_parent_sparse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = str(tmp_path / "b.vhd")
    child = str(tmp_path / "c.vhd")
    assert vhd_util(capsys, "create", "-n", base, "-s", "16")[0] == 0
    assert vhd_util(capsys, "snapshot", "-n", child, "-p", base)[0] == 0
    # Make the child hold all-zero data in every block.
    assert vhd_util(capsys, "fill", "-n", child)[0] == 0
    assert vhd_util(capsys, "coalesce", "-n", child, "-s")[0] == 0
    assert vhd_util(capsys, "query", "-n", base, "-a")[1] == "0\n"
    assert vhd_util(capsys, "coalesce", "-n", child)[0] == 0
    assert vhd_util(capsys, "query", "-n", base, "-a")[1] == "8\n"
    assert sha_driver(base) == hashlib.sha256(bytes(16 << 20)).hexdigest()


def test_coalesce_refuses_non_differencing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    rc, _, err = vhd_util(capsys, "coalesce", "-n", path)
    assert rc == 22
    assert "coalescing of non-differencing disks is not supported" in err


# ------------------------------------------------------------------------------ dumps
def test_read_extents_match_manifest_map(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(FIXTURES / "dyn-data.vhd")
    sectors = MANIFEST["dyn-data.vhd"]["virtual_size"] // 512
    rc, out, _ = vhd_util(capsys, "read", "-n", path, "-e", "0", "-c", str(sectors))
    assert rc == 0
    got = [tuple(int(x) * 512 for x in line.split()) for line in out.splitlines()]
    want = [(e["offset"], e["length"]) for e in MANIFEST["dyn-data.vhd"]["map"] if e["type"] == 0]
    assert got == want


def test_read_dumps(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(FIXTURES / "dyn-data.vhd")
    rc, out, _ = vhd_util(capsys, "read", "-n", path, "-p")
    assert rc == 0
    lines = out.splitlines()
    assert "Cookie              : conectix" in lines
    assert "Disk type           : Dynamic hard disk" in lines
    assert "Block size          : 2097152 (2 MB)" in lines
    assert "Max BAT size        : 32" in lines
    assert sum("(Good!)" in line for line in lines) == 3  # footer, header, batmap
    rc, out, _ = vhd_util(capsys, "read", "-n", path, "-b", "0", "-c", "2")
    assert out.splitlines() == ["block: 0: offset: 3584", "block: 1: offset: 2104832"]
    rc, out, _ = vhd_util(capsys, "read", "-n", path, "-b", "4", "-x")
    assert out == "block: 0x4: offset: not allocated\n"
    rc, out, _ = vhd_util(capsys, "read", "-n", path, "-t", "8")
    assert out == ("logical sector 8: block number: 0, sector offset: 8, "
                   "file offset: 8192\n")
    rc, out, _ = vhd_util(capsys, "read", "-n", path, "-i", "7", "-c", "2")
    assert out.splitlines() == ["block 0: sec: 7: 1", "block 0: sec: 8: 0"]
    rc, _, err = vhd_util(capsys, "read", "-n", path, "-j", "1")
    assert err == "batmap for block 1: 1\n"
    rc, _, err = vhd_util(capsys, "read", "-n", path, "-b", "32")
    assert rc == 34
    assert "past end" in err


def test_read_raw_outputs(tmp_path: Path) -> None:
    """Raw dumps go to standard output as bytes (run through the console script)."""
    from tests.helpers import VHD_UTIL

    path = str(FIXTURES / "dyn-data.vhd")

    def raw(*argv: str) -> bytes:
        proc = subprocess.run([VHD_UTIL, "read", "-n", path, *argv], capture_output=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert raw("-B") == bytes([0b11110000, 0, 0, 0b00000001])  # blocks 0-3 and 31
    assert raw("-a")[:4] == bytes([0b01000000, 0, 0, 0])  # only block 1 is full
    bitmap = raw("-m", "0")
    assert len(bitmap) == 512 and bitmap[0] == 0xFF and bitmap[1] == 0
    with ChainReader.open(path) as chain:
        assert raw("-R", "6290432", "-c", "2048") == chain.read(6290432, 2048)
        assert raw("-r", "0", "-c", "16") == chain.read(0, 8192)
        assert raw("-d", "1") == chain.read(2 << 20, 2 << 20)


# ------------------------------------------------------------------ libvhdi on chains
@contextlib.contextmanager
def vhdimount(image: str, where: Path) -> Iterator[Path]:
    where.mkdir()
    proc = subprocess.Popen(["vhdimount", "-v", image, str(where)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (where / "vhdi1").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vhdimount of {image} did not come up")
            time.sleep(0.05)
        # vhdimount exposes every layer: vhdi1 is the root, the highest number the leaf.
        layers = sorted(where.iterdir(), key=lambda p: int(p.name[4:]))
        yield layers[-1]
    finally:
        subprocess.run(["fusermount", "-u", str(where)], capture_output=True, timeout=20)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_vhdimount_reads_our_snapshot_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (base,) = copy(tmp_path, "base.vhd")
    snap = str(tmp_path / "snap.vhd")
    assert vhd_util(capsys, "snapshot", "-n", snap, "-p", base)[0] == 0
    with vhdimount(snap, tmp_path / "mnt") as disk:
        assert disk.name == "vhdi2"
        assert hashlib.sha256(disk.read_bytes()).hexdigest() == (
            MANIFEST["base.vhd"]["virtual_sha256"]
        )
    proc = subprocess.run(["vhdiinfo", snap], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert "Differential" in proc.stdout and "Parent filename\t\t: base.vhd" in proc.stdout


def test_vhdimount_reads_filled_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fill copies the parents' data into a differencing disk: libvhdi, which follows
    the chain, still reads the same disk."""
    grand = copy(tmp_path, "base.vhd", "child.vhd", "grandchild.vhd")[2]
    assert vhd_util(capsys, "fill", "-n", grand)[0] == 0
    assert vhd_util(capsys, "check", "-n", grand)[0] == 0
    assert vhd_util(capsys, "query", "-n", grand, "-a")[1] == "32\n"
    want = MANIFEST["grandchild.vhd"]["virtual_sha256"]
    with vhdimount(grand, tmp_path / "mnt") as disk:
        assert hashlib.sha256(disk.read_bytes()).hexdigest() == want
    # Filled, the leaf alone holds everything: qemu (which ignores parents) agrees.
    out = tmp_path / "gc.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", grand, str(out)],
                   check=True, timeout=60)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == want
    assert sha_driver(grand) == want


# ------------------------------------------------------------- layout as the C tool's
FOOTER_VOLATILE = set(range(24, 28)) | set(range(64, 84))  # timestamp, checksum, uuid


def differing(a: bytes, b: bytes) -> set[int]:
    assert len(a) == len(b)
    return {i for i in range(len(a)) if a[i] != b[i]}


def test_create_matches_the_c_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Our 64 MiB dynamic disk equals the C tool's dyn-empty.vhd but for the footers'
    timestamp, uuid and checksum."""
    path = str(tmp_path / "e.vhd")
    assert vhd_util(capsys, "create", "-n", path, "-s", "64")[0] == 0
    ours = Path(path).read_bytes()
    theirs = (FIXTURES / "dyn-empty.vhd").read_bytes()
    tail = len(theirs) - 512
    allowed = FOOTER_VOLATILE | {tail + i for i in FOOTER_VOLATILE}
    assert differing(ours, theirs) <= allowed


def test_snapshot_matches_the_c_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Our snapshot of base.vhd has the C tool's metadata (child.vhd is the C tool's
    snapshot of the same base): same header, locators and batmap placement; only the
    footer's timestamp/uuid/checksum, the parent timestamp (the base's mtime) and the
    header checksum differ. BAT and batmap contents differ (child.vhd holds data)."""
    (base,) = copy(tmp_path, "base.vhd")
    snap = str(tmp_path / "snap.vhd")
    assert vhd_util(capsys, "snapshot", "-n", snap, "-p", base)[0] == 0
    ours = Path(snap).read_bytes()[:4608]
    theirs = (FIXTURES / "child.vhd").read_bytes()[:4608]
    allowed = (
        FOOTER_VOLATILE
        | set(range(512 + 36, 512 + 40))  # header checksum
        | set(range(512 + 56, 512 + 60))  # parent timestamp
        | set(range(1536, 2048))  # BAT entries
        | set(range(2048 + 24, 2048 + 28))  # batmap checksum
        | set(range(2560, 3072))  # batmap bits
    )
    assert differing(ours, theirs) <= allowed


def test_coalesce_output_matches_the_c_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Byte for byte the C tool's coalesced-base.vhd."""
    base, child = copy(tmp_path, "base.vhd", "child.vhd")
    assert vhd_util(capsys, "coalesce", "-n", child)[0] == 0
    assert Path(base).read_bytes() == (FIXTURES / "coalesced-base.vhd").read_bytes()
