"""``vhd-util scan``: one line per image, as the C tool prints them::

    vhd=NAME capacity=BYTES size=BYTES hidden=N parent=PARENT|none
    vhd=NAME scan-error=-ERRNO error-message='WHAT'

``capacity`` is the virtual size, ``size`` the file's size; names are base names unless
``-v``. ``-m`` adds the files a glob pattern matches, ``-f`` reads parent names from the
header instead of resolving locators, ``-c`` continues after a failure, ``-a`` scans
parents too, ``-p`` prints a tree (children indented three spaces per level), ``-M``
adds ``marker=N``. LVM volume groups (``-l``) are not supported here.
"""

from __future__ import annotations

import errno
import glob
import os
from dataclasses import dataclass, field

from blktap.errors import BlktapError, errno_of
from blktap.proto.vhd.constants import DiskType, Platform
from blktap.vhd.image import VhdFile


class Unsupported(BlktapError):
    errno = errno.ENOSYS


@dataclass(frozen=True, slots=True)
class ScanOptions:
    filter: str | None = None
    fast: bool = False
    continue_on_failure: bool = False
    volume: str | None = None
    pretty: bool = False
    parents: bool = False
    verbose: bool = False
    markers: bool = False


@dataclass(slots=True)
class ScanImage:
    name: str
    raw: bool = False
    capacity: int = 0
    size: int = 0
    hidden: int = 0
    marker: int = 0
    parent: str | None = None
    parent_raw: bool = False
    error: int = 0
    message: str = ""
    children: list[ScanImage] = field(default_factory=list)
    parent_image: ScanImage | None = None
    printed: bool = False


@dataclass(slots=True)
class ScanResult:
    lines: list[str]
    errno: int
    """0, or the (positive) errno of the failure that stopped the scan."""


def _scan_one(target: str, raw: bool, opts: ScanOptions) -> ScanImage:
    name = target
    if opts.pretty:
        name = os.path.realpath(target)
    img = ScanImage(name=name, raw=raw)
    try:
        st = os.stat(target)
    except OSError as exc:
        img.error, img.message = -(exc.errno or errno.EIO), "failure scanning target"
        return img
    img.size = st.st_size
    if raw:
        img.capacity = st.st_size
        img.hidden = 1
        return img
    try:
        image = VhdFile.open(target, resolve_parent=False)
    except (BlktapError, OSError) as exc:
        img.error, img.message = -errno_of(exc), "opening file"
        return img
    with image:
        img.capacity = image.size
        img.hidden = image.footer.hidden
        if opts.markers and image.batmap_header is not None:
            img.marker = image.batmap_header.marker
        if image.footer.disk_type == DiskType.DIFFERENCING:
            try:
                img.parent, img.parent_raw = _parent(image, target, opts)
            except (BlktapError, OSError) as exc:
                img.error, img.message = -errno_of(exc), "getting parent"
    return img


def _parent(image: VhdFile, target: str, opts: ScanOptions) -> tuple[str, bool]:
    h = image.header
    assert h is not None
    raw = not any(h.parent_uuid)
    if opts.fast:
        name = h.parent_name
        if name:
            return os.path.join(os.path.dirname(target), name), raw
    try:
        with VhdFile.open(target) as resolved:
            assert resolved.parent is not None
            return resolved.parent.path, resolved.parent.raw
    except BlktapError:
        # As the C tool: fall back to what the preferred locator says.
        paths = dict(image.locator_paths())
        for code in (Platform.MACX, Platform.W2RU, Platform.W2KU):
            if code in paths:
                return paths[code], raw
        raise


def _line(img: ScanImage, tab: int, opts: ScanOptions) -> str:
    pad = " " * tab
    if img.error:
        return f"{pad}vhd={img.name} scan-error={img.error} error-message='{img.message}'"
    name, parent = img.name, img.parent or "none"
    if not opts.verbose:
        name = os.path.basename(img.name)
        if img.parent:
            parent = os.path.basename(img.parent)
    pmsg = " (not found in scan)" if opts.pretty and img.parent and not img.parent_image else ""
    marker = f"marker={img.marker} " if opts.markers else ""
    return (
        f"{pad}vhd={name} capacity={img.capacity} size={img.size} hidden={img.hidden} "
        f"{marker}parent={parent}{pmsg}"
    )


def _pattern_dir_exists(pattern: str) -> bool:
    """Whether glob(3) would have found nothing without failing a system call: the
    pattern has wildcards only in its last component and its directory exists. (A
    pattern without wildcards names a file that lstat did not find; a missing directory
    fails opendir: both leave ENOENT, which the C tool reports.)"""
    head, tail = os.path.split(pattern)
    if not glob.has_magic(tail) or glob.has_magic(head):
        return False
    return os.path.isdir(head or ".")


def scan(files: list[str], opts: ScanOptions) -> ScanResult:
    """Scan ``files`` (plus what ``opts.filter`` matches). Never raises for a bad image:
    it becomes a ``scan-error`` line; the scan stops there unless ``continue_on_failure``.
    Raises Unsupported (ENOSYS) for ``volume``."""
    if opts.volume is not None:
        raise Unsupported("scanning LVM volume groups (-l) is not supported")
    lines: list[str] = []
    targets: list[tuple[str, bool]] = []
    if opts.filter is not None:
        matches = glob.glob(opts.filter)
        if not opts.fast:
            matches.sort()
        if not matches:
            if _pattern_dir_exists(opts.filter):
                # An empty SR: the C tool's glob fails with GLOB_NOMATCH but errno 0,
                # which it takes as no error: nothing printed, exit 0.
                return ScanResult([], 0)
            lines.append(
                f"vhd={opts.filter} scan-error={-errno.ENOENT} "
                "error-message='failure scanning target'"
            )
            return ScanResult(lines, errno.ENOENT)
        targets += [(m, False) for m in matches]
    targets += [(f, False) for f in files]
    pretty: list[ScanImage] = []
    err = 0
    i = 0
    while i < len(targets):
        target, raw = targets[i]
        i += 1
        img = _scan_one(target, raw, opts)
        if img.error:
            err = -img.error
        if opts.pretty and not img.error:
            if all(p.name != img.name for p in pretty):
                pretty.append(img)
        else:
            lines.append(_line(img, 0, opts))
        if opts.parents and img.parent:
            base = os.path.basename(img.parent)
            if all(os.path.basename(t) != base for t, _ in targets):
                targets.append((img.parent, img.parent_raw))
        if img.error and not opts.continue_on_failure:
            break
    if opts.pretty:
        lines += _tree(pretty, opts)
    return ScanResult(lines, 0 if opts.continue_on_failure else err)


def _tree(images: list[ScanImage], opts: ScanOptions) -> list[str]:
    images.sort(key=lambda im: im.name)
    by_name = {im.name: im for im in images}
    for im in images:
        parent = by_name.get(im.parent) if im.parent else None
        im.parent_image = parent
        if parent is not None:
            parent.children.append(im)
    out: list[str] = []

    def walk(im: ScanImage, depth: int) -> None:
        if im.printed:
            return
        im.printed = True
        out.append(_line(im, depth * 3, opts))
        for child in [c for c in im.children if not c.hidden] + [
            c for c in im.children if c.hidden
        ]:
            walk(child, depth + 1)

    for im in images:
        if im.parent_image is None and im.hidden:
            walk(im, 0)
    for im in images:
        if im.parent_image is None:
            walk(im, 0)
    for im in images:
        walk(im, 0)
    return out
