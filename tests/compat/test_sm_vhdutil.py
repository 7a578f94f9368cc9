"""XenServer's storage manager (xapi-project/sm) driving our ``vhd-util``.

Every command line here is one the storage manager's wrapper builds, in its order of
options, as its source shows it: ``libs/sm/vhdutil.py`` (current tree) and
``drivers/vhdutil.py`` (older trees; same calls, ``-vsf``/``-vsfp`` queries and ``scan -f
-c -m``), plus the direct ``modify -p`` of ``drivers/FileSR.py`` (``VDI.compose``). Each
test names the wrapper function it mirrors. The output is parsed as that function parses
it, by the small helpers below (written for these tests, following the wrapper's logic:
split lines, fixed field positions, ``key=value`` scan tokens, raw bytes for ``read -B``),
and the parsed values are checked against what the images really hold.

The storage manager runs ``/usr/bin/vhd-util`` through ``util.pread2`` (a non-zero exit
raises) and retries only on EIO/EAGAIN; so every call must exit 0 with exactly the
expected standard output, whatever ``--debug`` writes to standard error.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid as uuidlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.proto.vhd.keyhash import KEYHASH_XATTR, calculate_hash
from blktap.vhdutil.journal import write_journal
from blktap.vhdutil.reader import ChainReader
from tests.helpers import VHD_UTIL

MB = 1 << 20
BLOCK = 2 * MB
OPT_LOG_ERR = "--debug"  # the storage manager's name for it (vhdutil.OPT_LOG_ERR)


# ------------------------------------------------------------------ running and parsing
class CommandFailed(Exception):
    """What ``util.pread2`` raises for a non-zero exit (``util.CommandException``)."""

    def __init__(self, rc: int, out: str, err: str) -> None:
        super().__init__(f"exit {rc}: {out!r} {err!r}")
        self.rc = rc


def pread2(cmd: list[str]) -> str:
    """Run as the wrapper's ``ioretry(cmd)``: text output, non-zero exit raises."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise CommandFailed(proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def pread2_bytes(cmd: list[str]) -> bytes:
    """``ioretry(cmd, text=False)`` (getBlockBitmap reads raw bytes)."""
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise CommandFailed(proc.returncode, proc.stdout.decode(errors="replace"),
                            proc.stderr.decode(errors="replace"))
    return proc.stdout


def extract_uuid(path: str) -> str:
    """A file SR's extractUuid: the base name without the ".vhd" extension."""
    return path.strip().rsplit("/", 1)[-1].replace(".vhd", "")


@dataclass
class VHDInfo:
    """The wrapper's VHDInfo (-1 / "" / False where nothing was parsed)."""

    uuid: str
    path: str = ""
    size_virt: int = -1
    size_phys: int = -1
    size_allocated: int = -1
    hidden: int = 0
    parent_uuid: str = ""
    parent_path: str = ""
    error: str = ""


def parse_query(text: str, path: str, include_parent: bool, allocated: bool) -> VHDInfo:
    """getVHDInfo's parsing of ``query -vsa?fp``: fields by position (virtual MiB,
    physical bytes, [parent or "no parent"], "hidden: N", [allocated blocks])."""
    fields = text.strip().split("\n")
    info = VHDInfo(extract_uuid(path), path=path)
    info.size_virt = int(fields[0]) * MB
    info.size_phys = int(fields[1])
    i = 2
    if include_parent:
        if "no parent" not in fields[i]:
            info.parent_path = fields[i]
            info.parent_uuid = extract_uuid(fields[i])
        i += 1
    info.hidden = int(fields[i].replace("hidden: ", ""))
    if allocated:
        info.size_allocated = int(fields[i + 1]) * get_block_size(path)
    return info


def parse_scan_line(line: str) -> VHDInfo | None:
    """_parseVHDInfo: whitespace-separated key=value tokens, the first being vhd=."""
    tokens = line.split()
    if not tokens or "vhd=" not in tokens[0]:
        return None
    info: VHDInfo | None = None
    for token in tokens:
        key, val = token.split("=")
        if key == "vhd":
            info = VHDInfo(extract_uuid(val), path=val)
        elif info is None:
            return None
        elif key == "scan-error":
            info.error = line
            break
        elif key == "capacity":
            info.size_virt = int(val)
        elif key == "size":
            info.size_phys = int(val)
        elif key == "hidden":
            info.hidden = int(val)
        elif key == "parent" and val != "none":
            info.parent_path = val
            info.parent_uuid = extract_uuid(val)
    return info


def get_block_size(path: str) -> int:
    """getBlockSize: ``read -pn PATH``, the "Block size" line's first number."""
    for field in pread2([VHD_UTIL, "read", "-pn", path]).split("\n"):
        field = field.lstrip()
        if field.startswith("Block size"):
            return int(field.split(":")[1].lstrip().split()[0])
    raise AssertionError(f"no block size for {path}")


def get_all_vhds(pattern: str, parents_only: bool = False) -> dict[str, VHDInfo]:
    """getAllVHDs (current tree): ``scan -f -m PATTERN [-a]``, retried with ``-c``
    appended when it fails."""
    cmd = [VHD_UTIL, "scan", "-f", "-m", pattern]
    if parents_only:
        cmd.append("-a")
    try:
        out = pread2(cmd)
    except CommandFailed:
        out = pread2([*cmd, "-c"])
    found: dict[str, VHDInfo] = {}
    for line in out.split("\n"):
        if not line.strip():
            continue
        info = parse_scan_line(line)
        assert info is not None, f"vhdinfo line doesn't parse: {line!r}"
        found[info.uuid] = info
    return found


def key_hash(path: str) -> str | None:
    """getKeyHash: ``key -p -n PATH``; "none" or "<nonce> <hash>"."""
    ret = pread2([VHD_UTIL, "key", "-p", "-n", path]).strip()
    if ret == "none":
        return None
    vals = ret.split()
    assert len(vals) == 2, f"malformed output from vhd-util: {ret!r}"
    return vals[1]


def count_bits(bitmap1: bytes, bitmap2: bytes) -> int:
    """cleanup.py's Util.countBits: set bits of the OR of two block bitmaps."""
    long_, short = (bitmap1, bitmap2) if len(bitmap1) >= len(bitmap2) else (bitmap2, bitmap1)
    total = sum((a | b).bit_count() for a, b in zip(short, long_, strict=False))
    return total + sum(b.bit_count() for b in long_[len(short):])


def get_block_bitmap(path: str) -> bytes:
    """getBlockBitmap: ``read --debug -B -n PATH`` as raw bytes, zlib-compressed."""
    return zlib.compress(pread2_bytes([VHD_UTIL, "read", OPT_LOG_ERR, "-B", "-n", path]))


# -------------------------------------------------------------------- image helpers
def new_name(sr: Path) -> str:
    return str(sr / f"{uuidlib.uuid4()}.vhd")


def driver_write(path: str, writes: list[tuple[int, bytes]]) -> None:
    """Write as a VM through tapdisk would: the project's vhd driver on the leaf."""

    async def go() -> None:
        chain = await Chain.open("vhd", path, OpenOptions(read_only=False, direct=False))
        try:
            for offset, data in writes:
                await chain.write(offset, memoryview(data))
            await chain.flush()
        finally:
            await chain.close()

    asyncio.run(go())


def virtual_bytes(path: str, offset: int, length: int) -> bytes:
    with ChainReader.open(path) as chain:
        return chain.read(offset, length)


def create(path: str, size: int, static: bool = False, msize: int = 0) -> None:
    """vhdutil.create: ``create --debug -n PATH -s MB [-r] [-S MSIZE]``."""
    cmd = [VHD_UTIL, "create", OPT_LOG_ERR, "-n", path, "-s", str(size // MB)]
    if static:
        cmd.append("-r")
    if msize:
        cmd += ["-S", str(msize)]
    pread2(cmd)


def snapshot(path: str, parent: str, parent_raw: bool, msize: int = 0,
             check_empty: bool = True) -> None:
    """vhdutil.snapshot: ``snapshot --debug -n PATH -p PARENT [-m] [-S MSIZE] [-e]``."""
    cmd = [VHD_UTIL, "snapshot", OPT_LOG_ERR, "-n", path, "-p", parent]
    if parent_raw:
        cmd.append("-m")
    if msize:
        cmd += ["-S", str(msize)]
    if not check_empty:
        cmd.append("-e")
    pread2(cmd)


def check(path: str, ignore_missing_footer: bool = False, fast: bool = False) -> bool:
    """vhdutil.check: ``check --debug -n PATH [-i] [-B]``; only the exit status counts."""
    cmd = [VHD_UTIL, "check", OPT_LOG_ERR, "-n", path]
    if ignore_missing_footer:
        cmd.append("-i")
    if fast:
        cmd.append("-B")
    try:
        pread2(cmd)
        return True
    except CommandFailed:
        return False


def query(flag: str, path: str) -> str:
    """The one-flag queries: ``query --debug FLAG -n PATH``."""
    return pread2([VHD_UTIL, "query", OPT_LOG_ERR, flag, "-n", path])


def zero_trailing_footer(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 512)
        f.write(bytes(512))


@pytest.fixture
def sr(tmp_path: Path) -> Path:
    """A file SR's directory."""
    d = tmp_path / "sr"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------- tests
def test_create_and_every_query_form(sr: Path) -> None:
    # vhdutil.create, then getVHDInfo (both trees, with and without the parent),
    # getSizeVirt, getSizePhys, getMaxResizeSize, getAllocatedSize, getDepth,
    # getHidden, getParent, hasParent, getBlockSize.
    path = new_name(sr)
    create(path, 100 * MB)
    phys = os.path.getsize(path)
    for opts, parent, allocated in (("-vsafp", True, True), ("-vsaf", False, True),
                                    ("-vsfp", True, False), ("-vsf", False, False)):
        out = pread2([VHD_UTIL, "query", OPT_LOG_ERR, opts, "-n", path])
        info = parse_query(out, path, parent, allocated)
        assert (info.size_virt, info.size_phys, info.hidden) == (100 * MB, phys, 0), opts
        assert info.parent_uuid == "" and info.parent_path == ""
        assert info.size_allocated == (0 if allocated else -1)
    assert int(query("-v", path)) * MB == 100 * MB  # getSizeVirt
    assert int(query("-s", path)) == phys  # getSizePhys
    assert int(query("-S", path)) >= 100  # getMaxResizeSize
    assert int(query("-a", path)) * get_block_size(path) == 0  # getAllocatedSize
    assert get_block_size(path) == BLOCK
    text = query("-d", path)  # getDepth
    assert text.startswith("chain depth:") and int(text.split(":")[1].strip()) == 1
    assert int(query("-f", path).split(":")[-1].strip()) == 0  # getHidden
    ret = query("-p", path)  # getParent
    assert "query failed" not in ret and "Failed opening" not in ret and "no parent" in ret
    # hasParent: read --debug -p, the "Disk type" line.
    m = re.match(r".*Disk type\s+: (\S+) hard disk.*",
                 pread2([VHD_UTIL, "read", OPT_LOG_ERR, "-p", "-n", path]), flags=re.S)
    assert m is not None and m.group(1) == "Dynamic"


def test_create_static_and_with_metadata_size(sr: Path) -> None:
    # vhdutil.create(path, size, static=True) and (msize=...) as LVHD creates its VHDs.
    fixed = new_name(sr)
    create(fixed, 8 * MB, static=True)
    assert os.path.getsize(fixed) == 8 * MB + 512
    assert int(query("-v", fixed)) == 8
    assert check(fixed)
    big = new_name(sr)
    create(big, 10 * MB, msize=1024)
    assert int(query("-v", big)) == 10
    assert int(query("-S", big)) >= 1024  # metadata sized for the larger disk
    assert check(big)


def test_lvm_metadata_size(sr: Path) -> None:
    # LVHDSR's VDI.create: vhdutil.create(path, size, False, lvhdutil.MSIZE_MB), with
    # MSIZE_MB = 2 * 1024 * 1024 (2 TiB of metadata, more than the 2040 GiB disk limit);
    # its snapshots pass the same msize. Then an online (fast) resize.
    msize_mb = 2 * 1024 * 1024
    base = new_name(sr)
    create(base, 100 * MB, msize=msize_mb)
    assert (int(query("-v", base)), int(query("-S", base))) == (100, msize_mb)
    assert check(base)
    leaf = new_name(sr)
    snapshot(leaf, base, False, msize=msize_mb)
    assert (int(query("-v", leaf)), int(query("-S", leaf))) == (100, msize_mb)
    pread2([VHD_UTIL, "resize", OPT_LOG_ERR, "-s", str(4096), "-n", leaf, "-f"])
    assert int(query("-v", leaf)) == 4096 and check(leaf)


def test_snapshot_vhd_parent_hidden_scan_and_coalesce(sr: Path) -> None:
    # The chain SM builds on snapshot: base (hidden) <- leaf, then coalesce the leaf.
    base = new_name(sr)
    create(base, 20 * MB)
    driver_write(base, [(0, b"B" * BLOCK), (4 * BLOCK, b"b" * 4096)])
    leaf = new_name(sr)
    snapshot(leaf, base, False)
    # setHidden / getHidden
    pread2([VHD_UTIL, "set", OPT_LOG_ERR, "-n", base, "-f", "hidden", "-v", "1"])
    assert int(query("-f", base).split(":")[-1].strip()) == 1
    driver_write(leaf, [(BLOCK, b"L" * 8192), (4 * BLOCK + 512, b"l" * 512)])

    info = parse_query(pread2([VHD_UTIL, "query", OPT_LOG_ERR, "-vsafp", "-n", leaf]),
                       leaf, True, True)
    assert info.parent_uuid == extract_uuid(base)
    assert info.parent_path == os.path.realpath(base)
    assert info.size_allocated == 2 * BLOCK and info.hidden == 0
    assert extract_uuid(query("-p", leaf)) == extract_uuid(base)  # getParent
    text = query("-d", leaf)
    assert int(text.split(":")[1].strip()) == 2
    m = re.match(r".*Disk type\s+: (\S+) hard disk.*",
                 pread2([VHD_UTIL, "read", OPT_LOG_ERR, "-p", "-n", leaf]), flags=re.S)
    assert m is not None and m.group(1) == "Differencing"
    # _getVHDParentNoCheck: read -p (no --debug), the first "decoded name :" line.
    for line in pread2([VHD_UTIL, "read", "-p", "-n", leaf]).split("\n"):
        if "decoded name :" in line:
            vdi = line.split(":")[1].strip().replace("--", "-")[-40:]
            assert vdi == os.path.basename(base)
            break
    else:
        raise AssertionError("no decoded parent name")

    # getAllVHDs over the SR, and getParentChain's parents-only scan of the leaf.
    vhds = get_all_vhds(str(sr / "*.vhd"))
    assert set(vhds) == {extract_uuid(base), extract_uuid(leaf)}
    b, lf = vhds[extract_uuid(base)], vhds[extract_uuid(leaf)]
    assert (b.hidden, b.parent_uuid, b.size_virt) == (1, "", 20 * MB)
    assert (lf.hidden, lf.parent_uuid, lf.size_virt) == (0, extract_uuid(base), 20 * MB)
    assert b.size_phys == os.path.getsize(base) and lf.size_phys == os.path.getsize(leaf)
    chain = get_all_vhds(leaf, parents_only=True)
    assert set(chain) == {extract_uuid(base), extract_uuid(leaf)}

    # getBlockBitmap, as cleanup.py counts the blocks a coalesce would touch.
    leaf_bits = zlib.decompress(get_block_bitmap(leaf))
    base_bits = zlib.decompress(get_block_bitmap(base))
    assert leaf_bits[0] == 0b0100_1000 and base_bits[0] == 0b1000_1000
    assert count_bits(leaf_bits, base_bits) == 3

    expected = virtual_bytes(leaf, 0, 20 * MB)
    # coalesce: "Coalesced N sectors" (N = sectors the leaf holds)
    text = pread2([VHD_UTIL, "coalesce", OPT_LOG_ERR, "-n", leaf])
    m2 = re.match(r"^Coalesced (\d+) sectors", text)
    assert m2 is not None and int(m2.group(1)) == (8192 + 512) // 512  # what the leaf held
    assert virtual_bytes(base, 0, 20 * MB) == expected
    assert check(base) and check(leaf)


def test_snapshot_over_raw_parent(sr: Path) -> None:
    # vhdutil.snapshot(path, parent, parentRaw=True): -m, the parent opened with aio.
    raw = sr / f"{uuidlib.uuid4()}.raw"
    data = os.urandom(64 * 1024)
    with open(raw, "wb") as f:
        f.truncate(16 * MB)
        f.seek(3 * MB)
        f.write(data)
    leaf = new_name(sr)
    snapshot(leaf, str(raw), True)
    info = parse_query(pread2([VHD_UTIL, "query", OPT_LOG_ERR, "-vsafp", "-n", leaf]),
                       leaf, True, True)
    assert info.size_virt == 16 * MB and info.parent_path == str(raw)
    assert int(query("-d", leaf).split(":")[1]) == 2  # the raw parent counts
    assert virtual_bytes(leaf, 3 * MB, len(data)) == data
    (line,) = [x for x in pread2([VHD_UTIL, "scan", "-f", "-m", leaf]).split("\n") if x]
    parsed = parse_scan_line(line)
    assert parsed is not None and parsed.parent_path.endswith(raw.name)
    assert check(leaf)


def test_snapshot_metadata_size_and_exact_parent(sr: Path) -> None:
    # snapshot(..., msize=M, checkEmpty=False): -S and -e.
    base = new_name(sr)
    create(base, 10 * MB)
    mid = new_name(sr)
    snapshot(mid, base, False)
    leaf = new_name(sr)
    snapshot(leaf, mid, False, msize=512, check_empty=False)
    assert os.path.realpath(query("-p", leaf).strip()) == os.path.realpath(mid)
    assert int(query("-S", leaf)) >= 512
    skipped = new_name(sr)
    snapshot(skipped, mid, False)  # empty differencing parents are skipped by default
    assert os.path.realpath(query("-p", skipped).strip()) == os.path.realpath(base)


def test_set_parent_as_sm_relinks(sr: Path) -> None:
    # vhdutil.setParent: modify --debug -p NORMPATH -n PATH [-m]; FileSR's compose runs
    # modify -p PARENT -n PATH without --debug.
    a, b = new_name(sr), new_name(sr)
    create(a, 10 * MB)
    create(b, 10 * MB)
    leaf = new_name(sr)
    snapshot(leaf, a, False)
    pread2([VHD_UTIL, "modify", OPT_LOG_ERR, "-p", os.path.normpath(b), "-n", leaf])
    assert extract_uuid(query("-p", leaf)) == extract_uuid(b)
    pread2([VHD_UTIL, "modify", "-p", a, "-n", leaf])
    assert extract_uuid(query("-p", leaf)) == extract_uuid(a)
    raw = sr / "parent.raw"
    raw.write_bytes(b"R" * 4096)
    os.truncate(raw, 10 * MB)
    pread2([VHD_UTIL, "modify", OPT_LOG_ERR, "-p", str(raw), "-n", leaf, "-m"])
    assert query("-p", leaf).strip() == str(raw)
    assert virtual_bytes(leaf, 0, 4096) == b"R" * 4096
    assert check(leaf)


def test_resize_journal_fast_and_revert(sr: Path) -> None:
    # setSizeVirt (resize -j), getMaxResizeSize + setSizeVirtFast (resize -f), revert.
    path = new_name(sr)
    create(path, 20 * MB, msize=200)
    driver_write(path, [(BLOCK, b"d" * 4096)])
    journal = str(sr / "resize.journal")
    pread2([VHD_UTIL, "resize", OPT_LOG_ERR, "-s", str(300), "-n", path, "-j", journal])
    assert int(query("-v", path)) == 300
    assert not os.path.exists(journal)
    assert int(query("-S", path)) >= 300
    limit = int(query("-S", path))
    pread2([VHD_UTIL, "resize", OPT_LOG_ERR, "-s", str(limit), "-n", path, "-f"])
    assert int(query("-v", path)) == limit
    assert virtual_bytes(path, BLOCK, 4096) == b"d" * 4096
    assert check(path)

    # revert: a journal left by an interrupted operation restores the saved ranges.
    before = Path(path).read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        write_journal(journal, fd, [(0, 1536)])
        os.pwrite(fd, bytes(1536), 0)
    finally:
        os.close(fd)
    pread2([VHD_UTIL, "revert", OPT_LOG_ERR, "-n", path, "-j", journal])
    assert Path(path).read_bytes() == before and not os.path.exists(journal)


def test_set_physical_size_and_kill_data(sr: Path) -> None:
    # setSizePhys (modify -s, with and without --debug) and killData (modify -z).
    path = new_name(sr)
    create(path, 20 * MB)
    driver_write(path, [(0, b"x" * 4096)])
    end = int(query("-s", path))
    pread2([VHD_UTIL, "modify", OPT_LOG_ERR, "-s", str(end + 4 * MB), "-n", path])
    assert os.path.getsize(path) == end + 4 * MB
    assert int(query("-s", path)) == end  # still the end of the data (vhd_get_phys_size)
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        assert f.read(8) == b"conectix"
    assert check(path)
    pread2([VHD_UTIL, "modify", "-s", str(end + 8 * MB), "-n", path])
    assert os.path.getsize(path) == end + 8 * MB and check(path)
    pread2([VHD_UTIL, "modify", OPT_LOG_ERR, "-z", "-n", path])
    assert int(query("-a", path)) == 0
    assert virtual_bytes(path, 0, 4096) == bytes(4096)


def test_check_fast_ignore_footer_and_repair(sr: Path) -> None:
    # vhdutil.check(path, ignoreMissingFooter, fast) and vhdutil.repair.
    path = new_name(sr)
    create(path, 20 * MB)
    driver_write(path, [(0, b"c" * 4096)])
    assert check(path) and check(path, fast=True)
    zero_trailing_footer(path)  # e.g. a host crash during an allocating write
    assert not check(path)
    assert not check(path, fast=True)
    assert check(path, ignore_missing_footer=True)
    assert check(path, ignore_missing_footer=True, fast=True)
    pread2([VHD_UTIL, "repair", "-n", path])
    assert check(path)
    assert virtual_bytes(path, 0, 4096) == b"c" * 4096


def test_key_print_and_set(sr: Path) -> None:
    # getKeyHash (key -p -n) on every VHD of an SR scan; setKey (key -s -n PATH -H).
    path = new_name(sr)
    create(path, 10 * MB)
    assert key_hash(path) is None
    wanted = calculate_hash(bytes(32), os.urandom(64)).hex()
    pread2([VHD_UTIL, "key", "-s", "-n", path, "-H", wanted])
    assert key_hash(path) == wanted
    assert pread2([VHD_UTIL, "key", "-p", "-n", path]).split()[0] == "0" * 64
    assert check(path)  # the hash lives in the batmap header; the image stays valid


def test_key_on_image_without_batmap_uses_the_xattr(sr: Path) -> None:
    # A VHD made by another tool (qemu: creator "qemu", no batmap) keeps the hash in
    # the extended attribute, where libvhd looks for it.
    path = new_name(sr)
    proc = subprocess.run(["qemu-img", "create", "-f", "vpc", path, "10M"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"qemu-img cannot create a vpc image: {proc.stderr}")
    assert key_hash(path) is None
    wanted = "ab" * 32
    pread2([VHD_UTIL, "key", "-s", "-n", path, "-H", wanted])
    assert key_hash(path) == wanted
    raw = os.getxattr(path, KEYHASH_XATTR)
    assert raw[0] == 1 and raw[33:] == bytes.fromhex(wanted)


def test_debug_goes_to_stderr_only(sr: Path) -> None:
    # Every wrapper call carries --debug right after the verb: standard output must be
    # exactly what it is without it.
    path = new_name(sr)
    create(path, 10 * MB)
    for args in (["query", "-vsafp", "-n", path], ["read", "-B", "-n", path],
                 ["scan", "-f", "-m", path], ["key", "-p", "-n", path]):
        plain = subprocess.run([VHD_UTIL, *args], capture_output=True, timeout=60)
        debug = subprocess.run([VHD_UTIL, args[0], OPT_LOG_ERR, *args[1:]],
                               capture_output=True, timeout=60)
        assert plain.returncode == debug.returncode == 0
        assert plain.stdout == debug.stdout, args
        assert b"debug:" in debug.stderr and b"debug:" not in plain.stderr


def test_scan_of_an_empty_sr(sr: Path) -> None:
    # getAllVHDs on a new SR: the pattern matches nothing; the C tool prints nothing and
    # exits 0 (glob's GLOB_NOMATCH with errno 0). A missing directory is an error.
    assert get_all_vhds(str(sr / "*.vhd")) == {}
    assert pread2([VHD_UTIL, "scan", "-f", "-m", str(sr / "*.vhd")]) == ""
    with pytest.raises(CommandFailed) as exc:
        pread2([VHD_UTIL, "scan", "-f", "-m", str(sr / "missing" / "*.vhd")])
    assert exc.value.rc == 2


def test_scan_with_an_unreadable_image_retries_with_continue(sr: Path) -> None:
    # getAllVHDs: a failing scan is retried with -c; the broken file is a scan-error
    # line, the others parse as usual.
    good = new_name(sr)
    create(good, 10 * MB)
    bad = new_name(sr)
    Path(bad).write_bytes(b"not a vhd" * 100)
    with pytest.raises(CommandFailed):
        pread2([VHD_UTIL, "scan", "-f", "-m", str(sr / "*.vhd")])
    vhds = get_all_vhds(str(sr / "*.vhd"))
    assert vhds[extract_uuid(good)].error == "" and vhds[extract_uuid(good)].size_virt == 10 * MB
    assert "scan-error=" in vhds[extract_uuid(bad)].error
    # The older tree puts -c first: scan -f -c -m PATTERN.
    old = pread2([VHD_UTIL, "scan", "-f", "-c", "-m", str(sr / "*.vhd")])
    assert len([x for x in old.split("\n") if x.strip()]) == 2
