"""VHD files: open, validate, create, snapshot, check (file-level; the codecs live in
:mod:`blktap.proto.vhd`).

Public API (for ``vhd-util`` and the ``vhd`` driver):

* :class:`VhdFile` — ``VhdFile.open(path, writable=False, resolve_parent=True)``: every
  structure validated and in memory (``footer``, ``header``, ``bat``, ``batmap``,
  ``batmap_header``, ``parent``, ``sector_runs()``, ``allocated_bytes()``), plus the
  metadata writes of an allocating write (``reserve_block``, ``write_bat_entry``,
  ``write_bitmap``, ``write_footer``).
* :func:`create_dynamic`, :func:`create_fixed`, :func:`snapshot` — new images laid out as
  blktap's vhd-util writes them.
* :func:`check_file` — ``vhd-util check`` on a file (optionally its parents).
"""

from blktap.vhd.checkfile import check_file
from blktap.vhd.create import (
    create_dynamic,
    create_fixed,
    relative_locator_path,
    snapshot,
    vhd_time,
)
from blktap.vhd.image import ParentLink, VhdFile, read_footer_of

__all__ = [
    "ParentLink",
    "VhdFile",
    "check_file",
    "create_dynamic",
    "create_fixed",
    "read_footer_of",
    "relative_locator_path",
    "snapshot",
    "vhd_time",
]
