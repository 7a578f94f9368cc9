"""``vhd-util check``: the sans-IO validator (:func:`blktap.proto.vhd.check_vhd`) fed from
files, with the C tool's options: ``-i`` ignore a never-written primary footer, ``-I``
ignore parent uuid mismatches, ``-t`` ignore timestamps, ``-B`` ignore BAT overlaps,
``-p`` check the parents too, ``-b`` check bitmaps against the batmap, ``-s`` statistics.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from blktap.errors import BlktapError
from blktap.proto.vhd import bitmap as bm
from blktap.proto.vhd.batmap import test_block
from blktap.proto.vhd.check import (
    CheckOptions,
    CheckResult,
    ParentProbe,
    Prober,
    check_vhd,
)
from blktap.proto.vhd.constants import BAT_UNUSED, DiskType
from blktap.proto.vhd.header import parse_header
from blktap.vhd.create import vhd_time
from blktap.vhd.image import VhdFile, pread_exact, read_footer_of
from blktap.vhdutil.progress import Progress

__all__ = ["CheckOptions", "CheckReport", "FileStats", "check"]


@dataclass(frozen=True, slots=True)
class FileStats:
    """``-s``: how the image's blocks are used."""

    path: str
    blocks: int
    allocated: int
    full: int
    data_bytes: int

    def describe(self) -> str:
        pct = 100.0 * self.allocated / self.blocks if self.blocks else 0.0
        return (
            f"{self.path}: blocks: {self.blocks}, allocated: {self.allocated} "
            f"({pct:.1f}%), full: {self.full}, data: {self.data_bytes} bytes"
        )


@dataclass(slots=True)
class CheckReport:
    """One result per file checked (leaf first); ``valid`` when every one is."""

    results: list[CheckResult] = field(default_factory=list)
    stats: list[FileStats] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.results)

    def lines(self) -> list[str]:
        """What ``vhd-util check`` prints: per file its verdict (nothing for a valid
        fixed disk) and every further fault, then the statistics."""
        out: list[str] = []
        for r in self.results:
            if r.verdict:
                out.append(r.verdict)
            out.extend(r.faults[1:])
        out.extend(s.describe() for s in self.stats)
        return out


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
                raw = read(footer.data_offset, 1024)
                if len(raw) == 1024:
                    expected = parse_header(raw).parent_uuid
        probe = _probe_for(expected)
        return check_vhd(path, read, size, now_vhd=vhd_time(), probe=probe, options=options)
    finally:
        os.close(fd)


def _bitmap_faults(image: VhdFile) -> list[str]:
    """Blocks the batmap calls full whose sector bitmap is not."""
    h = image.header
    if h is None or image.batmap is None:
        return []
    spb = h.sectors_per_block
    out: list[str] = []
    bar = Progress(f"check {image.path}", len(image.bat))
    for i, entry in enumerate(image.bat):
        bar.update(i)
        if entry == BAT_UNUSED or not test_block(image.batmap, i):
            continue
        raw = pread_exact(image.fd, h.bitmap_size, entry * 512)
        bits = bm.from_disk(raw, image.lsb_bitmaps)
        if not bm.all_set(bits, 0, spb):
            out.append(f"batmap shows block {i} full but its sector bitmap is not")
    bar.finish()
    return out


def _stats(image: VhdFile) -> FileStats:
    if image.header is None:
        return FileStats(image.path, 0, 0, 0, image.size)
    allocated = sum(1 for e in image.bat if e != BAT_UNUSED)
    return FileStats(
        image.path, len(image.bat), allocated, len(image.full_blocks), image.allocated_bytes()
    )


def check(
    path: str,
    *,
    options: CheckOptions | None = None,
    ignore_parent_uuid: bool = False,
    check_parents: bool = False,
    check_bitmaps: bool = False,
    stats: bool = False,
) -> CheckReport:
    """Check ``path`` (and with ``check_parents`` each VHD below it, stopping at the first
    invalid one or at a raw parent). Never raises for a malformed image (every problem is
    a fault); raises OSError when ``path`` itself cannot be read."""
    options = options or CheckOptions()
    report = CheckReport()
    seen: set[str] = set()
    current = path
    while True:
        result = _check_one(current, options, ignore_parent_uuid)
        link = None
        if result.valid and (check_bitmaps or stats or check_parents):
            try:
                with VhdFile.open(current, resolve_parent=check_parents) as image:
                    if check_bitmaps:
                        extra = _bitmap_faults(image)
                        if extra:
                            result = CheckResult(result.name, extra, result.disk_type)
                    if stats:
                        report.stats.append(_stats(image))
                    link = image.parent
            except (BlktapError, OSError) as exc:
                msg = getattr(exc, "message", None) or str(exc)
                result = CheckResult(result.name, [f"error opening {current}: {msg}"],
                                     result.disk_type)
        report.results.append(result)
        if not result.valid or not check_parents or result.disk_type != DiskType.DIFFERENCING:
            return report
        seen.add(os.path.realpath(current))
        if link is None or link.raw:
            return report
        if os.path.realpath(link.path) in seen:
            report.results.append(CheckResult(link.path, [f"parent chain loops at {link.path}"]))
            return report
        current = link.path
