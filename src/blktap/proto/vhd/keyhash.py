"""blktap's key hash: the fingerprint of the key an encrypted VHD needs.

65 bytes: cookie u8 (1 = a hash is stored), nonce [32], hash [32], where hash =
SHA-256(nonce + key) (blktap's ``vhd_calculate_keyhash``). It lives in the batmap header
at offset 29 when the image has a batmap, else in the file's extended attribute
:data:`KEYHASH_XATTR` (the same 65 bytes). Sans-IO: parsing, encoding, hashing and the
C tool's rules for hex arguments and key file names.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from blktap.errors import InvalidArgument

KEYHASH_XATTR = "user.com.citrix.xenclient.backend.keyhash"
"""Where libvhd keeps the key hash of an image without a batmap."""

NONCE_SIZE = 32
HASH_SIZE = 32
KEYHASH_SIZE = 1 + NONCE_SIZE + HASH_SIZE

KEY_SIZES_BITS = (512, 256)
"""Key sizes ``vhd-util key`` accepts, in the order it tries them on a key file name."""

_KEYHASH = struct.Struct(f">B{NONCE_SIZE}s{HASH_SIZE}s")
assert _KEYHASH.size == KEYHASH_SIZE


@dataclass(frozen=True, slots=True)
class KeyHash:
    cookie: int = 0
    """1 when a hash is stored; anything else reads as "none"."""
    nonce: bytes = bytes(NONCE_SIZE)
    hash: bytes = bytes(HASH_SIZE)

    @property
    def present(self) -> bool:
        # vhd-util key -p prints the hash only for cookie 1.
        return self.cookie == 1

    def encode(self) -> bytes:
        return _KEYHASH.pack(self.cookie, self.nonce, self.hash)

    def describe(self) -> str:
        """What ``vhd-util key -p`` prints: ``none`` or ``<nonce hex> <hash hex>``."""
        if not self.present:
            return "none"
        return f"{self.nonce.hex()} {self.hash.hex()}"


def parse_keyhash(data: bytes | bytearray | memoryview) -> KeyHash:
    """Parse the 65 stored bytes; shorter input (a truncated attribute) is zero-padded,
    which reads as no hash unless the cookie byte says otherwise."""
    raw = bytes(data[:KEYHASH_SIZE]).ljust(KEYHASH_SIZE, b"\0")
    return KeyHash(*_KEYHASH.unpack(raw))


def calculate_hash(nonce: bytes, key: bytes) -> bytes:
    """SHA-256 of the nonce followed by the key."""
    return hashlib.sha256(nonce + key).digest()


def make_keyhash(key: bytes, nonce: bytes = bytes(NONCE_SIZE)) -> KeyHash:
    """The stored form for ``key`` (the C tool's nonce is all zeros unless given)."""
    return KeyHash(1, nonce, calculate_hash(nonce, key))


def parse_hex(text: str, size: int, what: str) -> bytes:
    """``size`` bytes from exactly ``2 * size`` hex digits (either case), as the C tool's
    ``vhd_util_set_hex`` demands. Raises InvalidArgument."""
    if len(text) // 2 != size:
        raise InvalidArgument(
            f"invalid size for hex string ({what}): {len(text)} digits, expected {2 * size}"
        )
    if len(text) % 2 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise InvalidArgument(f"invalid hex digit in {what}: {text!r}")
    return bytes.fromhex(text)


def image_stem(image_path: str) -> str:
    """The image's base name with everything from the first ".vhd" cut off (the C tool's
    ``vhd_util_get_vhd_basename``)."""
    base = image_path.rsplit("/", 1)[-1]
    cut = base.find(".vhd")
    return base if cut < 0 else base[:cut]


def key_bits_for(image_path: str, key_path: str) -> int:
    """The key size a key file's name declares for this image.

    The name must start with ``<image stem>,aes-xts-plain,<bits>.key`` for bits 512 or
    256 (``<VHD-uuid>,aes-xts-plain,512.key`` beside a ``<VHD-uuid>.vhd``). Raises
    InvalidArgument otherwise.
    """
    name = key_path.rsplit("/", 1)[-1]
    stem = image_stem(image_path)
    for bits in KEY_SIZES_BITS:
        if name.startswith(f"{stem},aes-xts-plain,{bits}.key"):
            return bits
    raise InvalidArgument(
        f"Invalid key name {key_path}: expected {stem},aes-xts-plain,"
        f"{'|'.join(str(b) for b in KEY_SIZES_BITS)}.key"
    )
