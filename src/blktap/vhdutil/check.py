"""``vhd-util check``: the sans-IO validator (:func:`blktap.proto.vhd.check_vhd`) fed from
files, with the C tool's options and output:

* ``-i`` skip an invalid primary footer (judge the backup at offset 0), ``-I`` ignore
  parent uuids, ``-t`` ignore timestamps, ``-B`` do not check blocks for overlaps
  (precludes ``-s``/``-b``);
* ``-p`` check the parents too (after the image, as the C tool);
* ``-b`` check data: no allocated sector whose bitmap bit is clear may hold data
  ("sector 0x.. of block 0x.. has data where bitmap is clear");
* ``-s`` statistics instead of "is valid": per image of the chain, root first,
  "NAME: secs allocated: 0x.. secs written: 0x.. (P%)" and, below the root, the sectors
  not in the parent and not in any ancestor.

A valid image prints "NAME is valid" (nothing for a fixed disk). A fault prints the C
tool's verdict line, then "NAME appears invalid; dumping metadata" and the ``read -p``
dump, as the C tool does.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from blktap.errors import BlktapError, errno_of
from blktap.proto.vhd import bitmap as bm
from blktap.proto.vhd.check import (
    CheckOptions,
    CheckResult,
    ParentProbe,
    Prober,
    check_vhd,
)
from blktap.proto.vhd.constants import (
    BAT_UNUSED,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR_SIZE,
    DiskType,
)
from blktap.proto.vhd.footer import parse_footer
from blktap.proto.vhd.header import parse_header
from blktap.vhd.create import vhd_time
from blktap.vhd.image import VhdFile, pread_exact, read_footer_of
from blktap.vhdutil.dump import DumpOptions, dump, footer_lines, header_lines
from blktap.vhdutil.progress import Progress

__all__ = ["CheckOptions", "CheckReport", "ImageStats", "check"]


@dataclass(frozen=True, slots=True)
class ImageStats:
    """``-s`` for one image: sectors in allocated blocks, sectors present (bits set) and,
    below the root, how many present sectors no parent / no ancestor has."""

    name: str
    secs_allocated: int
    secs_written: int
    not_in_parent: int | None = None
    not_in_ancestors: int | None = None

    def describe(self) -> str:
        head = (
            f"{os.path.basename(self.name)}: secs allocated: {self.secs_allocated:#x} "
            f"secs written: {self.secs_written:#x} "
            f"({_pct(self.secs_written, self.secs_allocated):.2f}%)"
        )
        if self.not_in_parent is None or self.not_in_ancestors is None:
            return head
        return (
            f"{head} secs not in parent: {self.not_in_parent:#x} "
            f"({_pct(self.not_in_parent, self.secs_written):.2f}%) "
            f"secs not in ancestors: {self.not_in_ancestors:#x} "
            f"({_pct(self.not_in_ancestors, self.secs_written):.2f}%)"
        )


def _pct(num: int, den: int) -> float:
    return 0.0 if not den else num / den * 100.0


@dataclass(slots=True)
class CheckReport:
    """One result per file checked (leaf first); ``valid`` when every one is.
    ``lines`` is what the command prints."""

    results: list[CheckResult] = field(default_factory=list)
    stats: list[ImageStats] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.results)


def _probe_for(expected_uuid: bytes | None) -> Prober:
    def probe(location: str) -> ParentProbe:
        if not os.access(location, os.R_OK):
            return ParentProbe(exists=False)
        try:
            found = read_footer_of(location)
        except OSError:
            return ParentProbe(exists=True, footer=None)
        if found is not None and expected_uuid is not None:
            found = dataclasses.replace(found, uuid=expected_uuid)
        return ParentProbe(exists=True, footer=found)

    return probe


def _null_uuid_fault(fd: int, size: int, options: CheckOptions) -> str | None:
    """The C tool's last footer check, which the shared validator lacks: a footer that
    is otherwise valid but has a null uuid ("invalid (NULL) uuid")."""
    now = None if options.ignore_timestamps else vhd_time()
    tail = FOOTER_SIZE - 1 if size % SECTOR_SIZE else FOOTER_SIZE
    primary = parse_footer(pread_exact(fd, tail, size - tail).ljust(FOOTER_SIZE, b"\0"))
    if not primary.faults(now):
        if not any(primary.uuid):
            return "primary footer invalid: invalid (NULL) uuid"
        if primary.disk_type == DiskType.FIXED:
            return None
    elif not options.ignore_missing_primary:
        return None
    backup = parse_footer(pread_exact(fd, FOOTER_SIZE, 0).ljust(FOOTER_SIZE, b"\0"))
    if backup.cookie == FOOTER_COOKIE and not backup.faults(now) and not any(backup.uuid):
        return "backup footer invalid: invalid (NULL) uuid"
    return None


def _check_one(path: str, options: CheckOptions, ignore_parent_uuid: bool) -> CheckResult:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)

        def read(off: int, n: int) -> bytes:
            return pread_exact(fd, n, off)

        expected: bytes | None = None
        if ignore_parent_uuid:
            footer = read_footer_of(path)
            if footer is not None and footer.disk_type == DiskType.DIFFERENCING:
                raw = read(footer.data_offset, HEADER_SIZE)
                if len(raw) == HEADER_SIZE:
                    expected = parse_header(raw).parent_uuid
        result = check_vhd(
            path, read, size, now_vhd=vhd_time(), probe=_probe_for(expected), options=options
        )
        if size >= FOOTER_SIZE - 1:
            null = _null_uuid_fault(fd, size, options)
            if null is not None and (result.valid or "footer" not in result.faults[0]):
                return CheckResult(result.name, [null], result.disk_type)
        return result
    finally:
        os.close(fd)


def _data_faults(image: VhdFile, bar: Progress) -> list[str]:
    """``-b``: sectors with data where the bitmap is clear, for the first block that has
    any (the C tool reports every such sector of that block, then stops)."""
    h = image.header
    if h is None:
        return []
    spb = h.sectors_per_block
    blocks = image.size // h.block_size
    for i in range(min(blocks, len(image.bat))):
        bar.update(i)
        off = image.data_offset_of(i)
        if off is None or i in image.full_blocks:
            continue
        bits = image.bitmap_copy(i)
        out: list[str] = []
        for s, c, here in bm.runs(bits, 0, spb):
            if here:
                continue
            data = pread_exact(image.fd, c * SECTOR_SIZE, off + s * SECTOR_SIZE)
            if not any(data):
                continue
            for k in range(c):
                if any(data[k * SECTOR_SIZE : (k + 1) * SECTOR_SIZE]):
                    out.append(
                        f"sector {s + k:#x} of block {i:#x} has data where bitmap is clear"
                    )
        if out:
            return out
    return []


def _written(image: VhdFile) -> dict[int, int]:
    """Per allocated block (below the size in whole blocks, as C), its bitmap as an int."""
    h = image.header
    assert h is not None
    spb = h.sectors_per_block
    full = (1 << spb) - 1
    out: dict[int, int] = {}
    for i in range(min(image.size // h.block_size, len(image.bat))):
        if image.bat[i] == BAT_UNUSED:
            continue
        if i in image.full_blocks:
            out[i] = full
        else:
            bits = image.bitmap_copy(i)
            out[i] = int.from_bytes(bits, "big") >> (len(bits) * 8 - spb)
    return out


def _chain_stats(images: list[tuple[str, dict[int, int], int]]) -> list[ImageStats]:
    """``images``: (name, written bitmaps, sectors per block), root first."""
    out: list[ImageStats] = []
    ancestors: dict[int, int] = {}
    parent: dict[int, int] = {}
    for n, (name, written, spb) in enumerate(images):
        allocated = len(written) * spb
        count = sum(v.bit_count() for v in written.values())
        if n == 0:
            out.append(ImageStats(name, allocated, count))
        else:
            up = sum((v & ~parent.get(b, 0)).bit_count() for b, v in written.items())
            uc = sum((v & ~ancestors.get(b, 0)).bit_count() for b, v in written.items())
            out.append(ImageStats(name, allocated, count, up, uc))
        for b, v in written.items():
            ancestors[b] = ancestors.get(b, 0) | v
        parent = written
    return out


def _dump_lines(path: str) -> list[str]:
    """What the C tool prints after a fault: the ``read -p`` dump, or, when the image
    cannot be opened, its raw footer and header."""
    out = [f"{path} appears invalid; dumping metadata"]
    try:
        out += [p for _, p in dump(path, DumpOptions(headers=True)) if isinstance(p, str)]
        return out
    except (BlktapError, OSError) as exc:
        out += [f"Failed to open {path}: {-errno_of(exc)}", "",
                f"{path} appears invalid; dumping headers", ""]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return out
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size >= FOOTER_SIZE:
            footer = parse_footer(pread_exact(fd, FOOTER_SIZE, size - FOOTER_SIZE))
            out += footer_lines(footer)
            raw = pread_exact(fd, HEADER_SIZE, footer.data_offset) if (
                footer.data_offset < size
            ) else b""
            if len(raw) == HEADER_SIZE:
                out += header_lines(parse_header(raw))
    finally:
        os.close(fd)
    return out


def check(
    path: str,
    *,
    options: CheckOptions | None = None,
    ignore_parent_uuid: bool = False,
    check_parents: bool = False,
    check_data: bool = False,
    stats: bool = False,
    progress: bool | None = None,
) -> CheckReport:
    """Check ``path`` (and with ``check_parents`` each VHD below it, stopping at the first
    invalid one or at a raw parent). Never raises for a malformed image (every problem is
    a fault in the report); raises OSError when ``path`` itself cannot be read.
    """
    options = options or CheckOptions()
    report = CheckReport()
    seen: set[str] = set()
    chain: list[tuple[str, dict[int, int], int]] = []
    current = path
    while True:
        result = _check_one(current, options, ignore_parent_uuid)
        link = None
        needs_image = check_data or stats or check_parents
        if result.valid and needs_image and result.disk_type != DiskType.FIXED:
            try:
                with VhdFile.open(current, resolve_parent=check_parents) as image:
                    if check_data:
                        bar = Progress(f"check {current}", len(image.bat), enabled=progress)
                        extra = _data_faults(image, bar)
                        bar.finish()
                        if extra:
                            result = CheckResult(result.name, extra, result.disk_type)
                    if stats and image.header is not None:
                        chain.append((current, _written(image), image.sectors_per_block))
                    link = image.parent
            except (BlktapError, OSError) as exc:
                msg = getattr(exc, "message", None) or str(exc)
                result = CheckResult(result.name, [f"error opening {current}: {msg}"],
                                     result.disk_type)
        report.results.append(result)
        if not result.valid:
            report.lines += result.faults[:1] if not check_data else result.faults
            report.lines += _dump_lines(current)
            if current != path:
                report.lines.append("error checking parents: -22")
            break
        if result.verdict and not stats:
            report.lines.append(result.verdict)
        if not check_parents or result.disk_type != DiskType.DIFFERENCING:
            break
        seen.add(os.path.realpath(current))
        if link is None or link.raw:
            break
        if os.path.realpath(link.path) in seen:
            report.results.append(CheckResult(link.path, [f"parent chain loops at {link.path}"]))
            report.lines += [f"parent chain loops at {link.path}", "error checking parents: -40"]
            break
        current = link.path
    if stats and report.valid:
        report.stats = _chain_stats(list(reversed(chain)))
        report.lines += [s.describe() for s in report.stats]
    return report
