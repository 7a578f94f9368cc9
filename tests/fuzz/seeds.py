"""The seed inputs of each target's corpus, written by ``python -m tests.fuzz.seeds``
into tests/fuzz/corpus/<target>/seed-*. The corpus also holds inputs the fuzzer found
(content-named by libFuzzer) and regression inputs (``regress-*``); this script only
(re)writes the seeds."""

from __future__ import annotations

import os
import struct
import sys
import tempfile

from tests.fuzz.targets import CONTROL_IMAGE, corpus_dir

_OPTS = 0x49484156454F5054
_REQ = 0x25609513
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, STATUS = 0, 1, 2, 3, 4, 5, 6, 7


def _req(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
         data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", _REQ, flags, cmd, cookie, offset, length) + data


def _opt(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", _OPTS, opt, len(payload)) + payload


def nbd_seeds() -> dict[str, bytes]:
    transmission = (
        _req(READ, 1, 0, 4096) + _req(WRITE, 2, 4096, 512, data=b"\xa5" * 512)
        + _req(WRITE, 3, 8192, 512, flags=1, data=b"\x11" * 512)  # FUA
        + _req(FLUSH, 4) + _req(TRIM, 5, 0, 65536) + _req(ZEROES, 6, 0, 4096, flags=2)
        + _req(CACHE, 7, 0, 4096) + _req(READ, 8, 1000, 10) + _req(READ, 9, 1 << 20, 512)
        + _req(DISC, 10))
    context = b"base:allocation"
    meta = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", len(context)) \
        + context
    # Byte 0 is the target's mode (0: the rest is the client's whole handshake).
    return {
        "seed-handshake-go": b"\0" + struct.pack(">I", 3) + _opt(7, struct.pack(">IH", 0, 0))
        + _req(READ, 1, 0, 512) + _req(DISC, 2),
        "seed-handshake-options": b"\0" + struct.pack(">I", 1) + _opt(6)  # NBD_OPT_INFO, short
        + _opt(3) + _opt(8) + _opt(10, meta) + _opt(9, meta)  # LIST, SR, SET/LIST_META
        + _opt(7, struct.pack(">IH", 0, 1) + struct.pack(">H", 3)) + _req(STATUS, 1, 0, 65536),
        "seed-export-name": b"\0" + struct.pack(">I", 1) + _opt(1) + _req(READ, 1, 0, 512),
        "seed-abort": b"\0" + struct.pack(">I", 3) + _opt(2),
        "seed-transmission": b"\x01" + transmission,
        "seed-structured": b"\x02" + transmission + _req(READ, 11, 0, 65536),
        "seed-bad-magic": b"\x01" + b"\x00" * 28,
        "seed-huge-write": b"\x01" + _req(WRITE, 1, 0, 1 << 25) + b"\x00" * 64,
    }


def _msg(type_: int, cookie: int, union: bytes = b"") -> bytes:
    return struct.pack("<HH4x", type_, cookie) + union.ljust(536, b"\0")


def _params(path: str, flags: int = 0, timeout: int = 0) -> bytes:
    return (struct.pack("<III", flags, 0, 0) + path.encode().ljust(256, b"\0")
            + struct.pack("<IH", 0xFFFFFFFF, timeout) + bytes(256))


def control_seeds() -> dict[str, bytes]:
    image = f"aio:{CONTROL_IMAGE}"
    return {
        "seed-pid": _msg(3, 0xFFFF),
        "seed-list": _msg(19, 0xFFFF),
        "seed-lifecycle": b"".join([
            _msg(5, 0), _msg(7, 0, _params(image, timeout=5)), _msg(21, 0), _msg(28, 0),
            _msg(9, 0), _msg(11, 0, _params("")), _msg(13, 0), _msg(15, 0)]),
        "seed-two-minors": b"".join([
            _msg(5, 0), _msg(5, 1), _msg(7, 1, _params(f"null:{image}", flags=1)),
            _msg(7, 0, _params(f"fault:op=write,errno=EIO:{image}")), _msg(19, 0xFFFF),
            _msg(23, 0), _msg(15, 1)]),
        "seed-bad-type": _msg(99, 0),
        "seed-open-unattached": _msg(7, 3, _params(image)),
        "seed-short": _msg(3, 0)[:100],
    }


def vhd_seeds() -> dict[str, bytes]:
    from blktap.vhd.create import create_dynamic, create_fixed, snapshot

    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.vhd")
        create_dynamic(base, 256 << 10, block_size=16 << 10)
        fixed = os.path.join(d, "fixed.vhd")
        create_fixed(fixed, 8 << 10)
        leaf = os.path.join(d, "leaf.vhd")
        snapshot(leaf, base)
        for name, path in (("seed-dynamic", base), ("seed-fixed", fixed),
                           ("seed-differencing", leaf)):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def nbd_proto_seeds() -> dict[str, bytes]:
    """tests/fuzz/codec_targets.py's nbd-proto: byte 0 the export, byte 1 the
    handshake the harness makes first (0 none, 1 OPT_GO, 2 structured + GO, 3
    EXPORT_NAME), then the stream (the nbd seeds' own, behind their mode byte)."""
    out: dict[str, bytes] = {}
    for name, data in nbd_seeds().items():
        out[name] = bytes([0, data[0] % 3]) + data[1:]
    transmission = out["seed-transmission"][2:]
    for cfg, what in ((1, "read-only"), (2 | 4 | 8, "no-flush-trim-zero"), (32, "bitmap"),
                      (64, "borrowed"), (16, "no-status")):
        out[f"seed-{what}"] = bytes([cfg, 2]) + transmission + _req(STATUS, 12, 0, 4096)
    out["seed-export-name-zeroes"] = bytes([0, 3]) + transmission
    out["seed-tls"] = bytes([128, 1]) + transmission
    out["seed-tls-raw"] = bytes([128, 0]) + struct.pack(">I", 3) + _opt(7) + _opt(5)
    out["seed-split-write"] = bytes([0, 1 | 4 * 5]) + _req(WRITE, 1, 0, 4096) \
        + b"\x5a" * 4096 + _req(READ, 2, 0, 4096) + _req(DISC, 3)
    return out


def control_proto_seeds() -> dict[str, bytes]:
    """codec_targets.py's control-proto: byte 0 even, the server side (the request
    stream follows); odd, the client side (byte 1 indexes the request type list, the
    reply stream follows)."""
    from blktap.proto import control as ctl

    image = f"aio:{CONTROL_IMAGE}"
    out: dict[str, bytes] = {}
    server = {
        "pid": _msg(3, 0xFFFF),
        "open": _msg(7, 0, _params(image, timeout=5)),
        "open-layers": _msg(7, 1, _params(f"fault:op=write,errno=EIO,rate=0.5:null:{image}")),
        "open-log": _msg(7, 0, _params(image, flags=0x10)) + b"/tmp/log".ljust(256, b"\0"),
        "open-key": _msg(7, 0, _params(image, flags=0x400)) + bytes([4]) + b"k" * 4,
        "resume-secondary": _msg(11, 0, _params(image, flags=0x80)),
        "list": _msg(19, 0xFFFF),
        "two": _msg(3, 0) + _msg(5, 0),
        "bad-type": _msg(99, 0),
    }
    for name, data in server.items():
        out[f"seed-server-{name}"] = b"\x00" + data
    types = (3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 24, 26, 28)

    def reply(t: int, body: bytes) -> bytes:
        return bytes([1, types.index(t)]) + body

    out["seed-client-pid"] = reply(3, ctl.encode(ctl.Message(
        ctl.MessageType.PID_RSP, 0xFFFF, ctl.PidPayload(1234))))
    out["seed-client-list"] = reply(19, ctl.encode_list_replies(
        0xFFFF, [(0, 0, image), (1, 0x20, "vhd:/x.vhd")]))
    out["seed-client-stats"] = reply(21, ctl.encode_stats_reply(0, b'{"name": "x"}'))
    out["seed-client-error"] = reply(9, ctl.encode(ctl.error_reply(0, 16)))
    out["seed-client-open"] = reply(7, ctl.encode(ctl.Message(
        ctl.MessageType.OPEN_RSP, 0, ctl.ImageInfoPayload(2048))))
    out["seed-client-minors"] = reply(17, ctl.encode(ctl.Message(
        ctl.MessageType.LIST_MINORS_RSP, 0xFFFF, ctl.MinorsPayload((0, 1, 5)))))
    return out


SEEDS = {"nbd": nbd_seeds, "control": control_seeds, "vhd": vhd_seeds,
         "nbd-proto": nbd_proto_seeds, "control-proto": control_proto_seeds,
         "vhd-parse": vhd_seeds}


def main() -> int:
    for target, make in SEEDS.items():
        directory = corpus_dir(target)
        os.makedirs(directory, exist_ok=True)
        for name, data in make().items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
