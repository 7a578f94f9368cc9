"""Reading the virtual disk of a VHD chain synchronously (what tapdisk would serve):
allocated sectors from the first image that holds them, zeros past a dynamic disk or a
raw parent's end.

Used by ``fill`` (a differencing disk's missing sectors come from its parents), by the
``read -r/-R`` dumps and by tests; the data path of coalesce does not go through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from blktap.errors import ImageFormatError
from blktap.proto.vhd.constants import BAT_UNUSED, SECTOR_SIZE, DiskType
from blktap.vhd.image import VhdFile, pread_exact


@dataclass(slots=True)
class _Raw:
    path: str
    fd: int
    size: int


Layer = VhdFile | _Raw


class ChainReader:
    """An open chain, leaf first. ``read(offset, length)`` returns the virtual bytes.

    Open with :meth:`open`; close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers

    @classmethod
    def open(cls, path: str, *, start_at_parent: bool = False) -> ChainReader:
        """Open ``path`` and every parent (read-only). With ``start_at_parent`` the chain
        starts at ``path``'s parent (what lies below ``path``).

        Raises ImageFormatError (malformed image, missing parent, loop), OSError.
        """
        layers: list[Layer] = []
        seen: set[str] = set()
        try:
            image = VhdFile.open(path)
            current: Layer | None = image
            while current is not None:
                real = os.path.realpath(current.path)
                if real in seen:
                    raise ImageFormatError(
                        "parent chain loops", path=current.path, structure="parent locator"
                    )
                seen.add(real)
                layers.append(current)
                current = cls._parent_of(current)
        except BaseException:
            for layer in layers:
                _close(layer)
            raise
        if start_at_parent:
            _close(layers.pop(0))
        return cls(layers)

    @staticmethod
    def _parent_of(layer: Layer) -> Layer | None:
        if isinstance(layer, _Raw) or layer.parent is None:
            return None
        link = layer.parent
        if link.raw:
            fd = os.open(link.path, os.O_RDONLY | os.O_CLOEXEC)
            return _Raw(link.path, fd, os.lseek(fd, 0, os.SEEK_END))
        return VhdFile.open(link.path)

    @property
    def size(self) -> int:
        return self.layers[0].size if self.layers else 0

    def has_data(self, offset: int, length: int) -> bool:
        """False when no image of the chain holds data in ``[offset, offset + length)``
        (the range reads as zeros without reading anything); True when one may."""
        for layer in self.layers:
            if isinstance(layer, _Raw) or layer.header is None:
                return offset < layer.size
            bs = layer.block_size
            first = offset // bs
            last = min((offset + length - 1) // bs, len(layer.bat) - 1)
            if any(layer.bat[b] != BAT_UNUSED for b in range(first, last + 1)):
                return True
            if layer.footer.disk_type != DiskType.DIFFERENCING:
                return False
        return False

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtual disk at ``offset`` (zeros past every image)."""
        out = bytearray(length)
        self._read_into(0, offset, memoryview(out))
        return bytes(out)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._read_into(0, offset, buf)

    def _read_into(self, level: int, offset: int, buf: memoryview) -> None:
        if level >= len(self.layers):
            buf[:] = bytes(len(buf))
            return
        layer = self.layers[level]
        length = len(buf)
        if isinstance(layer, _Raw) or layer.header is None:
            size = layer.size
            avail = max(0, min(length, size - offset))
            if avail:
                data = pread_exact(layer.fd, avail, offset)
                buf[: len(data)] = data
                if len(data) < avail:
                    buf[len(data) : avail] = bytes(avail - len(data))
            if avail < length:
                buf[avail:] = bytes(length - avail)
            return
        bs = layer.block_size
        differencing = layer.footer.disk_type == DiskType.DIFFERENCING
        pos = 0
        while pos < length:
            voff = offset + pos
            block = voff // bs
            in_block = voff - block * bs
            n = min(length - pos, bs - in_block)
            piece = buf[pos : pos + n]
            if voff >= layer.size or block >= len(layer.bat) or layer.bat[block] == BAT_UNUSED:
                self._fallthrough(level, differencing, voff, piece)
            else:
                first = in_block // SECTOR_SIZE
                count = -(-(in_block + n) // SECTOR_SIZE) - first
                data_off = layer.data_offset_of(block)
                assert data_off is not None
                for s, c, here in layer.sector_runs(block, first, count):
                    lo = max(s * SECTOR_SIZE, in_block) - in_block
                    hi = min((s + c) * SECTOR_SIZE, in_block + n) - in_block
                    sub = piece[lo:hi]
                    if here:
                        data = pread_exact(layer.fd, hi - lo, data_off + in_block + lo)
                        sub[: len(data)] = data
                    else:
                        self._fallthrough(level, differencing, voff + lo, sub)
            pos += n

    def _fallthrough(self, level: int, differencing: bool, offset: int, buf: memoryview) -> None:
        if differencing:
            self._read_into(level + 1, offset, buf)
        else:
            buf[:] = bytes(len(buf))

    def close(self) -> None:
        for layer in self.layers:
            _close(layer)
        self.layers = []

    def __enter__(self) -> ChainReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(layer: Layer) -> None:
    if isinstance(layer, _Raw):
        os.close(layer.fd)
    else:
        layer.close()


def chain_paths(path: str) -> list[str]:
    """The files of ``path``'s chain, leaf first (parents resolved as the driver does).

    Raises ImageFormatError/OSError as :meth:`ChainReader.open`."""
    with ChainReader.open(path) as chain:
        return [layer.path for layer in chain.layers]
