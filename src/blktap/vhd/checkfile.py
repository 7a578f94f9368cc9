"""``vhd-util check`` on files: the sans-IO validator fed from the file system."""

from __future__ import annotations

import os

from blktap.proto.vhd.check import CheckOptions, CheckResult, ParentProbe, check_vhd
from blktap.proto.vhd.constants import DiskType
from blktap.vhd.create import vhd_time
from blktap.vhd.image import VhdFile, pread_exact, read_footer_of


def _probe(location: str) -> ParentProbe:
    if not os.access(location, os.R_OK):
        return ParentProbe(exists=False)
    try:
        return ParentProbe(exists=True, footer=read_footer_of(location))
    except OSError:
        return ParentProbe(exists=True, footer=None)


def check_file(
    path: str, *, check_parents: bool = False, options: CheckOptions | None = None
) -> list[CheckResult]:
    """Check ``path`` (and with ``check_parents`` each VHD parent down the chain, stopping
    at the first invalid one or at a raw parent). Returns one result per file checked;
    the chain is valid when every result is. Raises OSError when ``path`` cannot be read.
    """
    options = options or CheckOptions()
    results: list[CheckResult] = []
    seen: set[str] = set()
    current = path
    while True:
        fd = os.open(current, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)

            def read(off: int, n: int, fd: int = fd) -> bytes:
                return pread_exact(fd, n, off)

            result = check_vhd(
                current,
                read,
                size,
                now_vhd=vhd_time(),
                probe=_probe,
                options=options,
            )
        finally:
            os.close(fd)
        results.append(result)
        if not result.valid or not check_parents or result.disk_type != DiskType.DIFFERENCING:
            return results
        seen.add(os.path.realpath(current))
        with VhdFile.open(current) as image:
            link = image.parent
        if link is None or link.raw:
            return results
        if os.path.realpath(link.path) in seen:
            results.append(CheckResult(link.path, [f"parent chain loops at {link.path}"]))
            return results
        current = link.path
