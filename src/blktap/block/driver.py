"""The image driver interface and the registry of drivers by C type string.

A driver opens one image file (one link of a chain). Everything it receives has already
been validated and aligned by the chain (see ``blktap.block.chain``):

* ``offset`` and every length are multiples of :data:`SECTOR_SIZE` and lie inside the image;
* buffers are ``memoryview`` objects of exactly the request length, writable for reads;
* writes, zeroes and discards only reach images opened read-write.

Drivers raise :class:`blktap.errors.BlktapError` (or ``OSError``) on failure; the edge maps
the errno. A failed write leaves the affected range undefined but never touches bytes
outside it, and never corrupts metadata.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from blktap.errors import NotFound

SECTOR_SIZE = 512
SYNC_WRITE_MAX = 256 * 1024
"""Writes of this many bytes or more never go through ``write_now`` (see Image): copying
them takes long enough that the driver's ``write`` may hand it to a worker thread while
the event loop receives the next requests."""


class Alloc(enum.IntEnum):
    """What one image says about a byte range."""

    DATA = 0
    """The data is in this image."""
    ZERO = 1
    """This image defines the range as zeros (e.g. a hole in a sparse raw file)."""
    UNALLOCATED = 2
    """Not in this image: read it from the parent (zeros past the root of the chain)."""


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    alloc: Alloc


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """How to open an image. Mirrors the OPEN flags that concern a single image."""

    read_only: bool = False
    direct: bool = True
    """O_DIRECT (the C tapdisk's default); False with the NO_O_DIRECT flag."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    size: int
    """Virtual size in bytes (a multiple of SECTOR_SIZE)."""
    sector_size: int = SECTOR_SIZE
    info: int = 0
    """The ``image.info`` word OPEN_RSP and DISK_INFO_RSP report (0 for our drivers)."""


@dataclass(frozen=True, slots=True)
class FastIO:
    """What a driver offers beyond its coroutines, as data (each None/False when not
    offered). Asked once per open (:meth:`Image.fast_io`); the chain and the VBD use
    them where the stack's capabilities allow (blktap.block.capabilities)."""

    holds: Callable[[int, int], int] | None = None
    """``holds(offset, length)``: a cheap form of :meth:`Image.allocation` for the
    chain's per-unit owner cache: 1 when the whole range is DATA here, 0 when it is all
    UNALLOCATED, -1 when mixed or unknown (the chain then asks ``allocation``). Sparse
    formats with parents (vhd) offer it."""
    read_now: Callable[[int, memoryview], bool] | None = None
    """``read_now(offset, buf)``: :meth:`Image.read` done synchronously, for drivers
    whose I/O need not wait for the event loop (buffered files, memory, an idle fast
    device). True when done, or False having done nothing (the caller then uses the
    coroutine); raises as :meth:`Image.read`."""
    write_now: Callable[[int, memoryview, bool], bool] | None = None
    """``write_now(offset, data, fua)``: likewise for :meth:`Image.write`; only called
    for writes smaller than SYNC_WRITE_MAX."""
    read_blocking: Callable[[int, memoryview], bool] | None = None
    """``read_blocking(offset, buf)``: the same read for a thread other than the event
    loop's (blktap.frontends.nbd_lane), which may block as long as the device takes and
    touches no state of the loop. True when done, False having done nothing. Called only
    while the image is open: the VBD waits for such reads before it closes the image."""
    write_blocking: Callable[[int, memoryview, bool], bool] | None = None
    """``write_blocking(offset, data, fua)``: likewise for writes (raising on failure)."""
    sync_fd: Callable[[], int | None] | None = None
    """``sync_fd()``: a descriptor of the image's own bytes on which any request within
    its size is served with one ``os.preadv``/``os.pwritev`` (RWF_DSYNC for FUA) at once
    (a raw file opened buffered), or None. Through it an NBD connection serves its small
    requests inline (VBD.sync_file). Writes through it count as the image's own (close
    flushes them)."""
    reads_held_only: bool = False
    """``read_now`` and ``read_blocking`` serve only ranges this image holds as DATA
    (:meth:`Image.allocation`) and decline every other: what they serve is then the
    chain's answer even when the image has parents or holes, so the chain allows them
    (Routes.sync/thread) for a leaf that does not hold every byte (vhd)."""
    reads_any_range: bool = False
    """:meth:`Image.read` serves any range, reading what this image does not hold as
    zeros: at the root of a chain (no parent) that is the chain's answer, so the chain
    lets the VBD call it directly (Routes.direct for reads) for a lone leaf that does not
    hold every byte (a dynamic vhd)."""
    zero_is_fast: bool = False
    """:meth:`Image.write_zeroes` is much cheaper than writing zeros (NBD FAST_ZERO)."""


@dataclass(frozen=True, slots=True)
class ParentRef:
    """The next link of a chain, as the child names it: a driver type and a path."""

    type: str
    path: str


class Image(Protocol):
    """One open image: a leaf, or a parent opened read-only."""

    @property
    def type_name(self) -> str:
        """The C type string (``aio``, ``ram``, ``vhd``)."""

    @property
    def path(self) -> str:
        """The path the image was opened from."""

    @property
    def info(self) -> ImageInfo: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def parent(self) -> ParentRef | None:
        """The parent image to open below this one, or None at the root of a chain."""

    @property
    def fully_allocated(self) -> bool:
        """True when :meth:`allocation` always answers DATA for the whole range (raw, ram).

        Lets the chain skip the allocation lookup on the read path.
        """

    def allocation(self, offset: int, length: int) -> list[Extent]:
        """Which parts of the range this image holds (DATA) or defers (UNALLOCATED).

        Cheap (in-memory); called on every read of a chain with a parent. Extents are
        contiguous, in order, cover exactly the range, and never have length 0.
        """

    def fast_io(self) -> FastIO:
        """What this image offers beyond the coroutines (see :class:`FastIO`); asked once
        per open of the stack. ``FastIO()`` when it offers nothing."""

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Like :meth:`allocation` but may also report ZERO ranges (sparse holes).

        May cost a system call; used for NBD block status only.
        """

    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the image's bytes at ``offset``.

        Only called for ranges :meth:`allocation` reports as DATA (or any range when
        :attr:`fully_allocated`).
        """

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable when this returns."""

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeros (in this image: a child never exposes its parent)."""

    async def discard(self, offset: int, length: int) -> None:
        """Advisory: the range's contents are no longer needed.

        Afterwards the range reads either as before or as zeros, never as data from
        outside this chain.
        """

    async def flush(self) -> None:
        """Make every completed write durable."""

    async def close(self) -> None:
        """Release the image; write back metadata. The image is unusable afterwards."""


ImageOpener = Callable[[str, OpenOptions], Awaitable[Image]]
"""``opener(path, options)`` opens one image; raises NotFound/ImageFormatError/OSError."""

_REGISTRY: dict[str, ImageOpener] = {}


def register(type_name: str, opener: ImageOpener) -> None:
    """Make ``type_name`` (the C type string) open images with ``opener``."""
    _REGISTRY[type_name] = opener


def opener_for(type_name: str) -> ImageOpener:
    """The opener registered for ``type_name``. Raises NotFound (ENOENT) as the C tapdisk."""
    _load_builtin_drivers()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise NotFound(f"unknown disk type {type_name!r}") from None


def registered_types() -> list[str]:
    _load_builtin_drivers()
    return sorted(_REGISTRY)


def _load_builtin_drivers() -> None:
    # Importing a driver module registers it; done lazily to keep imports one-way.
    from blktap.block import drivers

    drivers.load_all()
