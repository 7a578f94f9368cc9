"""The NBD export against real clients: nbdinfo, nbdcopy, libnbd (nbdsh's Python binding),
qemu-img, qemu-io and fio's nbd engine.

The server runs in a background thread with its own event loop, serving a VBD opened on an
``aio:`` raw file (O_DIRECT, the C tapdisk's default, unless a test says otherwise)
(tests/nbd_helpers.py). The server's own behaviour against hand-written clients is in
tests/system/test_nbd_server.py, which needs none of these tools.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.nbd_helpers import (
    OPTS,
    SIMPLE_MAGIC,
    SIZE,
    RawClient,
    ServedImage,
    make_image,
    pattern,
    random_image,
    request,
)

TOOLS = ("nbdinfo", "nbdcopy", "nbdsh", "qemu-img", "qemu-io", "fio")


_missing = [t for t in TOOLS if shutil.which(t) is None]


pytestmark = pytest.mark.skipif(bool(_missing), reason=f"NBD client tools missing: {_missing}")


def run(*argv: str, timeout: float = 60.0, input: bytes | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, input=input, check=False)
    assert proc.returncode == 0, (
        f"{argv} exited {proc.returncode}: {proc.stderr.decode()} {proc.stdout.decode()}")
    return proc.stdout.decode()


def libnbd(script: str, timeout: float = 60.0) -> Any:
    """Run ``script`` under the system python3 with libnbd's ``nbd`` module; it prints JSON."""
    out = run("/usr/bin/python3", "-c", "import json, nbd, errno\n" + script, timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------ nbdinfo
def test_nbdinfo_reports_size_and_every_flag(serve: Callable[..., ServedImage]) -> None:
    s = serve()
    info = json.loads(run("nbdinfo", "--json", s.uri))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    [export] = info["exports"]
    assert export["export-size"] == SIZE
    assert "base:allocation" in export["contexts"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn", "can_cache", "can_df"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["is_rotational"] is False
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 32 * 1024 * 1024)
    assert export["description"] == "blktap VBD minor 0"


def test_nbdinfo_map_shows_holes_and_data(workdir: str,
                                          serve: Callable[..., ServedImage]) -> None:
    image = make_image(workdir, data={1 << 20: b"\xaa" * 65536, 8 << 20: b"\x55" * 4096})
    s = serve(image)
    extents = json.loads(run("nbdinfo", "--map", "--json", s.uri))
    covered = 0
    data_ranges = []
    for ext in extents:
        assert ext["offset"] == covered
        covered += ext["length"]
        if ext["type"] & 1 == 0:
            data_ranges.append((ext["offset"], ext["length"]))
    assert covered == SIZE
    assert data_ranges, extents
    # Every written byte lies in a data extent (a filesystem may round data extents up).
    for written in (1 << 20, (1 << 20) + 65535, 8 << 20):
        assert any(o <= written < o + n for o, n in data_ranges), (written, data_ranges)
    assert sum(n for _o, n in data_ranges) < SIZE // 2


# ------------------------------------------------------------------------ qemu
def test_qemu_img_info_convert_compare(workdir: str,
                                       serve: Callable[..., ServedImage]) -> None:
    image = make_image(workdir, data={0: pattern(1, 1 << 20), 40 << 20: pattern(2, 8192)})
    s = serve(image)
    info = json.loads(run("qemu-img", "info", "--output=json", s.uri))
    assert info["virtual-size"] == SIZE
    copy = os.path.join(workdir, "copy.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri, copy)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, copy)
    with open(copy, "rb") as a, open(image, "rb") as b:
        assert a.read() == b.read()
    # And back: a modified copy converted onto the export.
    with open(copy, "r+b") as f:
        f.seek(3 << 20)
        f.write(pattern(3, 1 << 20))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", copy, s.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", copy, s.uri)


def test_qemu_io_patterns_zeroes_and_discard(workdir: str,
                                             serve: Callable[..., ServedImage]) -> None:
    s = serve()
    out = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xa5 0 1M",
        "-c", "write -P 0x3c 1000 5000",  # unaligned: read-modify-write in the chain
        "-c", "write -z 512k 64k",
        "-c", "write -z -u 768k 128k",  # may unmap
        "-c", "discard 4M 1M",
        "-c", "write -P 0x11 -f 8M 4k",  # FUA
        "-c", "flush",
        "-c", "read -P 0xa5 0 1000",
        "-c", "read -P 0x3c 1000 5000",
        "-c", "read -P 0xa5 6000 518288",
        "-c", "read -P 0 512k 64k",
        "-c", "read -P 0 768k 128k",
        "-c", "read -P 0xa5 896k 128k",
        "-c", "read -P 0x11 8M 4k",
        s.uri,
    )
    assert "Pattern verification failed" not in out, out
    with open(s.image, "rb") as f:
        data = f.read(9 << 20)
    assert data[:1000] == b"\xa5" * 1000
    assert data[1000:6000] == b"\x3c" * 5000
    assert data[512 << 10 : 576 << 10] == bytes(64 << 10)
    assert data[768 << 10 : 896 << 10] == bytes(128 << 10)
    assert data[8 << 20 : (8 << 20) + 4096] == b"\x11" * 4096


def test_qemu_io_sees_out_of_range_errors(serve: Callable[..., ServedImage]) -> None:
    s = serve()
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", f"read {SIZE - 512} 1024", s.uri],
                          capture_output=True, timeout=30, check=False)
    assert b"read failed" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------ nbdcopy
def test_nbdcopy_with_four_connections(workdir: str,
                                       serve: Callable[..., ServedImage]) -> None:
    src = make_image(workdir, "src.raw", data={i << 20: pattern(i, 65536) for i in range(0, 64, 3)})
    s = serve()
    run("nbdcopy", "--connections=4", "--threads=4", "--flush", src, s.uri)
    with open(src, "rb") as a, open(s.image, "rb") as b:
        assert a.read() == b.read()
    back = os.path.join(workdir, "back.raw")
    run("nbdcopy", "--connections=4", "--threads=4", s.uri, back)
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()
    stats = s.run(s.server.statistics)
    assert stats.connections >= 8
    assert stats.bytes_written > 0 and stats.bytes_read > 0
    assert stats.protocol_errors == 0


# ------------------------------------------------------------------------ libnbd
LIBNBD_SESSION = """
results = {}
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context("base:allocation")
    h.set_strict_mode(0)  # let the server do the checking
    h.connect_uri(URI)
    r = {"structured": h.get_structured_replies_negotiated(),
         "base_allocation": h.can_meta_context("base:allocation")}
    data = bytes(range(256)) * 256
    h.pwrite(data, 65536, nbd.CMD_FLAG_FUA)
    r["read_back"] = h.pread(len(data), 65536) == data
    h.zero(8192, 65536 + 4096)
    r["zeroed"] = h.pread(8192, 65536 + 4096) == bytes(8192)
    try:
        h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
        r["fast_zero"] = "ok"
    except nbd.Error as e:
        r["fast_zero"] = e.errnum
    h.trim(65536, 1 << 20)
    h.cache(65536, 0)
    h.flush()
    def err(fn):
        try:
            fn()
            return 0
        except nbd.Error as e:
            return e.errnum
    r["read_past_end"] = err(lambda: h.pread(1024, SIZE - 512))
    r["write_past_end"] = err(lambda: h.pwrite(b"x" * 1024, SIZE - 512))
    r["zero_past_end"] = err(lambda: h.zero(4096, SIZE))
    r["read_too_big"] = err(lambda: h.pread(64 << 20, 0))
    if structured:
        extents = []
        h.block_status(SIZE, 0, lambda ctx, off, ents, e: extents.extend(ents) or 0)
        r["extents"] = extents
        one = []
        h.block_status(SIZE, 0, lambda ctx, off, ents, e: one.extend(ents) or 0,
                       nbd.CMD_FLAG_REQ_ONE)
        r["req_one"] = one
        r["read_df"] = h.pread(4096, 65536, nbd.CMD_FLAG_DF) == data[:4096]
    h.shutdown()
    results[str(structured)] = r
print(json.dumps(results))
"""


def test_libnbd_with_and_without_structured_replies(serve: Callable[..., ServedImage]) -> None:
    s = serve()
    res = libnbd(f"URI = {s.uri!r}\nSIZE = {SIZE}\n" + LIBNBD_SESSION)
    for key, structured in (("True", True), ("False", False)):
        r = res[key]
        assert r["structured"] is structured
        assert r["read_back"] and r["zeroed"]
        assert r["fast_zero"] in ("ok", 95)  # ENOTSUP when zeroing is not known to be fast
        assert r["read_past_end"] == 22
        assert r["write_past_end"] == 28
        assert r["zero_past_end"] == 28
        assert r["read_too_big"] == 22
    ext = res["True"]["extents"]
    assert sum(ext[0::2]) == SIZE and all(n > 0 for n in ext[0::2])
    assert len(res["True"]["req_one"]) == 2 and 0 < res["True"]["req_one"][0] <= SIZE
    assert res["True"]["read_df"]
    stats = s.run(s.server.statistics)
    assert stats.errors >= 8


def test_read_only_export(workdir: str, serve: Callable[..., ServedImage]) -> None:
    image = make_image(workdir, data={0: b"\x77" * 4096})
    before = os.stat(image)
    s = serve(image, read_only=True)
    [export] = json.loads(run("nbdinfo", "--json", s.uri))["exports"]
    assert export["is_read_only"] is True
    assert not export["can_trim"] and not export["can_zero"] and not export["can_fua"]
    res = libnbd(f"""
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri({s.uri!r})
out = {{"ro": h.is_read_only(), "read": h.pread(4096, 0) == b"\\x77" * 4096}}
for name, fn in (("write", lambda: h.pwrite(b"x" * 512, 0)),
                 ("zero", lambda: h.zero(512, 0)),
                 ("trim", lambda: h.trim(512, 0))):
    try:
        fn()
        out[name] = 0
    except nbd.Error as e:
        out[name] = e.errnum
h.shutdown()
print(json.dumps(out))
""")
    assert res == {"ro": True, "read": True, "write": 1, "zero": 1, "trim": 1}
    with open(image, "rb") as f:
        assert f.read(4096) == b"\x77" * 4096
    assert os.stat(image).st_mtime_ns == before.st_mtime_ns


# ------------------------------------------------------------------------ fio
def fio(uri: str, *args: str) -> dict[str, Any]:
    out = run("fio", "--output-format=json", "--name=nbd", "--ioengine=nbd", f"--uri={uri}",
              "--bs=4k", "--verify_state_save=0", *args, timeout=60)
    result: dict[str, Any] = json.loads(out[out.index("{"):])
    for job in result["jobs"]:
        assert job["error"] == 0, job
    return result


def test_fio_randrw_verify_qd32(serve: Callable[..., ServedImage]) -> None:
    s = serve(direct=False)
    res = fio(s.uri, "--rw=randrw", "--iodepth=32", "--size=16M", "--verify=crc32c",
              "--verify_fatal=1", "--do_verify=1")
    job = res["jobs"][0]
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_fio_verify_qd1_direct(serve: Callable[..., ServedImage]) -> None:
    """One request at a time on an O_DIRECT VBD: reads are done synchronously while the
    device is idle (AioImage.read_now), writes through Linux AIO, and the verify phase's
    reads (one at a time, nothing else) by the connection's lane (nbd_lane)."""
    s = serve(direct=True)
    res = fio(s.uri, "--rw=randrw", "--iodepth=1", "--size=8M", "--verify=crc32c",
              "--verify_fatal=1", "--do_verify=1")
    job = res["jobs"][0]
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
    assert s.run(s.server.statistics).lane_reads > 0


def test_fio_eight_jobs_direct(serve: Callable[..., ServedImage]) -> None:
    s = serve(direct=True)
    res = fio(s.uri, "--rw=randrw", "--iodepth=16", "--numjobs=8", "--size=4M",
              "--offset_increment=4M", "--verify=crc32c", "--verify_fatal=1")
    assert len(res["jobs"]) == 8
    assert s.run(s.server.statistics).connections >= 8


GOOD_CLIENT = """
import time
h = nbd.NBD()
h.connect_uri(URI)
n = 0
end = time.monotonic() + SECONDS
while time.monotonic() < end:
    h.pwrite(bytes([n & 255]) * 4096, (n % 256) * 4096)
    assert h.pread(4096, (n % 256) * 4096) == bytes([n & 255]) * 4096
    n += 1
h.shutdown()
print(json.dumps(n))
"""


def test_misbehaving_clients_are_dropped_while_a_good_one_works(
        serve: Callable[..., ServedImage]) -> None:
    s = serve(direct=False, handshake_timeout=1.0)
    good = subprocess.Popen(
        ["/usr/bin/python3", "-c",
         f"import json, nbd\nURI = {s.uri!r}\nSECONDS = 3\n" + GOOD_CLIENT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Bad request magic after a good handshake.
        c = RawClient(s.socket)
        c.handshake()
        c.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
        assert c.closed_by_server()
        c.close()
        # Garbage instead of the client flags.
        c = RawClient(s.socket)
        c.recv_exact(18)
        c.sock.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
        assert c.closed_by_server()
        c.close()
        # A truncated request, then the client goes away.
        c = RawClient(s.socket)
        c.handshake()
        c.sock.sendall(request(0, 1, 0, 512)[:17])
        c.close()
        # A write announcing more than the maximum payload: error, then disconnect.
        c = RawClient(s.socket)
        c.handshake()
        c.sock.sendall(request(1, 9, 0, 64 << 20) + b"x" * 1000)
        magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
        assert (magic, error, cookie) == (SIMPLE_MAGIC, 22, 9)
        assert c.closed_by_server()
        c.close()
        # A slow sender that never finishes the handshake (a byte every 0.3 s): dropped
        # after the 1 s handshake timeout (else the last recv times out: not these errors).
        c = RawClient(s.socket)
        c.recv_exact(18)
        c.sock.sendall(struct.pack(">I", 3))
        with pytest.raises((BrokenPipeError, ConnectionResetError, EOFError)):
            for byte in struct.pack(">QII", OPTS, 7, 6):
                c.sock.sendall(bytes([byte]))
                time.sleep(0.3)
            c.recv_exact(1)
        c.close()
        out, err = good.communicate(timeout=30)
        assert good.returncode == 0, err.decode()
        assert json.loads(out) > 0  # served (and checked) writes and reads meanwhile
    finally:
        if good.poll() is None:
            good.kill()
            good.wait()
    stats = s.run(s.server.statistics)
    assert stats.protocol_errors >= 4


def test_optional_tcp_listener(serve: Callable[..., ServedImage]) -> None:
    s = serve(direct=False, tcp=("127.0.0.1", 0))
    port = s.server.tcp_port
    assert port
    [export] = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}"))["exports"]
    assert export["export-size"] == SIZE


def test_block_status_of_empty_range_is_einval(serve: Callable[..., ServedImage]) -> None:
    s = serve(direct=False)
    res = libnbd(f"""
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.set_strict_mode(0)
h.connect_uri({s.uri!r})
try:
    h.block_status(0, 0, lambda *a: 0)
    out = 0
except nbd.Error as e:
    out = e.errnum
h.shutdown()
print(json.dumps(out))
""")
    assert res == 22


LANE_STRUCTURED = """
h = nbd.NBD()
h.set_request_structured_replies(STRUCTURED)
h.set_strict_mode(0)  # pread takes DF only without the strict flag check
h.connect_uri(URI)
ok = True
for i in range(300):
    offset = (i * 7919 * 4096) % (SIZE - 65536)
    length = (4096, 65536, 512)[i % 3]
    flags = nbd.CMD_FLAG_DF if STRUCTURED and i % 2 else 0
    with open(IMAGE, "rb") as f:
        f.seek(offset)
        want = f.read(length)
    ok = ok and h.pread(length, offset, flags) == want
result = [h.get_structured_replies_negotiated(), ok]
h.shutdown()
print(json.dumps(result))
"""


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_lane_replies_to_libnbd(workdir: str, serve: Callable[..., ServedImage],
                                structured: bool) -> None:
    path, image = random_image(workdir)
    s = serve(path)
    res = libnbd(f"URI = {s.uri!r}\nSIZE = {len(image)}\nIMAGE = {path!r}\n"
                 f"STRUCTURED = {structured}\n" + LANE_STRUCTURED)
    assert res == [structured, True]
    assert s.run(s.server.statistics).lane_reads >= 280


def test_fio_large_writes_verify_buffered(serve: Callable[..., ServedImage]) -> None:
    """fio's 1 MiB random writes, 8 in flight, then read back and checked: through the
    write lane."""
    s = serve(direct=False)
    fio(s.uri, "--rw=randwrite", "--bs=1M", "--iodepth=8", "--size=32M", "--loops=2",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1")
    assert s.run(s.server.statistics).lane_writes > 0
