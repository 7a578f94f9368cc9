"""``vhd-util repair [-b]``: rewrite the footers of an image whose trailing footer is
lost, corrupt or misplaced.

As the C tool: the image is opened (falling back to the backup footer at offset 0 when
the trailing one is invalid; with ``-b`` the backup is used even when the trailing one is
valid), a null uuid is replaced by a new one, the footer is written right after the last
block and the file is cut there; the backup copy at 0 is rewritten to match.
"""

from __future__ import annotations

import dataclasses
import uuid as _uuid
from dataclasses import dataclass

from blktap.errors import ImageFormatError
from blktap.proto.vhd.constants import FOOTER_COOKIE, FOOTER_SIZE, DiskType
from blktap.proto.vhd.footer import parse_footer
from blktap.vhd.image import VhdFile, pread_exact
from blktap.vhdutil.common import footer_position, write_footers


@dataclass(frozen=True, slots=True)
class RepairResult:
    path: str
    used_backup: bool
    """The footer written came from the backup copy at offset 0."""
    footer_offset: int
    """Where the trailing footer now lies."""
    new_uuid: bool
    """The image had a null uuid and got a new one."""
    truncated: int
    """Bytes cut from the end of the file (trailing junk past the footer)."""


def repair(path: str, *, use_backup: bool = False) -> RepairResult:
    """Repair ``path``'s footers (see the module docstring).

    Raises ImageFormatError when neither footer is usable or the rest of the metadata is
    damaged (BAT entries past the end or overlapping, bad header: not repairable here),
    OSError. On failure the file is unchanged, or has both footers rewritten but not yet
    truncated.
    """
    with VhdFile.open(path, writable=True, resolve_parent=False) as image:
        old_size = image.file_size
        used_backup = image.footer_repaired
        footer = image.footer
        if use_backup and image.header is not None:
            backup = parse_footer(pread_exact(image.fd, FOOTER_SIZE, 0), path)
            if (
                backup.cookie != FOOTER_COOKIE
                or not backup.checksum_ok()
                or backup.disk_type not in (DiskType.DYNAMIC, DiskType.DIFFERENCING)
            ):
                raise ImageFormatError(
                    "backup footer is not valid", path=path, structure="backup footer"
                )
            footer = backup
            used_backup = True
        new_uuid = not any(footer.uuid)
        if new_uuid:
            footer = dataclasses.replace(footer, uuid=_uuid.uuid4().bytes)
        write_footers(image, footer)
        pos = footer_position(image)
        return RepairResult(
            path=path,
            used_backup=used_backup,
            footer_offset=pos,
            new_uuid=new_uuid,
            truncated=max(0, old_size - (pos + FOOTER_SIZE)),
        )
