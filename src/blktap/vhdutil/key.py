"""``vhd-util key``: read, set, check and calculate the key hash of an encrypted VHD.

The hash (:mod:`blktap.proto.vhd.keyhash`) is stored where libvhd stores it: in the
batmap header when the image has a valid batmap, else in the file's extended attribute
``user.com.citrix.xenclient.backend.keyhash``. Only the hash is handled here; nothing
is encrypted.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os

from blktap.errors import BlktapError, InvalidArgument
from blktap.proto.vhd.check import batmap_header_offset
from blktap.proto.vhd.constants import BAT_UNUSED, DiskType
from blktap.proto.vhd.keyhash import (
    HASH_SIZE,
    KEYHASH_SIZE,
    KEYHASH_XATTR,
    NONCE_SIZE,
    KeyHash,
    calculate_hash,
    key_bits_for,
    parse_hex,
    parse_keyhash,
)
from blktap.vhd.image import VhdFile, pwrite_all

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 512 // 8
"""The most a key file may hold when no size is implied (``key -C``)."""


class KeyMismatch(BlktapError):
    """``key -c``: the key does not hash to the image's stored hash."""

    errno = errno.EINVAL


def _stored(image: VhdFile) -> KeyHash:
    head = image.batmap_header
    if head is not None:
        return KeyHash(head.keyhash_cookie, head.keyhash_nonce, head.keyhash_hash)
    try:
        raw = os.getxattr(image.fd, KEYHASH_XATTR)
    except OSError as exc:
        # No attribute, or a file system without user attributes: nothing was stored.
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return KeyHash()
        raise
    return parse_keyhash(raw)


def read_keyhash(path: str) -> KeyHash:
    """The key hash stored in ``path`` (cookie 0 when none). Raises ImageFormatError,
    OSError."""
    with VhdFile.open(path, resolve_parent=False) as image:
        found = _stored(image)
        log.debug("%s: key hash %s (from the %s)", path, found.describe(),
                  "batmap header" if image.batmap_header is not None else "extended attribute")
        return found


def read_key(key_path: str, key_bytes: int = 0) -> bytes:
    """The key in ``key_path``: exactly ``key_bytes`` bytes, or (0) up to
    :data:`MAX_KEY_BYTES`. Raises OSError (EIO when the file holds more than that, as
    the C tool's short read), InvalidArgument for a wrong size."""
    limit = key_bytes or MAX_KEY_BYTES
    fd = os.open(key_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        key = os.read(fd, limit)
    finally:
        os.close(fd)
    if len(key) != size:
        raise OSError(errno.EIO, f"short read of key ({size} bytes, at most {limit} read)",
                      key_path)
    if key_bytes and len(key) != key_bytes:
        raise InvalidArgument(f"incorrect key size: {key_bytes} != {len(key)}: {key_path}")
    log.debug("using keyfile %s, size %d bytes", key_path, len(key))
    return key


def calculate(key_path: str, nonce_hex: str | None = None) -> bytes:
    """``key -C -k KEYFILE [-N NONCE]``: the hash of the key with the nonce (zeros by
    default); no image involved, so the key file may hold up to 64 bytes."""
    nonce = parse_hex(nonce_hex, NONCE_SIZE, "nonce") if nonce_hex else bytes(NONCE_SIZE)
    return calculate_hash(nonce, read_key(key_path))


def set_keyhash(
    path: str,
    *,
    key_path: str | None = None,
    hash_hex: str | None = None,
    nonce_hex: str | None = None,
) -> KeyHash:
    """``key -s``: store the hash of the key in ``key_path`` (whose name must declare
    the key size, see :func:`key_bits_for`), or the given ``hash_hex``, with the nonce
    ``nonce_hex`` (zeros by default), in ``path``.

    As the C tool: refused (InvalidArgument) for fixed images, for images with any
    allocated block (their data would not be encrypted with the key), and when both or
    neither of ``key_path`` and ``hash_hex`` are given. The 65 bytes go out in one write
    (batmap header sector or attribute), so a crash leaves the old or the new hash.
    """
    if (key_path is None) == (hash_hex is None):
        raise InvalidArgument("give exactly one of a key file (-k) and a hash (-H)")
    nonce = parse_hex(nonce_hex, NONCE_SIZE, "nonce") if nonce_hex else bytes(NONCE_SIZE)
    given = parse_hex(hash_hex, HASH_SIZE, "hash") if hash_hex is not None else None
    with VhdFile.open(path, writable=True, resolve_parent=False) as image:
        if image.footer.disk_type == DiskType.FIXED:
            raise InvalidArgument(f"{path}: can't save key hashes for fixed vhds")
        if any(entry != BAT_UNUSED for entry in image.bat):
            raise InvalidArgument(f"{path}: can't save key hashes for non-empty vhds")
        if given is None:
            assert key_path is not None
            bits = key_bits_for(path, key_path)
            given = calculate_hash(nonce, read_key(key_path, bits // 8))
        new = KeyHash(1, nonce, given)
        _store(image, new)
        log.debug("%s: key hash set to %s", path, new.describe())
        return new


def _store(image: VhdFile, new: KeyHash) -> None:
    head = image.batmap_header
    if head is not None and image.header is not None:
        head = dataclasses.replace(
            head, keyhash_cookie=new.cookie, keyhash_nonce=new.nonce, keyhash_hash=new.hash
        )
        pwrite_all(image.fd, [head.encode()], batmap_header_offset(image.header))
        image.sync()
        image.batmap_header = head
        return
    raw = new.encode()
    assert len(raw) == KEYHASH_SIZE
    os.setxattr(image.fd, KEYHASH_XATTR, raw)
    os.fsync(image.fd)


def check_key(path: str, key_path: str) -> None:
    """``key -c -k KEYFILE``: succeed when the key hashes (with the stored nonce) to the
    stored hash. Raises InvalidArgument (no hash stored, key file name not for this
    image, wrong key size) or KeyMismatch."""
    stored = read_keyhash(path)
    if not stored.present:
        raise InvalidArgument(f"{path}: this vhd has no keyhash")
    bits = key_bits_for(path, key_path)
    if calculate_hash(stored.nonce, read_key(key_path, bits // 8)) != stored.hash:
        raise KeyMismatch(f"{path}: vhd hash doesn't match key hash")
