"""``vhd-util set -f hidden|marker -v N``: blktap's two flags.

``hidden`` is footer byte 85 (both footer copies are rewritten, checksum updated);
``marker`` is the batmap header's marker byte (its checksum covers only the bitmap).
"""

from __future__ import annotations

import dataclasses

from blktap.errors import InvalidArgument
from blktap.proto.vhd.check import batmap_header_offset
from blktap.vhd.image import VhdFile, pwrite_all
from blktap.vhdutil.common import write_footers

FIELDS = ("hidden", "marker")


def set_field(path: str, field: str, value: int) -> None:
    """Set ``field`` of ``path`` to ``value`` (0..255).

    Raises InvalidArgument (unknown field, value out of range, marker on an image
    without a batmap), ImageFormatError, OSError. Only the field's structure is
    rewritten; a crash leaves either the old or the new value (footer: possibly one
    copy of each, which ``repair`` reconciles).
    """
    if field not in FIELDS:
        raise InvalidArgument(f"invalid field {field!r}: must be one of {', '.join(FIELDS)}")
    if not 0 <= value <= 255:
        raise InvalidArgument(f"invalid value {value} for {field}: must be 0..255")
    with VhdFile.open(path, writable=True, resolve_parent=False) as image:
        if field == "hidden":
            if image.footer.hidden != value:
                write_footers(
                    image, dataclasses.replace(image.footer, hidden=value), in_place=True
                )
            return
        head = image.batmap_header
        if head is None or image.header is None:
            raise InvalidArgument(f"{path}: image has no batmap, so no marker")
        new = dataclasses.replace(head, marker=value)
        pwrite_all(image.fd, [new.encode()], batmap_header_offset(image.header))
        image.sync()
        image.batmap_header = new
