"""``vhd-util key``: the key hash codec, and every form of the command (print, set from a
key file or a hash with an optional nonce, check, calculate), stored in the batmap header
or, for an image without a batmap, in the extended attribute; refusals and exit codes as
the C tool."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from blktap.cli.vhd_util import main
from blktap.errors import InvalidArgument
from blktap.proto.vhd.batmap import parse_batmap_header
from blktap.proto.vhd.keyhash import (
    KEYHASH_SIZE,
    KEYHASH_XATTR,
    KeyHash,
    image_stem,
    key_bits_for,
    make_keyhash,
    parse_hex,
    parse_keyhash,
)

MB = 1 << 20
BATMAP_HEADER = 2048  # where vhd-util create puts it for a small disk
NONCE = "0123456789abcdef" * 4
UUID = "3f2a8d1e-5b7c-4e19-a0d2-6c8b9e1f4a37"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def image(tmp_path: Path, capsys: pytest.CaptureFixture[str], size_mb: int = 10) -> str:
    path = str(tmp_path / f"{UUID}.vhd")
    assert run(capsys, "create", "-n", path, "-s", str(size_mb))[0] == 0
    return path


def key_file(tmp_path: Path, bits: int, data: bytes | None = None, stem: str = UUID) -> str:
    path = tmp_path / f"{stem},aes-xts-plain,{bits}.key"
    path.write_bytes(os.urandom(bits // 8) if data is None else data)
    return str(path)


# ------------------------------------------------------------------------ the codec
def test_keyhash_round_trip_and_text() -> None:
    kh = make_keyhash(b"k" * 32, bytes.fromhex(NONCE))
    assert kh.cookie == 1 and kh.hash == hashlib.sha256(bytes.fromhex(NONCE) + b"k" * 32).digest()
    raw = kh.encode()
    assert len(raw) == KEYHASH_SIZE and parse_keyhash(raw) == kh
    assert kh.describe() == f"{NONCE} {kh.hash.hex()}"
    assert KeyHash().describe() == "none"
    # Only cookie 1 counts as a stored hash, as key -p.
    assert KeyHash(cookie=2, hash=b"x" * 32).describe() == "none"
    assert parse_keyhash(b"\x01") == KeyHash(cookie=1)


@pytest.mark.parametrize("text", ["ab" * 31, "ab" * 33, "zz" * 32, "a" * 65, "-1" * 32])
def test_parse_hex_refuses_what_the_c_tool_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_hex(text, 32, "hash")


def test_parse_hex_accepts_either_case() -> None:
    assert parse_hex("aB" * 32, 32, "hash") == b"\xab" * 32


def test_key_file_names() -> None:
    assert image_stem("sr/abc.vhd") == "abc" and image_stem("sr/abc.vhd.tmp") == "abc"
    assert image_stem("plain") == "plain"
    assert key_bits_for("sr/abc.vhd", "keys/abc,aes-xts-plain,512.key") == 512
    assert key_bits_for("sr/abc.vhd", "abc,aes-xts-plain,256.key") == 256
    for wrong in ("keys/abd,aes-xts-plain,512.key", "keys/abc,aes-xts-plain,128.key",
                  "keys/abc.key"):
        with pytest.raises(InvalidArgument):
            key_bits_for("sr/abc.vhd", wrong)


# ---------------------------------------------------------------------- the command
def test_print_none_then_set_from_hash_with_nonce(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = image(tmp_path, capsys)
    assert run(capsys, "key", "-p", "-n", path) == (0, "none\n", "")
    digest = "5a" * 32
    rc, out, _ = run(capsys, "key", "-s", "-n", path, "-H", digest, "-N", NONCE, "-p")
    assert (rc, out) == (0, f"{NONCE} {digest}\n")
    # Stored in the batmap header at offset 29: cookie, nonce, hash.
    with open(path, "rb") as f:
        f.seek(BATMAP_HEADER)
        head = parse_batmap_header(f.read(512))
    assert (head.keyhash_cookie, head.keyhash_nonce.hex(), head.keyhash_hash.hex()) == (
        1, NONCE, digest)
    assert run(capsys, "check", "-n", path)[0] == 0


def test_set_from_key_file_check_and_calculate(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = image(tmp_path, capsys)
    key = key_file(tmp_path, 256)
    raw = Path(key).read_bytes()
    assert run(capsys, "key", "-s", "-n", path, "-k", key)[0] == 0
    expected = hashlib.sha256(bytes(32) + raw).hexdigest()  # nonce zeros by default
    assert run(capsys, "key", "-p", "-n", path)[1] == f"{'0' * 64} {expected}\n"
    assert run(capsys, "key", "-c", "-n", path, "-k", key) == (0, "", "")
    assert run(capsys, "key", "-C", "-k", key)[1] == f"{expected}\n"
    assert run(capsys, "key", "-C", "-k", key, "-N", NONCE)[1] == (
        hashlib.sha256(bytes.fromhex(NONCE) + raw).hexdigest() + "\n")
    # Another key of the right name and size does not match.
    Path(key).write_bytes(os.urandom(32))
    rc, _, err = run(capsys, "key", "-c", "-n", path, "-k", key)
    assert rc == errno.EINVAL and "doesn't match" in err


def test_key_file_must_fit_the_image_and_its_size(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = image(tmp_path, capsys)
    rc, _, err = run(capsys, "key", "-s", "-n", path, "-k", key_file(tmp_path, 512, stem="other"))
    assert rc == errno.EINVAL and "Invalid key name" in err
    short = key_file(tmp_path, 512, data=os.urandom(40))
    rc, _, err = run(capsys, "key", "-s", "-n", path, "-k", short)
    assert rc == errno.EINVAL and "incorrect key size" in err
    long_ = key_file(tmp_path, 256, data=os.urandom(48))
    assert run(capsys, "key", "-s", "-n", path, "-k", long_)[0] == errno.EIO
    assert run(capsys, "key", "-p", "-n", path)[1] == "none\n"
    big = tmp_path / "big.key"
    big.write_bytes(os.urandom(65))
    assert run(capsys, "key", "-C", "-k", str(big))[0] == errno.EIO  # more than 512 bits


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = image(tmp_path, capsys)
    key = key_file(tmp_path, 512)
    for argv in (
        ["key", "-n", path],  # no action
        ["key", "-p"],  # no name
        ["key", "-s", "-n", path],  # neither -k nor -H
        ["key", "-s", "-n", path, "-k", key, "-H", "00" * 32],  # both
        ["key", "-s", "-c", "-n", path, "-k", key],
        ["key", "-c", "-n", path],  # check without a key
        ["key", "-c", "-n", path, "-k", key, "-N", NONCE],
        ["key", "-C"],  # calculate without a key
        ["key", "-p", "-n", path, "extra"],
    ):
        assert run(capsys, *argv)[0] == errno.EINVAL, argv
    rc, _, err = run(capsys, "key", "-c", "-n", path, "-k", key)
    assert rc == errno.EINVAL and "no keyhash" in err
    assert run(capsys, "key", "-s", "-n", path, "-H", "0" * 63)[0] == errno.EINVAL
    assert run(capsys, "key", "-p", "-n", str(tmp_path / "missing.vhd"))[0] == errno.ENOENT


def test_set_refused_for_fixed_and_non_empty_images(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fixed = str(tmp_path / "fixed.vhd")
    assert run(capsys, "create", "-n", fixed, "-s", "4", "-r")[0] == 0
    rc, _, err = run(capsys, "key", "-s", "-n", fixed, "-H", "11" * 32)
    assert rc == errno.EINVAL and "fixed" in err
    assert run(capsys, "key", "-p", "-n", fixed)[1] == "none\n"  # print reads the xattr
    used = image(tmp_path, capsys)
    assert run(capsys, "fill", "-n", used, "-b", "-f", "0", "-t", "0")[0] == 0
    before = Path(used).read_bytes()
    rc, _, err = run(capsys, "key", "-s", "-n", used, "-H", "11" * 32)
    assert rc == errno.EINVAL and "non-empty" in err
    assert Path(used).read_bytes() == before


def test_image_without_batmap_keeps_the_hash_in_the_xattr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "qemu.vhd")
    proc = subprocess.run(["qemu-img", "create", "-f", "vpc", path, "8M"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"qemu-img cannot create a vpc image: {proc.stderr}")
    before = Path(path).read_bytes()
    assert run(capsys, "key", "-p", "-n", path)[1] == "none\n"
    rc, out, _ = run(capsys, "key", "-s", "-n", path, "-H", "cd" * 32, "-N", NONCE, "-p")
    assert (rc, out) == (0, f"{NONCE} {'cd' * 32}\n")
    raw = os.getxattr(path, KEYHASH_XATTR)
    assert raw == b"\x01" + bytes.fromhex(NONCE) + b"\xcd" * 32
    assert Path(path).read_bytes() == before  # the image itself is unchanged
    # A hash another tool left in the attribute is read back as stored.
    os.setxattr(path, KEYHASH_XATTR, b"\x00" * KEYHASH_SIZE)
    assert run(capsys, "key", "-p", "-n", path)[1] == "none\n"
