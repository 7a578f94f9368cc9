"""The ``nbd`` image driver against real servers: nbdkit (memory and file plugins, its
error and delay filters, killed and restarted), qemu-nbd, and our own export; as a leaf
and under ``tap-ctl create -a nbd:...`` serving fio; bad input."""

from __future__ import annotations

import asyncio
import errno
import importlib
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import Alloc, Extent, OpenOptions, opener_for
from blktap.block.drivers import nbd as nbd_driver
from blktap.errors import BlktapError, ImageFormatError, InvalidArgument
from tests.helpers import VHD_UTIL, short_tempdir
from tests.nbd_helpers import ServedImage, make_image, pattern
from tests.nbdkit_helpers import Nbdkit, free_port, libnbd_missing, nbdkit

_why = libnbd_missing()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

MIB = 1 << 20
RW = OpenOptions(read_only=False, direct=False)
RO = OpenOptions(read_only=True, direct=False)


@pytest.fixture
def sockdir() -> Iterator[str]:
    with short_tempdir("nbdd-") as path:
        yield path


async def open_nbd(path: str, options: OpenOptions = RW) -> nbd_driver.NbdImage:
    image = await opener_for("nbd")(path, options)
    assert isinstance(image, nbd_driver.NbdImage)
    return image


async def read(image: Any, offset: int, length: int) -> bytes:
    buf = memoryview(bytearray(length))
    await image.read(offset, buf)
    return bytes(buf)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("path", "words"), [
    ("http://example.com/disk", "unknown NBD URI scheme 'http'"),
    ("nbd+vsock:///", "unknown NBD URI scheme 'nbd+vsock'"),
    ("", "names no server"),
    ("relative.sock", "not a socket path"),
    ("host:notaport", "not a socket path"),
    ("127.0.0.1:70000", "not a socket path"),
    ("nbd+unix:///?socket=/x&connections=99", "connections='99'"),
])
def test_bad_image_strings_are_einval(path: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(open_nbd(path))
    assert info.value.errno == errno.EINVAL
    assert words in str(info.value)


def test_forms_parse() -> None:
    assert nbd_driver.parse_target("/run/x.sock").unix == "/run/x.sock"
    t = nbd_driver.parse_target("10.0.0.2:10809")
    assert (t.host, t.port) == ("10.0.0.2", 10809)
    t = nbd_driver.parse_target("[::1]:10809")
    assert (t.host, t.port) == ("::1", 10809)
    t = nbd_driver.parse_target("nbds://h/e?tls-certificates=/tmp/pki&connections=2")
    assert t.connections == 2 and t.uri == "nbds://h/e?tls-certificates=/tmp/pki"


def test_no_server_is_the_socket_errno(sockdir: str) -> None:
    with pytest.raises(BlktapError) as info:
        asyncio.run(open_nbd(os.path.join(sockdir, "nobody")))
    assert info.value.errno == errno.ENOENT
    port = free_port()
    with pytest.raises(BlktapError) as info:
        asyncio.run(open_nbd(f"127.0.0.1:{port}"))
    assert info.value.errno == errno.ECONNREFUSED


def test_read_write_open_of_a_read_only_export_is_erofs(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")
    with nbdkit(["-r", "memory", "1M"], sock=sock):
        with pytest.raises(OSError) as info:
            asyncio.run(open_nbd(sock))
        assert info.value.errno == errno.EROFS

        async def ro() -> None:
            image = await open_nbd(sock, RO)
            assert image.read_only
            await image.close()

        asyncio.run(ro())


def test_alloc_map_against_a_model() -> None:
    """AllocMap (the driver's extent map) against one kind per sector, with random sets."""
    rng = random.Random(5)
    sectors = 250
    # One piece, then pieces of 24 sectors (the last one shorter): runs cross pieces.
    for amap in (nbd_driver.AllocMap(sectors * 512),
                 nbd_driver.AllocMap(sectors * 512, chunk=24 * 512)):
        _check_alloc_map(rng, amap, sectors)


def _check_alloc_map(rng: random.Random, amap: nbd_driver.AllocMap, sectors: int) -> None:
    model = [Alloc.DATA] * sectors
    for _ in range(2000):
        first = rng.randrange(sectors)
        count = rng.randrange(1, sectors - first + 1)
        kind = rng.choice([Alloc.DATA, Alloc.ZERO])
        amap.set(first * 512, count * 512, kind)
        model[first : first + count] = [kind] * count
        whole = amap.extents(0, sectors * 512)
        assert all(a.alloc != b.alloc and a.offset + a.length == b.offset
                   for a, b in itertools.pairwise(whole))
        assert whole[0].offset == 0 and sum(e.length for e in whole) == sectors * 512
        assert amap.all_data() == (set(model) == {Alloc.DATA})
        q = rng.randrange(sectors)
        n = rng.randrange(1, sectors - q + 1)
        got = [e.alloc for e in amap.extents(q * 512, n * 512)
               for _ in range(e.length // 512)]
        assert got == model[q : q + n]
        assert amap.holds(q * 512, n * 512) == (1 if set(model[q : q + n]) == {Alloc.DATA}
                                                else -1)


# ------------------------------------------------------------------ nbdkit
def test_nbdkit_memory_commands_and_holes(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")
    data = pattern(1, 3 * MIB)

    async def go() -> None:
        image = await open_nbd(sock)
        try:
            assert image.info.size == 64 * MIB
            assert image.can_status and image.structured and image.can_flush
            assert image.allocation(0, 64 * MIB) == [
                Extent(0, 64 * MIB, Alloc.ZERO)]
            assert not image.fully_allocated
            await image.write(MIB, memoryview(data), fua=True)
            await image.write_zeroes(2 * MIB, 4096, may_unmap=True)
            await image.flush()
            # Many requests in flight at once on the one connection.
            parts = await asyncio.gather(*(read(image, MIB + i * 65536, 65536)
                                           for i in range(48)))
            want = bytearray(data)
            want[MIB : MIB + 4096] = bytes(4096)
            assert b"".join(parts) == bytes(want)
            kinds = image.allocation(0, 8 * MIB)
            assert [e.alloc for e in kinds] == [Alloc.ZERO, Alloc.DATA, Alloc.ZERO,
                                                Alloc.DATA, Alloc.ZERO]
            await image.discard(3 * MIB, MIB)
            assert await read(image, 0, MIB) == bytes(MIB)
        finally:
            await image.close()
        # A second open reads the map from the server: the data is where it was written.
        image = await open_nbd(sock, RO)
        try:
            ext = image.allocation(0, 8 * MIB)
            assert ext[0] == Extent(0, MIB, Alloc.ZERO)
            assert ext[1].alloc == Alloc.DATA and ext[1].offset == MIB
            assert await read(image, MIB + 4096, 8192) == data[4096:12288]
        finally:
            await image.close()

    with nbdkit(["memory", "64M"], sock=sock):
        asyncio.run(go())


def test_tcp_forms_and_uri_export_name(sockdir: str) -> None:
    port = free_port()
    image_file = make_image(sockdir, "disk.raw", 4 * MIB, {4096: b"tcp" * 100})

    async def go(path: str) -> None:
        image = await open_nbd(path, RO)
        try:
            assert (await read(image, 4096, 512))[:300] == b"tcp" * 100
        finally:
            await image.close()

    with nbdkit(["file", image_file], port=port):
        asyncio.run(go(f"127.0.0.1:{port}"))
        asyncio.run(go(f"nbd://127.0.0.1:{port}/anyname"))


def test_server_error_is_its_errno_at_once(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")

    async def go() -> None:
        image = await open_nbd(sock)
        try:
            with pytest.raises(OSError) as info:
                await read(image, 0, 4096)
            assert info.value.errno == errno.EPERM
            assert "the server answered" in str(info.value)
            await image.write(0, memoryview(b"w" * 4096))  # the connection is still good
            assert image.reconnects == 0
        finally:
            await image.close()

    with nbdkit(["--filter=error", "memory", "4M", "error-pread=EPERM", "error-pread-rate=100%"],
                sock=sock):
        asyncio.run(go())


def test_multi_conn(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")
    data = pattern(7, 4 * MIB)

    async def go() -> None:
        image = await open_nbd(f"nbd+unix:///?socket={sock}&connections=3")
        try:
            assert len(image._conns) == 3
            await asyncio.gather(*(image.write(i * 65536, memoryview(data)[i * 65536:
                                                                         (i + 1) * 65536])
                                   for i in range(64)))
            await image.flush()
            parts = await asyncio.gather(*(read(image, i * 65536, 65536) for i in range(64)))
            assert b"".join(parts) == data
        finally:
            await image.close()

    with nbdkit(["memory", "8M"], sock=sock):
        asyncio.run(go())
    with nbdkit(["--filter=multi-conn", "memory", "8M", "multi-conn-mode=disable"],
                sock=sock), pytest.raises(InvalidArgument, match="does not offer multi-conn"):
        asyncio.run(open_nbd(f"nbd+unix:///?socket={sock}&connections=2"))


# ------------------------------------------------------------------ reconnect
def test_reconnect_after_the_server_restarts(sockdir: str) -> None:
    """Requests in flight when the server dies, and requests sent while it is away, wait
    and complete once it is back; the data is all there."""
    sock = os.path.join(sockdir, "s")
    backing = make_image(sockdir, "disk.raw", 8 * MIB)
    data = pattern(3, 2 * MIB)
    server = Nbdkit(["--filter=delay", "file", backing, "wdelay=300ms", "rdelay=300ms"],
                    sock=sock)
    server.start()
    try:
        async def go() -> None:
            image = await open_nbd(sock)
            try:
                writes = [asyncio.ensure_future(
                    image.write(i * 65536, memoryview(data)[i * 65536 : (i + 1) * 65536]))
                    for i in range(32)]
                await asyncio.sleep(0.1)
                server.stop()  # SIGKILL with the writes in flight
                later = asyncio.ensure_future(read(image, 0, 65536))
                await asyncio.sleep(0.5)
                assert not later.done()
                server.start()
                await asyncio.gather(*writes)
                await later
                assert image.reconnects >= 1
                await image.flush()
                parts = await asyncio.gather(*(read(image, i * 65536, 65536)
                                               for i in range(32)))
                assert b"".join(parts) == data
            finally:
                await image.close()

        asyncio.run(go())
    finally:
        server.stop()
    with open(backing, "rb") as f:
        assert f.read(len(data)) == data


def test_requests_fail_with_eio_when_the_server_stays_away(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")
    backing = make_image(sockdir, "disk.raw", 4 * MIB, {0: b"back"})
    server = Nbdkit(["file", backing], sock=sock)
    server.start()
    try:
        async def go() -> None:
            image = await open_nbd(sock)
            image.wait_s = 1.0
            try:
                server.stop()
                await asyncio.sleep(0.05)
                start = time.monotonic()
                with pytest.raises(OSError) as info:
                    await read(image, 0, 4096)
                assert info.value.errno == errno.EIO
                assert "no connection for 1 s" in str(info.value)
                assert time.monotonic() - start < 30
                server.start()  # back: the next request is served
                assert (await read(image, 0, 512))[:4] == b"back"
            finally:
                await image.close()

        asyncio.run(go())
    finally:
        server.stop()


def test_a_server_that_comes_back_with_another_size_fails_requests(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")
    server = Nbdkit(["memory", "4M"], sock=sock)
    server.start()
    try:
        async def go() -> None:
            image = await open_nbd(sock)
            try:
                server.stop()
                server.args = ["memory", "2M"]
                server.start()
                with pytest.raises(OSError) as info:
                    await read(image, 0, 4096)
                assert info.value.errno == errno.EIO
                assert "2097152 bytes instead of 4194304" in str(info.value)
                with pytest.raises(OSError, match="instead of 4194304"):
                    await read(image, 0, 4096)  # and every request after it
            finally:
                await image.close()

        asyncio.run(go())
    finally:
        server.stop()


def test_close_with_a_request_the_server_never_answers(sockdir: str) -> None:
    """Closing does not wait for a server that sits on a request: the request fails with
    EIO and the close returns."""
    sock = os.path.join(sockdir, "s")

    async def go() -> None:
        image = await open_nbd(sock, RO)
        pending = asyncio.ensure_future(read(image, 0, 4096))
        await asyncio.sleep(0.2)
        assert not pending.done()
        await asyncio.wait_for(image.close(), 20)
        with pytest.raises(OSError) as info:
            await pending
        assert info.value.errno == errno.EIO and "closed" in str(info.value)

    with nbdkit(["--filter=delay", "memory", "1M", "rdelay=120"], sock=sock):
        asyncio.run(go())


class HangUpServer:
    """An NBD server (a thread) that negotiates, then answers every READ with half a
    reply and hangs up: a server that fails in the middle of a reply."""

    def __init__(self, sock: str, size: int = MIB) -> None:
        self.size = size
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(sock)
        self.listener.listen(8)
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import struct

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                try:
                    conn.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
                    conn.recv(4)
                    while True:
                        head = self._exact(conn, 16)
                        _, opt, n = struct.unpack(">QII", head)
                        self._exact(conn, n)
                        if opt == 7:  # GO: INFO_EXPORT, then ACK (simple replies only)
                            info = struct.pack(">HQH", 0, self.size, 1)
                            conn.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 3,
                                                     len(info)) + info)
                            conn.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 1, 0))
                            break
                        conn.sendall(struct.pack(">QIII", 0x3E889045565A9, opt,
                                                 (1 << 31) + 1, 0))
                    req = self._exact(conn, 28)
                    _, _, _, cookie, _, length = struct.unpack(">IHHQQI", req)
                    conn.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie) + bytes(length // 2))
                except (OSError, EOFError):
                    pass

    @staticmethod
    def _exact(conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = conn.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def test_a_server_that_hangs_up_mid_reply_gives_eio(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")
    server = HangUpServer(sock)
    try:
        async def go() -> None:
            image = await open_nbd(sock, RO)
            try:
                assert not image.structured and image.fully_allocated
                with pytest.raises(OSError) as info:
                    await read(image, 0, 4096)
                assert info.value.errno == errno.EIO
                assert f"dropped before the answer {nbd_driver.MAX_SENDS} times" in str(
                    info.value)
            finally:
                await image.close()

        asyncio.run(go())
        assert server.connections == nbd_driver.MAX_SENDS
    finally:
        server.close()


# ------------------------------------------------------------ other servers
def test_qemu_nbd(sockdir: str) -> None:
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd is not installed (scripts/setup.sh installs qemu-utils)")
    sock = os.path.join(sockdir, "q")
    written = pattern(5, MIB)
    backing = make_image(sockdir, "disk.raw", 16 * MIB, {4 * MIB: written})
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", sock, "-t", "-e", "4",
                             "--cache=none", "--aio=threads", backing],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):  # until it accepts (the file appears before it listens)
            with socket.socket(socket.AF_UNIX) as probe:
                if os.path.exists(sock) and probe.connect_ex(sock) == 0:
                    break
            time.sleep(0.02)

        async def go() -> None:
            image = await open_nbd(f"nbd+unix:///?socket={sock}")
            try:
                assert image.structured and image.can_status
                assert [e.alloc for e in image.allocation(0, 16 * MIB)] == [
                    Alloc.ZERO, Alloc.DATA, Alloc.ZERO]
                assert await read(image, 4 * MIB, MIB) == written
                await image.write(0, memoryview(b"q" * 8192), fua=True)
                await image.write_zeroes(4 * MIB, 65536, may_unmap=False)
                await image.flush()
            finally:
                await image.close()

        asyncio.run(go())
    finally:
        proc.terminate()
        proc.wait(10)
    with open(backing, "rb") as f:
        got = f.read()
    assert got[:8192] == b"q" * 8192
    assert got[4 * MIB : 4 * MIB + 65536] == bytes(65536)
    assert got[4 * MIB + 65536 : 5 * MIB] == written[65536:]


def test_our_own_export(serve: Callable[..., ServedImage], workdir: str) -> None:
    data = pattern(9, 2 * MIB)
    backing = make_image(workdir, "own.raw", 16 * MIB, {8 * MIB: data})
    s = serve(backing, direct=False)

    async def go() -> None:
        image = await open_nbd(s.uri)
        try:
            assert image.can_status and image.can_multi_conn
            assert await read(image, 8 * MIB, 2 * MIB) == data
            await image.write(0, memoryview(b"o" * 65536), fua=True)
            assert image.allocation(0, 65536) == [Extent(0, 65536, Alloc.DATA)]
        finally:
            await image.close()

    asyncio.run(go())
    with open(backing, "rb") as f:
        assert f.read(65536) == b"o" * 65536


def test_a_chain_of_one_nbd_image_reads_holes_locally(sockdir: str) -> None:
    """The chain sees the export's holes: reading one sends no request to the server."""
    sock = os.path.join(sockdir, "s")

    async def go() -> None:
        chain = await Chain.open("nbd", sock, RW)
        try:
            await chain.write(MIB, memoryview(b"c" * 4096))
            image = chain.leaf
            assert isinstance(image, nbd_driver.NbdImage)
            sent = image.requests_sent
            buf = memoryview(bytearray(65536))
            await chain.read(4 * MIB, buf)
            assert bytes(buf) == bytes(65536)
            assert image.requests_sent == sent
            await chain.read(MIB, buf[:4096])
            assert bytes(buf[:4096]) == b"c" * 4096 and image.requests_sent == sent + 1
            assert [s.flags for s in chain.block_status(0, 2 * MIB)] == [3, 0, 3]
        finally:
            await chain.close()

    with nbdkit(["memory", "8M"], sock=sock):
        asyncio.run(go())


# ------------------------------------------------------- VHD over an nbd parent
def snapshot_over(child: str, parent: str) -> None:
    """``vhd-util snapshot -m``: a differencing VHD over the raw image ``parent``."""
    proc = subprocess.run([VHD_UTIL, "snapshot", "-n", child, "-p", parent, "-m"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_vhd_child_over_an_nbd_parent(sockdir: str) -> None:
    """A local VHD snapshot over a remote base: the locator holds ``nbd:URI``; reads fall
    through to the export, holes included, writes stay in the child."""
    sock = os.path.join(sockdir, "s")
    base_data = pattern(11, 2 * MIB)
    base = make_image(sockdir, "base.raw", 8 * MIB, {2 * MIB: base_data})
    child = os.path.join(sockdir, "child.vhd")
    with nbdkit(["-r", "file", base], sock=sock):
        snapshot_over(child, f"nbd:nbd+unix:///?socket={sock}")

        async def go() -> None:
            chain = await Chain.open("vhd", child, RW)
            try:
                assert [i.type_name for i in chain.images] == ["vhd", "nbd"]
                assert chain.size == 8 * MIB
                assert await read(chain, 2 * MIB, 2 * MIB) == base_data
                await chain.write(2 * MIB + 4096, memoryview(b"c" * 4096))
                got = await read(chain, 2 * MIB, 3 * 4096)
                assert got == base_data[:4096] + b"c" * 4096 + base_data[8192:12288]
                # Holes of the base show through the child (NBD base:allocation).
                flags = [(e.offset, e.length, e.flags) for e in chain.block_status(0, 8 * MIB)]
                assert flags[0] == (0, 2 * MIB, 3)
                assert flags[-1] == (4 * MIB, 4 * MIB, 3)
            finally:
                await chain.close()

        asyncio.run(go())
    with open(base, "rb") as f:
        f.seek(2 * MIB)
        assert f.read(len(base_data)) == base_data  # the base is never written


def test_an_export_smaller_than_the_vhd_is_refused(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")
    child = os.path.join(sockdir, "child.vhd")
    with nbdkit(["memory", "8M"], sock=sock):
        snapshot_over(child, f"nbd:{sock}")
    with nbdkit(["memory", "4M"], sock=sock), pytest.raises(ImageFormatError) as info:
        asyncio.run(Chain.open("vhd", child, RW))
    assert info.value.errno == errno.EINVAL
    assert "has 4194304 bytes, fewer than the child's virtual size 8388608" in str(info.value)


# ------------------------------------------------------------ tap-ctl
needs_fio = pytest.mark.skipif(shutil.which("fio") is None,
                               reason="fio is not installed (scripts/setup.sh installs it)")


@needs_fio
@pytest.mark.parametrize("form", ["socket", "tcp", "uri"])
def test_tap_ctl_create_nbd_serves_fio(run_dir: str, sockdir: str, form: str) -> None:
    """``tap-ctl create -a nbd:SOCKET`` (or ``nbd:IP:PORT``, ``nbd:nbd+unix://...``) over
    nbdkit: fio with crc32c verify through the tapdisk's own NBD export; stats name the
    driver."""
    from tests.system.test_tap_ctl import assert_clean, nbd_uri, ok, parse_list

    sock = os.path.join(sockdir, "s")
    port = free_port()
    where = {"socket": sock, "tcp": f"127.0.0.1:{port}",
             "uri": f"nbd+unix:///?socket={sock}"}[form]
    with nbdkit(["memory", "32M"], **({"port": port} if form == "tcp" else {"sock": sock})):
        spec = f"nbd:{where}"
        ok("create", "-a", spec)
        (entry,) = [e for e in parse_list(ok("list")) if e.get("args") == spec]
        pid, minor = entry["pid"], entry["minor"]
        try:
            proc = subprocess.run(
                ["fio", "--output-format=json", "--name=nbd", "--ioengine=nbd",
                 f"--uri={nbd_uri(run_dir, int(pid), int(minor))}", "--bs=4k",
                 "--rw=randrw", "--iodepth=16", "--size=8M", "--verify=crc32c",
                 "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0"],
                capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stderr + proc.stdout
            result = json.loads(proc.stdout[proc.stdout.index("{"):])
            assert all(job["error"] == 0 for job in result["jobs"])
            assert result["jobs"][0]["write"]["io_bytes"] > 0
            stats = json.loads(ok("stats", "-p", pid, "-m", minor))
            assert [(i["name"], i["driver"]["name"], i["driver"]["type"])
                    for i in stats["images"]] == [(where, "nbd", 15)]
            assert stats["errors"] == [0, 0]
        finally:
            ok("destroy", "-p", pid, "-m", minor)
    assert_clean(run_dir)



# ------------------------------------------------------------------ TLS
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: str, name: str) -> tuple[str, str]:
    """A CA (key, certificate) in ``directory``."""
    key, cert = os.path.join(directory, f"{name}-key.pem"), os.path.join(directory,
                                                                         f"{name}-cert.pem")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN={name}")
    return key, cert


def issue(directory: str, ca: tuple[str, str], name: str, cn: str, usage: str) -> None:
    """``name-key.pem`` and ``name-cert.pem`` in ``directory``, signed by ``ca``."""
    key, cert = os.path.join(directory, f"{name}-key.pem"), os.path.join(directory,
                                                                         f"{name}-cert.pem")
    csr = os.path.join(directory, f"{name}.csr")
    ext = os.path.join(directory, f"{name}.ext")
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={cn}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    os.unlink(csr)
    os.unlink(ext)


@pytest.fixture
def tls_dirs(sockdir: str) -> tuple[str, str, str]:
    """(server dir, client dir, client dir of another CA), laid out as nbdkit and libnbd
    read them: ca-cert.pem, server-/client-cert.pem and -key.pem."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    server, client, stranger = (os.path.join(sockdir, d) for d in ("srv", "cli", "other"))
    for d in (server, client, stranger):
        os.mkdir(d, 0o700)
    ca = make_ca(server, "ca")
    shutil.copy(ca[1], os.path.join(client, "ca-cert.pem"))
    issue(server, ca, "server", "localhost", "serverAuth")
    issue(client, ca, "client", "blktap-client", "clientAuth")
    other = make_ca(stranger, "ca")
    issue(stranger, other, "client", "blktap-client", "clientAuth")
    os.unlink(other[0])
    return server, client, stranger


def test_tls_x509(tls_dirs: tuple[str, str, str]) -> None:
    """nbds:// with tls-certificates=DIR against nbdkit --tls=require --tls-verify-peer;
    a client whose certificates another CA issued, or one without TLS, is refused."""
    server_dir, client_dir, stranger_dir = tls_dirs
    port = free_port()

    async def go(uri: str) -> None:
        image = await open_nbd(uri)
        try:
            await image.write(0, memoryview(b"tls!" * 128), fua=True)
            assert await read(image, 0, 512) == b"tls!" * 128
        finally:
            await image.close()

    with nbdkit(["--tls=require", f"--tls-certificates={server_dir}", "--tls-verify-peer",
                 "memory", "4M"], port=port):
        asyncio.run(go(f"nbds://localhost:{port}/?tls-certificates={client_dir}"))
        with pytest.raises(BlktapError) as info:
            asyncio.run(go(f"nbds://localhost:{port}/?tls-certificates={stranger_dir}"))
        assert "nbds://localhost" in str(info.value)
        assert "certificate verification" in str(info.value)
        with pytest.raises(BlktapError) as info:
            asyncio.run(go(f"nbd://localhost:{port}/"))
        assert "server requires TLS" in str(info.value)
        assert info.value.errno == errno.ENOTSUP


def test_tls_psk(sockdir: str) -> None:
    sock = os.path.join(sockdir, "s")
    psk = os.path.join(sockdir, "keys.psk")
    with open(psk, "w") as f:
        f.write("alice:" + os.urandom(32).hex() + "\n")
    os.chmod(psk, 0o600)

    async def go(uri: str) -> bytes:
        image = await open_nbd(uri)
        try:
            await image.write(4096, memoryview(b"p" * 4096))
            return await read(image, 4096, 4096)
        finally:
            await image.close()

    with nbdkit(["--tls=require", f"--tls-psk={psk}", "memory", "4M"], sock=sock):
        assert asyncio.run(go(f"nbds+unix://alice@/?socket={sock}&tls-psk-file={psk}")) == (
            b"p" * 4096)
        with pytest.raises(BlktapError):
            asyncio.run(go(f"nbds+unix://mallory@/?socket={sock}&tls-psk-file={psk}"))


def test_tapdisk_vbd_survives_a_server_restart(run_dir: str, sockdir: str) -> None:
    """A VBD on ``nbd:SOCKET`` keeps serving across a restart of its server: a read sent
    through the tapdisk's export while the server is away is answered once it is back."""
    from tests.system.test_tap_ctl import assert_clean, nbd_uri, ok, parse_list

    nbd: Any = importlib.import_module("nbd")
    sock = os.path.join(sockdir, "s")
    backing = make_image(sockdir, "disk.raw", 8 * MIB, {MIB: b"before" * 100})
    server = Nbdkit(["file", backing], sock=sock)
    server.start()
    try:
        spec = f"nbd:{sock}"
        ok("create", "-a", spec)
        (entry,) = [e for e in parse_list(ok("list")) if e.get("args") == spec]
        pid, minor = entry["pid"], entry["minor"]
        try:
            h = nbd.NBD()
            h.connect_uri(nbd_uri(run_dir, int(pid), int(minor)))
            assert h.pread(600, MIB) == b"before" * 100
            server.stop()
            done: list[bytes] = []
            reader = threading.Thread(target=lambda: done.append(h.pread(600, MIB)))
            reader.start()
            time.sleep(0.5)
            assert not done  # waiting for the server
            server.start()
            reader.join(60)
            assert done == [b"before" * 100]
            h.pwrite(b"after!" * 100, 2 * MIB)
            h.flush()
            h.shutdown()
        finally:
            ok("destroy", "-p", pid, "-m", minor)
    finally:
        server.stop()
    with open(backing, "rb") as f:
        f.seek(2 * MIB)
        assert f.read(600) == b"after!" * 100
    assert_clean(run_dir)


def test_a_server_without_zero_or_holes(sockdir: str) -> None:
    """What the server does not offer is done otherwise: zeros are written; an export
    without holes (nbdkit's noextents filter: all data) is fully allocated."""
    sock = os.path.join(sockdir, "s")

    async def go() -> None:
        image = await open_nbd(sock)
        try:
            assert not image.can_zero and image.fully_allocated
            assert not image.fast_io().zero_is_fast
            await image.write(0, memoryview(b"x" * 65536), fua=True)
            await image.write_zeroes(4096, 8192, may_unmap=True)
            assert await read(image, 0, 16384) == b"x" * 4096 + bytes(8192) + b"x" * 4096
            assert image.allocation(0, MIB) == [Extent(0, MIB, Alloc.DATA)]
        finally:
            await image.close()

    with nbdkit(["--filter=nozero", "--filter=noextents", "memory", "1M", "zeromode=none"],
                sock=sock):
        asyncio.run(go())


@pytest.mark.parametrize(("image", "code", "words"), [
    ("nbd:http://example/x", errno.EINVAL, "unknown NBD URI scheme 'http'"),
    ("nbd:not-a-server", errno.EINVAL, "not a socket path"),
    ("nbd:/nonexistent/nbd.sock", errno.ENOENT, "connect: No such file or directory"),
])
def test_tap_ctl_create_refuses_bad_nbd_images(run_dir: str, image: str, code: int,
                                               words: str) -> None:
    """The C tool's exit code (the errno) and a message naming the cause; nothing is
    left running."""
    from tests.system.test_tap_ctl import assert_clean, tapctl

    proc = tapctl("create", "-a", image)
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr
    assert_clean(run_dir)
