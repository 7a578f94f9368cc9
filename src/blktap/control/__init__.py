"""The control library (libblktapctl's role): minors, tapdisk processes, control requests.

Use :class:`Control` (``blktap.control.api``); it never prints and never parses argv.
Errors are :class:`~blktap.errors.BlktapError` subclasses with the errno to report.
"""

from blktap.control.api import Control
from blktap.control.errors import (
    ControlError,
    MinorBusy,
    NoSuchTapdisk,
    SpawnError,
    TapdiskError,
    TimedOut,
)
from blktap.control.lifecycle import Created
from blktap.control.listing import TapEntry, VbdDetails
from blktap.control.options import ImageInfo, OpenOptions
from blktap.control.rundir import RunDir
from blktap.proto.tcp_export import TcpExport

__all__ = [
    "Control",
    "ControlError",
    "Created",
    "ImageInfo",
    "MinorBusy",
    "NoSuchTapdisk",
    "OpenOptions",
    "RunDir",
    "SpawnError",
    "TapEntry",
    "TapdiskError",
    "TcpExport",
    "TimedOut",
    "VbdDetails",
]
