"""``vhd-util``: the VHD tool. Argument parsing and printing only; the operations live in
:mod:`blktap.vhdutil`.

Exit status: 0 on success, otherwise a positive errno (22, EINVAL, for usage errors and
for ``check`` finding a fault), as the C tool.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence

from blktap import __version__
from blktap.cli.usage import EinvalParser, command_parser, run_verb
from blktap.errors import InvalidArgument

PROG = "vhd-util"

OVERVIEW = """\
Create, inspect, check, repair and transform VHD images (fixed, dynamic and
differencing) as blktap's tapdisk uses them.

Images are written in blktap's layout (creator "tap" 1.3, a batmap, relative parent
locators) and are readable by the C vhd-util and tapdisk, qemu-img (format vpc) and
libvhdi. Sizes given with -s/-S are in MiB unless stated otherwise.
"""

COMMANDS_EPILOG = """\
commands:
  create     create a dynamic (or, with -r, fixed) VHD
  snapshot   create a differencing VHD over a parent
  query      print the size, parent, flags or chain depth of a VHD
  read       dump headers, BAT, bitmaps, batmap or data
  set        set the hidden flag or the batmap marker
  repair     restore a lost or corrupt trailing footer
  resize     grow a VHD
  fill       allocate every block
  coalesce   merge a differencing VHD into its parent
  modify     change the parent, physical size, or drop all data (dangerous)
  scan       print one line per VHD, optionally as a tree of parents
  check      validate a VHD's metadata
  revert     undo an interrupted resize from its journal
  key        print, set, check or calculate an encrypted VHD's key hash
  copy       copy a VHD (and what its parents hold) into a new VHD

Run "vhd-util COMMAND -h" for the options of one command. "--debug" anywhere after
COMMAND is removed before the options are parsed (as the C tool) and turns on debug
messages on standard error; standard output is the same with or without it.

exit status:
  0 on success; otherwise a positive errno: 22 (EINVAL) for usage errors and for an
  image that check finds invalid, 2 (ENOENT) for a missing file, 34 (ERANGE) for a read
  past the end, 17 (EEXIST) for a file or journal that exists already.
"""


class UsageError(Exception):
    pass


_Parser = EinvalParser


def _parser(name: str, description: str, epilog: str = "") -> _Parser:
    return command_parser(PROG, name, description, epilog)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _mb(value: int, what: str, p: _Parser) -> int:
    if value <= 0:
        p.error(f"invalid {what}: {value} (must be a positive number of MiB)")
    return value << 20


def _progress(flag: bool) -> bool | None:
    return True if flag else None


# ----------------------------------------------------------------------------- create
def _create(argv: Sequence[str]) -> int:
    p = _parser(
        "create",
        "Create NAME, an empty dynamic VHD of SIZE MiB (a fixed one with -r).",
        "A dynamic disk takes a few KiB until written to; a fixed disk is a sparse file\n"
        "of SIZE MiB followed by the footer.\n\n"
        "example:\n  vhd-util create -n disk.vhd -s 10240 -S 20480",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="file to create")
    p.add_argument("-s", dest="size", type=int, required=True, metavar="MB",
                   help="virtual size in MiB")
    p.add_argument("-S", dest="prealloc", type=int, metavar="MB",
                   help="size the metadata (BAT) for a disk of MB MiB (at least SIZE), so "
                        "that a later 'resize -f' can grow the disk up to MB without "
                        "moving data (ignored with -r)")
    p.add_argument("-r", dest="fixed", action="store_true", help="create a fixed VHD")
    a = p.parse_args(argv)
    from blktap.vhdutil.create import create

    size = _mb(a.size, "size", p)
    prealloc = _mb(a.prealloc, "metadata size", p) if a.prealloc is not None else None
    if prealloc is not None and prealloc < size:
        # The C tool's check and words.
        raise InvalidArgument("Error: <-S size> must be greater than <-s size>")
    create(a.name, size, fixed=a.fixed, prealloc=None if a.fixed else prealloc)
    return 0


# --------------------------------------------------------------------------- snapshot
def _snapshot(argv: Sequence[str]) -> int:
    p = _parser(
        "snapshot",
        "Create NAME, a differencing VHD over PARENT: it reads as PARENT until written to.",
        "Without -e, empty differencing disks below PARENT are skipped: NAME links to the\n"
        "first non-empty image down the chain. The new disk stores PARENT's base name,\n"
        "uuid and modification time, and three relative parent locators (MACX, W2KU,\n"
        "W2RU), as the C vhd-util.\n\n"
        "example:\n  vhd-util snapshot -n child.vhd -p base.vhd",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="file to create")
    p.add_argument("-p", dest="parent", required=True, metavar="PARENT", help="parent image")
    p.add_argument("-l", dest="limit", type=int, metavar="DEPTH",
                   help="refuse (ENOSPC) if the new chain would hold more than DEPTH images")
    p.add_argument("-m", dest="raw", action="store_true",
                   help="PARENT is a raw image (opened with the aio driver), or an "
                        "RBD image named rbd:POOL/IMAGE[:key=value...]")
    p.add_argument("-S", dest="prealloc", type=int, metavar="MB",
                   help="size the metadata for a disk of MB MiB (see create -S)")
    p.add_argument("-e", dest="exact", action="store_true",
                   help="link to PARENT exactly, even if it is an empty differencing disk")
    a = p.parse_args(argv)
    from blktap.vhdutil.create import snapshot

    prealloc = _mb(a.prealloc, "metadata size", p) if a.prealloc is not None else None
    snapshot(a.name, a.parent, raw_parent=a.raw, depth_limit=a.limit, prealloc=prealloc,
             exact=a.exact)
    return 0


# ------------------------------------------------------------------------------ query
def _query(argv: Sequence[str]) -> int:
    p = _parser(
        "query",
        "Print facts about NAME, one per line, in the order of the options below.",
        "output formats (as the C vhd-util):\n"
        "  -v  the virtual size in MiB, e.g. 64\n"
        "  -s  the physical size in bytes (end of the data plus the footer)\n"
        "  -p  the parent's path, or \"NAME has no parent\"\n"
        "  -f  \"hidden: N\"\n"
        "  -m  \"marker: N\"\n"
        "  -d  \"chain depth: N\" (1 for an image without parent)\n"
        "  -a  the number of allocated blocks\n"
        "  -S  the largest size in MiB 'resize -f' can reach",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    for flag, dest, text in (
        ("-v", "size", "print the virtual size (MiB)"),
        ("-s", "physize", "print the physical size (bytes)"),
        ("-p", "parent", "print the parent"),
        ("-f", "fields", "print the fields (hidden)"),
        ("-m", "marker", "print the batmap marker"),
        ("-d", "depth", "print the chain depth"),
        ("-a", "allocated", "print the allocated block count"),
        ("-S", "fastresize", "print the maximum size for 'resize -f' (MiB)"),
        ("-u", "unresolved", "do not resolve the parent path (print it as stored)"),
        ("-b", "backup", "do not trust the footer: use the backup copy at offset 0"),
    ):
        p.add_argument(flag, dest=dest, action="store_true", help=text)
    a = p.parse_args(argv)
    from blktap.proto.vhd.constants import DiskType
    from blktap.vhd.image import network_parent
    from blktap.vhdutil.create import chain_depth
    from blktap.vhdutil.query import query

    info = query(a.name, resolve_parent=a.parent and not a.unresolved, use_backup=a.backup)
    if a.size:
        _out(str(info.virtual_size_mb))
    if a.physize:
        _out(str(info.physical_size))
    if a.parent:
        if info.disk_type != DiskType.DIFFERENCING or info.parent is None:
            _out(f"{a.name} has no parent")
        elif a.unresolved or network_parent(info.parent) is not None:
            _out(info.parent)  # an rbd:pool/image parent is no file to resolve
        else:
            _out(os.path.realpath(info.parent))  # as C vhd_find_parent: realpath
    if a.fields:
        _out(f"hidden: {info.hidden}")
    if a.marker:
        _out(f"marker: {info.marker or 0}")
    if a.depth:
        _out(f"chain depth: {chain_depth(a.name)}")
    if a.allocated:
        _out(str(info.allocated_blocks))
    if a.fastresize:
        _out(str(info.max_size_mb))
    return 0


# ------------------------------------------------------------------------------- read
def _read(argv: Sequence[str]) -> int:
    p = _parser(
        "read",
        "Dump NAME's metadata or data. Several dumps may be combined; they appear in the\n"
        "order listed below. Bitmaps, the BAT bitmap, the batmap and data are written\n"
        "raw to standard output.",
        "example:\n  vhd-util read -n disk.vhd -p\n  vhd-util read -n disk.vhd -b 0 -c 16",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-p", dest="headers", action="store_true",
                   help="print the footer, header, parent locators and batmap header")
    p.add_argument("-t", dest="translate", type=int, metavar="SEC",
                   help="translate logical sector SEC to its place in the file")
    p.add_argument("-b", dest="bat", type=int, metavar="BLK", help="print BAT entry BLK")
    p.add_argument("-B", dest="bat_bitmap", action="store_true",
                   help="print the whole BAT as a bitmap (raw)")
    p.add_argument("-m", dest="bitmap", type=int, metavar="BLK",
                   help="print block BLK's sector bitmap (raw)")
    p.add_argument("-i", dest="test_bitmap", type=int, metavar="SEC",
                   help="test the bitmap bit of logical sector SEC")
    p.add_argument("-e", dest="extents", type=int, metavar="SEC",
                   help="list the allocated extents (start count) from sector SEC")
    p.add_argument("-a", dest="batmap", action="store_true", help="print the batmap (raw)")
    p.add_argument("-j", dest="test_batmap", type=int, metavar="BLK",
                   help="test the batmap bit of block BLK (printed on standard error)")
    p.add_argument("-d", dest="data", type=int, metavar="BLK",
                   help="print block BLK's data (raw)")
    p.add_argument("-c", dest="count", type=int, default=1, metavar="NUM",
                   help="number of units (blocks, sectors or bytes) for the above "
                        "(default 1)")
    p.add_argument("-r", dest="read_sectors", type=int, metavar="SEC",
                   help="read NUM sectors of the virtual disk at SEC (raw)")
    p.add_argument("-R", dest="read_bytes", type=int, metavar="BYTE",
                   help="read NUM bytes of the virtual disk at BYTE (raw)")
    p.add_argument("-x", dest="hex", action="store_true", help="print numbers in hex")
    p.add_argument("-C", dest="cache", action="store_true",
                   help="accepted for compatibility (the C tool's cached open); no effect")
    a = p.parse_args(argv)
    if a.count <= 0:
        p.error(f"invalid count {a.count}")
    for field in ("translate", "bat", "bitmap", "test_bitmap", "extents", "test_batmap",
                  "data", "read_sectors", "read_bytes"):
        v = getattr(a, field)
        if v is not None and v < 0:
            p.error(f"invalid {field.replace('_', ' ')}: {v}")
    from blktap.vhdutil.dump import DumpOptions, dump

    opts = DumpOptions(
        headers=a.headers, translate=a.translate, bat=a.bat, bat_bitmap=a.bat_bitmap,
        bitmap=a.bitmap, test_bitmap=a.test_bitmap, extents=a.extents, batmap=a.batmap,
        test_batmap=a.test_batmap, data=a.data, read_sectors=a.read_sectors,
        read_bytes=a.read_bytes, count=a.count, hex=a.hex,
    )
    for stream, payload in dump(a.name, opts):
        target = sys.stdout if stream == "out" else sys.stderr
        if isinstance(payload, bytes):
            target.flush()
            target.buffer.write(payload)
            target.buffer.flush()
        else:
            target.write(payload + "\n")
    return 0


# -------------------------------------------------------------------------------- set
def _set(argv: Sequence[str]) -> int:
    p = _parser(
        "set",
        "Set one of blktap's flags: 'hidden' (footer byte 85; both footer copies are\n"
        "rewritten) or 'marker' (the batmap header's marker byte).",
        "example:\n  vhd-util set -n base.vhd -f hidden -v 1",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-f", dest="field", required=True, choices=("hidden", "marker"),
                   metavar="FIELD", help="hidden or marker")
    p.add_argument("-v", dest="value", required=True, type=int, metavar="N",
                   help="the new value (0..255)")
    a = p.parse_args(argv)
    if not 0 <= a.value <= 255:
        p.error(f"invalid value {a.value}: must be 0..255")
    from blktap.vhdutil.setfield import set_field

    set_field(a.name, a.field, a.value)
    return 0


# ----------------------------------------------------------------------------- repair
def _repair(argv: Sequence[str]) -> int:
    p = _parser(
        "repair",
        "Rewrite NAME's footers: the trailing footer goes right after the last block (the\n"
        "file is cut there) and the backup copy at offset 0 is made to match. A lost or\n"
        "corrupt trailing footer is restored from the backup copy; with -b the backup is\n"
        "used even when the trailing footer is valid. A null uuid is replaced.",
        "Damage to other structures (header, BAT) is reported, not repaired.",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-b", dest="backup", action="store_true", help="use the backup footer")
    a = p.parse_args(argv)
    from blktap.vhdutil.repair import repair

    repair(a.name, use_backup=a.backup)
    return 0


# ----------------------------------------------------------------------------- resize
def _resize(argv: Sequence[str]) -> int:
    p = _parser(
        "resize",
        "Resize NAME to SIZE MiB. With -f only the footers change, which works while SIZE\n"
        "fits the metadata ('query -S'; the size is rounded up to whole blocks). With -j\n"
        "the BAT grows in place as needed: blocks in its way are moved to the end of the\n"
        "file, and every byte rewritten in place is saved to JOURNAL first. A failed\n"
        "resize is undone from the journal; if the process dies, 'vhd-util revert -n\n"
        "NAME -j JOURNAL' restores the image. The journal is removed when done.",
        "Only images created by blktap (creator \"tap\") are resized, as with the C tool.\n"
        "Shrinking (with -j) drops a dynamic disk's blocks past the new end; fixed disks\n"
        "only grow.\n\nexample:\n  vhd-util resize -n disk.vhd -s 20480 -j disk.journal",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-s", dest="size", type=int, required=True, metavar="MB",
                   help="new virtual size in MiB")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-j", dest="journal", metavar="JOURNAL", help="journal file to create")
    g.add_argument("-f", dest="fast", action="store_true",
                   help="fast resize: footers only (within 'query -S')")
    a = p.parse_args(argv)
    from blktap.vhdutil.resize import resize

    resize(a.name, _mb(a.size, "size", p), journal=a.journal, fast=a.fast)
    return 0


# ------------------------------------------------------------------------------- fill
def _fill(argv: Sequence[str]) -> int:
    p = _parser(
        "fill",
        "Allocate every block of NAME. Its contents do not change: a dynamic disk's\n"
        "unwritten sectors become explicit zeros (space reserved), a differencing disk's\n"
        "are copied from its parents. With -b only the BAT and bitmaps are initialised\n"
        "for the blocks not yet allocated, no data is written (they read as zeros, even\n"
        "over a parent), optionally for sectors -f..-t only. Shows a progress bar when\n"
        "standard error is a terminal.",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-b", dest="bat_only", action="store_true",
                   help="initialise the BAT and bitmaps, don't write to the data blocks "
                        "(much faster)")
    p.add_argument("-f", dest="first", type=int, metavar="SEC",
                   help="start from the block of this sector (with -b)")
    p.add_argument("-t", dest="last", type=int, metavar="SEC",
                   help="up to the block of this sector, inclusive (with -b)")
    p.add_argument("-B", dest="ignore_2tb", action="store_true",
                   help="accepted with -b for compatibility; blocks past 2 TiB still fail, "
                        "as BAT entries are 32-bit")
    a = p.parse_args(argv)
    if (a.first is not None or a.last is not None) and not a.bat_only:
        p.error("-f/-t can only be used with -b")
    if a.ignore_2tb and not a.bat_only:
        p.error("-B can only be used with -b")
    if a.first is not None and a.last is not None and a.last < a.first:
        p.error(f"invalid sector range {a.first}-{a.last}")
    if (a.first is not None and a.first < 0) or (a.last is not None and a.last < 0):
        p.error("sectors must not be negative")
    from blktap.vhdutil.fill import fill

    fill(a.name, bat_only=a.bat_only, first_sector=a.first, last_sector=a.last)
    return 0


# --------------------------------------------------------------------------- coalesce
def _coalesce(argv: Sequence[str]) -> int:
    p = _parser(
        "coalesce",
        "Merge NAME, a differencing disk, into its parent: every sector NAME holds is\n"
        "written to the parent, which then reads as NAME did. NAME itself is unchanged.\n"
        "Prints \"Coalesced N sectors\" (as the current C tool).",
        "The data is copied in the kernel (copy_file_range), a block at a time.\n"
        "An interrupted coalesce leaves a valid parent; run it again to finish.",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-s", dest="sparse", action="store_true",
                   help="sparse: do not allocate parent blocks for all-zero child data")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show progress on standard error even when it is not a terminal")
    a = p.parse_args(argv)
    from blktap.vhdutil.coalesce import coalesce

    result = coalesce(a.name, sparse=a.sparse, progress=_progress(a.progress))
    _out(f"Coalesced {result.bytes_copied // 512} sectors")
    return 0


# ----------------------------------------------------------------------------- modify
def _modify(argv: Sequence[str]) -> int:
    p = _parser(
        "modify",
        "*** Dangerous operations, use with care ***\n\n"
        "Change NAME's metadata: its parent (-p, a raw one with -m), its physical size\n"
        "(-s, in bytes: the trailing footer moves to SIZE-512), or drop every block (-z).",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-p", dest="parent", metavar="PARENT", help="new parent")
    p.add_argument("-m", dest="raw", action="store_true", help="the new parent is raw")
    p.add_argument("-s", dest="size", type=int, metavar="BYTES", help="new physical size")
    p.add_argument("-z", dest="zero", action="store_true",
                   help="zero: forget every block (kill data)")
    a = p.parse_args(argv)
    if a.raw and not a.parent:
        p.error("-m needs -p")
    if a.parent is None and a.size is None and not a.zero:
        p.error("nothing to do: give -p, -s or -z")
    from blktap.vhdutil import modify

    if a.zero:
        modify.zero_data(a.name)
    if a.size is not None:
        modify.set_physical_size(a.name, a.size)
    if a.parent is not None:
        modify.set_parent(a.name, a.parent, raw=a.raw)
    return 0


# ------------------------------------------------------------------------------- scan
def _scan(argv: Sequence[str]) -> int:
    p = _parser(
        "scan",
        "Print one line per VHD:\n"
        "  vhd=NAME capacity=BYTES size=BYTES hidden=N parent=PARENT|none\n"
        "or, for an image that cannot be read:\n"
        "  vhd=NAME scan-error=-ERRNO error-message='WHAT'",
        "capacity is the virtual size, size the file's size. Names are base names unless\n"
        "-v. With -p the images are printed as trees: children indented three spaces\n"
        "below their parent, unhidden ones first.",
    )
    p.add_argument("-m", dest="filter", metavar="PATTERN",
                   help="also scan the files this glob pattern matches")
    p.add_argument("-f", dest="fast", action="store_true",
                   help="fast: take parent names from the header, not the locators")
    p.add_argument("-c", dest="cont", action="store_true", help="continue on failure")
    p.add_argument("-l", dest="volume", metavar="VG",
                   help="scan an LVM volume group (not supported: ENOSYS)")
    p.add_argument("-p", dest="pretty", action="store_true", help="pretty print as trees")
    p.add_argument("-a", dest="parents", action="store_true", help="scan parents too")
    p.add_argument("-v", dest="verbose", action="store_true", help="print full paths")
    p.add_argument("-M", dest="markers", action="store_true", help="print batmap markers")
    p.add_argument("files", nargs="*", metavar="FILES")
    a = p.parse_args(argv)
    if not a.files and a.filter is None:
        p.error("give FILES or -m PATTERN")
    from blktap.vhdutil.scan import ScanOptions, scan

    result = scan(a.files, ScanOptions(
        filter=a.filter, fast=a.fast, continue_on_failure=a.cont, volume=a.volume,
        pretty=a.pretty, parents=a.parents, verbose=a.verbose, markers=a.markers,
    ))
    for line in result.lines:
        _out(line)
    return result.errno


# ------------------------------------------------------------------------------ check
def _check(argv: Sequence[str]) -> int:
    p = _parser(
        "check",
        "Validate NAME's metadata as the C vhd-util does: footers (cookie, checksum,\n"
        "features, version, offsets, timestamp, creator, geometry, type, flags, uuid,\n"
        "primary against backup), dynamic header, differencing fields and parent\n"
        "locators, batmap, and the BAT (no block overlaps the metadata, another block,\n"
        "or runs past the end of the file).\n\n"
        "Prints \"NAME is valid\" and exits 0 (a valid fixed disk prints nothing), or\n"
        "prints the fault (the C tool's words), \"NAME appears invalid; dumping\n"
        "metadata\" and the headers, and exits 22.",
        "statistics (-s), per image of the chain, root first:\n"
        "  NAME: secs allocated: 0xN secs written: 0xN (P%)"
        " [secs not in parent: 0xN (P%) secs not in ancestors: 0xN (P%)]",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-i", dest="ignore_primary", action="store_true",
                   help="ignore an invalid primary (trailing) footer: check the backup "
                        "copy at offset 0 instead")
    p.add_argument("-I", dest="ignore_uuid", action="store_true",
                   help="ignore parent uuid mismatches")
    p.add_argument("-t", dest="ignore_time", action="store_true",
                   help="ignore timestamps in the future")
    p.add_argument("-B", dest="ignore_overlap", action="store_true",
                   help="do not check the BAT for overlapping blocks (precludes -s, -b)")
    p.add_argument("-p", dest="parents", action="store_true", help="check the parents too")
    p.add_argument("-b", dest="bitmaps", action="store_true",
                   help="check bitmaps: no sector whose bitmap bit is clear may hold data")
    p.add_argument("-s", dest="stats", action="store_true",
                   help="print sector statistics (instead of \"is valid\")")
    a = p.parse_args(argv)
    if a.ignore_overlap and (a.stats or a.bitmaps):
        p.error("-B precludes -s and -b")
    from blktap.vhdutil.check import CheckOptions, check

    report = check(
        a.name,
        options=CheckOptions(
            ignore_missing_primary=a.ignore_primary,
            ignore_timestamps=a.ignore_time,
            ignore_bat_overlap=a.ignore_overlap,
        ),
        ignore_parent_uuid=a.ignore_uuid,
        check_parents=a.parents,
        check_data=a.bitmaps,
        stats=a.stats,
    )
    for line in report.lines:
        _out(line)
    return 0 if report.valid else errno.EINVAL


# -------------------------------------------------------------------------------- key
def _key(argv: Sequence[str]) -> int:
    p = _parser(
        "key",
        "Print, set, check or calculate the key hash of an encrypted VHD: SHA-256 of a\n"
        "32-byte nonce followed by the key. It is stored in the batmap header, or in the\n"
        "extended attribute user.com.citrix.xenclient.backend.keyhash for an image\n"
        "without a batmap, as the C vhd-util stores it.",
        "forms (as the C vhd-util):\n"
        "  -p -n NAME                              print \"none\" or \"NONCE HASH\" (hex)\n"
        "  -s -n NAME (-k KEYFILE | -H HASH) [-N NONCE]   set (empty, non-fixed VHDs only)\n"
        "  -c -n NAME -k KEYFILE                   check a key against the stored hash\n"
        "  -C -k KEYFILE [-N NONCE]                print the hash of a key\n\n"
        "A key file is named <NAME without .vhd>,aes-xts-plain,<512|256>.key and holds\n"
        "exactly that many bits (with -C, up to 64 bytes). The nonce is zeros unless -N\n"
        "gives 64 hex digits; -H takes 64 hex digits. -p may be combined with -s or -c.",
    )
    p.add_argument("-n", dest="name", metavar="NAME", help="the VHD image")
    p.add_argument("-k", dest="key_file", metavar="KEYFILE", help="file holding the key")
    p.add_argument("-N", dest="nonce", metavar="NONCE", help="nonce, 64 hex digits")
    p.add_argument("-H", dest="hash", metavar="HASH", help="key hash, 64 hex digits")
    p.add_argument("-s", dest="set", action="store_true", help="set the key hash")
    p.add_argument("-c", dest="check", action="store_true", help="check a key")
    p.add_argument("-C", dest="calc", action="store_true", help="calculate a key's hash")
    p.add_argument("-p", dest="print", action="store_true", help="print the key hash")
    a = p.parse_args(argv)
    from blktap.vhdutil import key

    if a.calc:
        if a.key_file is None:
            p.error("-C needs -k KEYFILE")
        _out(key.calculate(a.key_file, a.nonce).hex())
        return 0
    # The C tool's rules: a name; -s with exactly one of -k/-H and not with -c; -c with
    # -k and neither -N nor -H; otherwise -p.
    if a.name is None:
        p.error("-n NAME is required")
    if a.set:
        if a.check:
            p.error("-s and -c exclude each other")
        if (a.key_file is None) == (a.hash is None):
            p.error("-s needs exactly one of -k KEYFILE and -H HASH")
    elif a.check:
        if a.key_file is None:
            p.error("-c needs -k KEYFILE")
        if a.nonce is not None or a.hash is not None:
            p.error("-c takes neither -N nor -H")
    elif not a.print:
        p.error("give -p, -s, -c or -C")
    if a.set:
        key.set_keyhash(a.name, key_path=a.key_file, hash_hex=a.hash, nonce_hex=a.nonce)
    elif a.check:
        key.check_key(a.name, a.key_file)
    if a.print:
        _out(key.read_keyhash(a.name).describe())
    return 0


# ------------------------------------------------------------------------------- copy
def _copy(argv: Sequence[str]) -> int:
    p = _parser(
        "copy",
        "Copy NAME's virtual disk into NEW, a new VHD: a fixed copy of a fixed disk, a\n"
        "standalone dynamic copy (metadata sized for the same size, every block that\n"
        "holds data written in full) of a dynamic or differencing one.",
        "Encryption (-k KEYFILE, -E) is accepted by the C tool with libblockcrypto; it is\n"
        "refused here (exit 95, EOPNOTSUPP) before anything is written.",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD to copy")
    p.add_argument("-N", dest="new", required=True, metavar="NEW", help="file to create")
    p.add_argument("-k", dest="key_file", metavar="KEYFILE",
                   help="encrypt with this key (not supported)")
    p.add_argument("-E", dest="key_stdin", action="store_true",
                   help="encrypt with a key read from standard input (not supported)")
    a = p.parse_args(argv)
    from blktap.vhdutil.copy import copy, refuse_encryption

    refuse_encryption(a.key_file, a.key_stdin)
    copy(a.name, a.new)
    return 0


# ----------------------------------------------------------------------------- revert
def _revert(argv: Sequence[str]) -> int:
    p = _parser(
        "revert",
        "Undo an interrupted 'resize -j JOURNAL' of NAME: the byte ranges saved in the\n"
        "journal are written back and the file is cut to its old size; the journal is\n"
        "then removed. A journal that was never completed means NAME was not touched.",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD image")
    p.add_argument("-j", dest="journal", required=True, metavar="JOURNAL")
    a = p.parse_args(argv)
    from blktap.vhdutil.journal import revert

    revert(a.name, a.journal)
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "create": _create,
    "snapshot": _snapshot,
    "query": _query,
    "read": _read,
    "set": _set,
    "repair": _repair,
    "resize": _resize,
    "fill": _fill,
    "coalesce": _coalesce,
    "modify": _modify,
    "scan": _scan,
    "check": _check,
    "revert": _revert,
    "key": _key,
    "copy": _copy,
}


def _top_parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} COMMAND [OPTIONS]",
        description=OVERVIEW,
        epilog=COMMANDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return p


DEBUG_FLAG = "--debug"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _LevelFormatter(logging.Formatter):
    """``vhd-util CMD: warning: ...`` / ``vhd-util CMD: debug: ...``."""

    def __init__(self, cmd: str) -> None:
        super().__init__()
        self.cmd = cmd

    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG} {self.cmd}: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(cmd: str, debug: bool) -> None:
    """Library warnings (e.g. "trailing footer invalid, using the backup") go to standard
    error prefixed with the command, and with ``debug`` the library's debug messages too
    (console use only: in-process callers keep their own logging configuration). Never
    standard output, which scripts parse."""
    root = logging.getLogger("blktap")
    if not any(getattr(h, "_vhd_util", False) for h in root.handlers):
        handler = _StderrHandler()
        handler._vhd_util = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    for h in root.handlers:
        if getattr(h, "_vhd_util", False):
            h.setFormatter(_LevelFormatter(cmd))
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def strip_debug(args: Sequence[str]) -> tuple[list[str], bool]:
    """``args`` (after the command) without any ``--debug``, and whether there was one:
    the C tool removes it from every position before parsing the options."""
    kept = [a for a in args if a != DEBUG_FLAG]
    return kept, len(kept) != len(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not args:
        top.print_usage(sys.stderr)
        sys.stderr.write(COMMANDS_EPILOG)
        return errno.EINVAL
    if args[0] in ("-h", "--help", "-V", "--version"):
        top.parse_args(args[:1])
        return 0
    cmd = args[0]
    rest, debug = strip_debug(args[1:])
    run = COMMANDS.get(cmd)
    if run is None:
        top.error(f"unknown command {cmd!r}")
    if argv is None:
        _setup_logging(cmd, debug)
    if debug:
        logging.getLogger(__name__).debug("%s %s (pid %d)", cmd, " ".join(rest), os.getpid())
    return run_verb(PROG, cmd, run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
