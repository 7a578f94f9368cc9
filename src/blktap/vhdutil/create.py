"""``vhd-util create`` and ``vhd-util snapshot``.

Both build on :func:`blktap.vhd.create_dynamic` / :func:`blktap.vhd.create_fixed` /
:func:`blktap.vhd.snapshot`. Metadata preallocation (``-S MB``) sizes the BAT (and the
batmap) for a larger disk than the virtual size so that a later ``resize -f`` needs no
data movement (up to 2 TiB, what XenServer's LVM storage asks for).
"""

from __future__ import annotations

import asyncio
import errno
import os

from blktap.errors import BlktapError
from blktap.proto.vhd.constants import BAT_UNUSED, DiskType
from blktap.vhd import create_dynamic, create_fixed
from blktap.vhd import snapshot as _lib_snapshot
from blktap.vhd.image import VhdFile, network_parent


class DepthExceeded(BlktapError):
    """``snapshot -l``: the new chain would be deeper than the limit."""

    errno = errno.ENOSPC


def create(path: str, size: int, *, fixed: bool = False, prealloc: int | None = None) -> None:
    """Create ``path``: a dynamic VHD of ``size`` bytes (fixed with ``fixed``).

    ``prealloc`` (bytes, dynamic only) sizes the BAT for a disk of that size (no effect
    when not larger than ``size``). Raises InvalidArgument (bad size, prealloc over
    2 TiB), FileExistsError, OSError.
    The partial file is removed on failure.
    """
    if fixed:
        create_fixed(path, size)
        return
    create_dynamic(path, size, metadata_size=prealloc)


def is_empty(image: VhdFile) -> bool:
    """True when a sparse image has no block allocated."""
    return all(entry == BAT_UNUSED for entry in image.bat)


def chain_depth(path: str) -> int:
    """How many images the chain starting at ``path`` holds (1 for a lone image; a raw
    parent counts as one)."""
    depth = 0
    seen: set[str] = set()
    current: str | None = path
    while current is not None:
        real = os.path.realpath(current)
        if real in seen:
            break
        seen.add(real)
        depth += 1
        try:
            with VhdFile.open(current) as image:
                link = image.parent
        except BlktapError:
            if depth == 1:
                raise
            break
        if link is None:
            break
        if link.raw:
            depth += 1
            break
        current = link.path
    return depth


def resolve_snapshot_parent(parent: str, *, exact: bool) -> tuple[str, bool]:
    """The parent a snapshot links to, and whether it is raw: ``parent`` with ``exact``;
    otherwise the first non-empty image going down from ``parent`` through empty
    differencing disks, which may be a raw image at the root (as vhd-util does without
    ``-e``)."""
    current = parent
    if exact:
        return current, False
    while True:
        with VhdFile.open(current) as image:
            if (
                image.footer.disk_type != DiskType.DIFFERENCING
                or image.parent is None
                or not is_empty(image)
            ):
                return current, False
            if image.parent.raw:
                return image.parent.path, True
            current = image.parent.path


def snapshot(
    path: str,
    parent: str,
    *,
    raw_parent: bool = False,
    depth_limit: int | None = None,
    prealloc: int | None = None,
    exact: bool = False,
) -> str:
    """Create ``path``, a differencing VHD over ``parent`` (see :func:`resolve_snapshot_parent`).

    ``raw_parent``: ``parent`` is a raw image. ``depth_limit``: refuse (DepthExceeded,
    ENOSPC) when the new chain would hold more images (not checked over a raw parent, as
    the C tool). ``prealloc``: BAT sized for that many bytes. The new disk has the size
    of ``parent`` even when it links further down a chain of empty disks of other sizes.
    Returns the path of the parent actually linked.

    Raises FileNotFoundError (no parent), ImageFormatError (parent malformed),
    DepthExceeded, FileExistsError, OSError; nothing is left behind on failure.
    """
    if raw_parent and network_parent(parent) is not None:
        # rbd:pool/image: the size comes from the image itself, through its driver.
        _lib_snapshot(path, parent, raw_parent=True, size=_network_size(parent),
                      metadata_size=prealloc)
        return parent
    if not os.path.exists(parent):
        raise FileNotFoundError(errno.ENOENT, "parent not found", parent)
    if raw_parent:
        target, raw = parent, True
    else:
        target, raw = resolve_snapshot_parent(parent, exact=exact)
    if depth_limit is not None and depth_limit > 0 and not raw:
        depth = chain_depth(target)
        if depth + 1 > depth_limit:
            raise DepthExceeded(
                f"snapshot depth exceeded: current depth: {depth}, limit: {depth_limit}"
            )
    if raw_parent:
        psize = -(-os.stat(parent).st_size // 512) * 512
    else:
        with VhdFile.open(parent, resolve_parent=False) as p:
            psize = p.size
    _lib_snapshot(path, target, raw_parent=raw, size=psize, metadata_size=prealloc)
    return target


def _network_size(parent: str) -> int:
    """The size of a network image (``rbd:pool/image``), opened read-only to ask it.
    Raises as the driver's open (NotFound, OSError, ...)."""
    from blktap.block.driver import OpenOptions, opener_for

    remote = network_parent(parent)
    assert remote is not None

    async def ask() -> int:
        image = await opener_for(remote[0])(remote[1], OpenOptions(read_only=True))
        try:
            return image.info.size
        finally:
            await image.close()

    return asyncio.run(ask())
