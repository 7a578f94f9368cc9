"""Sans-IO codecs for the VHD format and blktap's extensions to it.

Every structure parses into a frozen dataclass and encodes back byte for byte:

* :mod:`.footer` — the hard disk footer (:class:`Footer`, :func:`parse_footer`,
  :func:`new_footer`, :func:`chs_geometry`);
* :mod:`.header` — the dynamic header and parent locators (:class:`DynamicHeader`,
  :class:`ParentLocator`, locator path codecs);
* :mod:`.bat` — the block allocation table;
* :mod:`.bitmap` — per-block sector bitmaps (MSB first; LSB first for old "tap" 0.1);
* :mod:`.batmap` — blktap's "tdbatmap" header and bitmap;
* :mod:`.keyhash` — the key hash of an encrypted VHD (batmap header or extended attribute);
* :mod:`.check` — the ``vhd-util check`` validator.

No module here touches a file or socket.
"""

from blktap.proto.vhd.bat import encode_bat, encode_bat_sector, parse_bat
from blktap.proto.vhd.batmap import BatmapHeader, new_batmap_header, parse_batmap_header
from blktap.proto.vhd.check import CheckOptions, CheckResult, ParentProbe, check_vhd
from blktap.proto.vhd.constants import BAT_UNUSED, DiskType, Platform
from blktap.proto.vhd.footer import Footer, chs_geometry, new_footer, parse_footer
from blktap.proto.vhd.header import DynamicHeader, ParentLocator, new_header, parse_header

__all__ = [
    "BAT_UNUSED",
    "BatmapHeader",
    "CheckOptions",
    "CheckResult",
    "DiskType",
    "DynamicHeader",
    "Footer",
    "ParentLocator",
    "ParentProbe",
    "Platform",
    "check_vhd",
    "chs_geometry",
    "encode_bat",
    "encode_bat_sector",
    "new_batmap_header",
    "new_footer",
    "new_header",
    "parse_bat",
    "parse_batmap_header",
    "parse_footer",
    "parse_header",
]
