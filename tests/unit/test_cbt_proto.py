"""The ``.cbtlog`` codec: layout against the C-made reference logs, every documented
error, the bit order and the helpers the log layer and cbt-util use. proto/ does no I/O."""

from __future__ import annotations

import errno
import json
import uuid
from typing import Any

import pytest

from blktap.errors import InvalidArgument
from blktap.proto import cbt
from tests.reference_data import reference_dir

REF = reference_dir("cbt")
MANIFEST: dict[str, dict[str, Any]] = {
    e["file"]: e for e in json.loads((REF / "manifest.json").read_text())["logs"]
}
MiB = 1 << 20


def raw(name: str) -> bytes:
    return (REF / name).read_bytes()


# ---------------------------------------------------------------------------- layout
def test_sizes_follow_the_c_formula() -> None:
    assert cbt.HEADER_SIZE == 48
    assert cbt.BLOCK_SIZE == 65536
    assert cbt.block_count(1) == 1
    assert cbt.block_count(65536) == 1
    assert cbt.block_count(65537) == 2
    assert cbt.bitmap_size(64 * MiB) == 128
    assert cbt.bitmap_size(8 * 65536) == 1
    assert cbt.bitmap_size(8 * 65536 + 1) == 2
    assert cbt.log_size(10489856) == 69  # empty-odd.cbtlog
    assert cbt.bitmap_size(cbt.MAX_DISK_SIZE) == 1 << 45


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_reference_log_parses_as_its_manifest_says(name: str) -> None:
    want = MANIFEST[name]
    data = raw(name)
    assert len(data) == want["file_size"]
    log = cbt.parse_log(data, path=name)
    assert str(log.header.parent) == want["parent"]
    assert str(log.header.child) == want["child"]
    assert int(log.header.consistent) == want["consistent"]
    assert log.header.size == want["size"]
    assert len(log.bitmap) == want["bitmap_bytes"] == log.header.bitmap_size
    assert log.bits_set() == want["bits_set"]
    assert log.encode() == data
    assert cbt.parse_header(data) == log.header


def test_header_field_offsets() -> None:
    header = cbt.CbtHeader(
        size=0x0102030405060708,
        parent=uuid.UUID("11111111-2222-3333-4444-555555555555"),
        child=uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"),
        consistent=True,
    )
    data = header.encode()
    assert len(data) == 48
    assert data[0:16] == bytes.fromhex("11111111222233334444555555555555")
    assert data[16:32] == bytes.fromhex("aaaaaaaabbbbccccddddeeeeeeeeeeee")
    assert data[32:36] == b"\x01\0\0\0"
    assert data[36:40] == bytes(4)
    assert data[40:48] == bytes.fromhex("0807060504030201")


def test_new_log_is_what_cbt_util_create_writes() -> None:
    assert cbt.CbtLog.new(64 * MiB).encode() == raw("empty-64m.cbtlog")
    assert cbt.CbtLog.new(10489856).encode() == raw("empty-odd.cbtlog")


def test_padding_is_kept() -> None:
    data = bytearray(raw("empty-64m.cbtlog"))
    data[36:40] = b"\xde\xad\xbe\xef"
    log = cbt.parse_log(bytes(data))
    assert log.header.padding == 0xEFBEADDE
    assert log.encode() == bytes(data)


# --------------------------------------------------------------------------- errors
def test_every_prefix_shorter_than_the_header_is_truncated() -> None:
    data = raw("fields.cbtlog")
    for n in range(48):
        with pytest.raises(cbt.TruncatedLogError) as info:
            cbt.parse_log(data[:n], path="f")
        assert info.value.length == n
        assert info.value.errno == errno.EIO
        assert "f: cbt log: truncated" in str(info.value)


def test_every_prefix_shorter_than_the_bitmap_is_too_small() -> None:
    data = raw("raw-writes.cbtlog")
    for n in range(48, len(data)):
        with pytest.raises(cbt.BitmapTooSmallError) as info:
            cbt.parse_log(data[:n])
        assert (info.value.needed, info.value.available) == (128, n - 48)
        assert info.value.disk_size == 64 * MiB
        assert info.value.errno == errno.EIO


def test_trailing_bytes_are_a_size_mismatch() -> None:
    data = raw("fields.cbtlog")
    with pytest.raises(cbt.SizeMismatchError) as info:
        cbt.parse_log(data + b"\0")
    assert (info.value.expected, info.value.actual) == (80, 81)
    assert info.value.errno == errno.EINVAL
    assert "size mismatch" in str(info.value)
    assert cbt.parse_log(data + b"junk", allow_trailing=True).encode() == data


def test_zero_size_is_foreign() -> None:
    data = bytearray(raw("fields.cbtlog"))
    data[40:48] = bytes(8)
    with pytest.raises(cbt.ForeignLogError) as info:
        cbt.parse_log(bytes(data))
    assert info.value.field == "size"
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("flag", [2, -1, 0x7FFFFFFF])
def test_flag_other_than_0_or_1_is_foreign(flag: int) -> None:
    data = bytearray(raw("fields.cbtlog"))
    data[32:36] = flag.to_bytes(4, "little", signed=True)
    with pytest.raises(cbt.ForeignLogError, match="not a CBT log") as info:
        cbt.parse_header(bytes(data))
    assert info.value.value == flag


def test_text_file_is_rejected() -> None:
    text = b"root:x:0:0:root:/root:/bin/bash\n" * 4
    with pytest.raises(cbt.CbtLogError):
        cbt.parse_log(text)


def test_bitmap_must_cover_the_disk() -> None:
    header = cbt.parse_header(raw("empty-odd.cbtlog"))  # 161 blocks, 21 bytes
    cbt.check_covers(header, 10489856)
    cbt.check_covers(header, 168 * 65536)  # the bits of the last byte exist
    with pytest.raises(cbt.BitmapTooSmallError) as info:
        cbt.check_covers(header, 168 * 65536 + 1)
    assert info.value.errno == errno.EINVAL
    assert (info.value.needed, info.value.available) == (22, 21)
    with pytest.raises(cbt.BitmapTooSmallError) as info:
        cbt.check_covers(header, 64 * MiB)
    assert (info.value.needed, info.value.available) == (128, 21)


def test_constructor_checks() -> None:
    with pytest.raises(InvalidArgument):
        cbt.CbtHeader(size=0)
    with pytest.raises(InvalidArgument):
        cbt.CbtHeader(size=1 << 64)
    with pytest.raises(InvalidArgument):
        cbt.CbtLog(cbt.CbtHeader(size=64 * MiB), bytes(127))


# ----------------------------------------------------------------- grow and coalesce
def test_grown_extends_with_zero_bits() -> None:
    log = cbt.CbtLog.new(8 * MiB)
    assert cbt.grown(log, 40 * MiB).encode() == raw("grown.cbtlog")
    marked = cbt.parse_log(raw("raw-writes.cbtlog"))
    bigger = cbt.grown(marked, 100 * MiB)
    assert bigger.bits_set() == marked.bits_set()
    assert bigger.header.size == 100 * MiB
    assert cbt.grown(marked, 64 * MiB) == marked
    with pytest.raises(InvalidArgument, match=r"Size smaller than current file size \(67108864\)"):
        cbt.grown(marked, 64 * MiB - 1)


def test_coalesced_matches_the_c_tool() -> None:
    parent = cbt.parse_log(raw("co-parent.cbtlog"))
    child = cbt.parse_log(raw("vhd-writes.cbtlog"))
    assert cbt.coalesced(parent, child).encode() == raw("co-child.cbtlog")
    small = cbt.CbtLog.new(8 * MiB)
    with pytest.raises(InvalidArgument, match="Parent bitmap larger than child bitmap"):
        cbt.coalesced(parent, small)
    merged = cbt.coalesced(small, child)
    assert merged == child


# ----------------------------------------------------------------------------- bits
def mark(size: int, writes: list[tuple[int, int]]) -> cbt.CbtLog:
    bitmap = bytearray(cbt.bitmap_size(size))
    for offset, length in writes:
        blocks = cbt.blocks_touched(offset, length)
        cbt.set_range(bitmap, blocks.start, len(blocks))
    return cbt.CbtLog(cbt.CbtHeader(size=size), bytes(bitmap))


def test_the_reference_writes_mark_the_reference_bits() -> None:
    # The writes behind the C tapdisk's logs (reference/cbt.md, "Fixtures").
    raw_writes = [(0, 4096), (65536, 512), (1048064, 1024), (10 * MiB, 3 * MiB),
                  (64 * MiB - 512, 512)]
    assert mark(64 * MiB, raw_writes).encode() == raw("raw-writes.cbtlog")
    vhd_writes = [(128 * 1024, 65536), (5 * MiB, 100 * 1024), (20 * MiB, MiB)]
    assert mark(64 * MiB, vhd_writes).encode() == raw("vhd-writes.cbtlog")


def test_blocks_touched() -> None:
    assert cbt.blocks_touched(0, 1) == range(0, 1)
    assert cbt.blocks_touched(65535, 2) == range(0, 2)
    assert cbt.blocks_touched(65536, 65536) == range(1, 2)
    assert cbt.blocks_touched(65536, 65537) == range(1, 3)


def test_bit_order_is_least_significant_first() -> None:
    bitmap = bytearray(2)
    cbt.set_range(bitmap, 0, 1)
    assert bitmap == b"\x01\x00"
    cbt.set_range(bitmap, 9, 1)
    assert bitmap == b"\x01\x02"
    cbt.set_range(bitmap, 3, 7)
    assert bitmap == b"\xf9\x03"
    assert [i for i in range(16) if cbt.is_set(bitmap, i)] == [0, 3, 4, 5, 6, 7, 8, 9]
    assert list(cbt.iter_set(bitmap)) == [0, 3, 4, 5, 6, 7, 8, 9]


def test_set_range_across_many_bytes() -> None:
    bitmap = bytearray(8)
    cbt.set_range(bitmap, 5, 50)
    assert list(cbt.iter_set(bitmap)) == list(range(5, 55))
    cbt.set_range(bitmap, 0, 0)
    assert list(cbt.iter_set(bitmap)) == list(range(5, 55))


def test_merge_into() -> None:
    target = bytearray(b"\x01\x00\x80")
    cbt.merge_into(target, b"\x02\x10")
    assert target == b"\x03\x10\x80"
    cbt.merge_into(target, b"")
    assert target == b"\x03\x10\x80"


def test_proto_cbt_imports_no_io_module() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cbt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"socket", "os", "asyncio", "select", "selectors", "io", "subprocess",
                        "mmap", "pathlib", "shutil"}

