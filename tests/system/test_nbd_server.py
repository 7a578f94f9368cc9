"""The NBD export against hand-written clients on raw sockets: protocol errors, pipelining,
payload ownership, slow readers, stop and pause, the lanes (lone reads and large writes
served by threads), requests served inline, and their statistics.

The server runs in a background thread with its own event loop, serving a VBD opened on an
``aio:`` raw file (tests/nbd_helpers.py). No external tool is needed: the tests against
real clients are in tests/interop/test_nbd_clients.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from blktap.block.driver import OpenOptions
from blktap.frontends.nbd_server import SOCKET_BUFFER
from blktap.util.buffers import aligned
from blktap.vbd import VBD, ImageSpec
from tests.nbd_helpers import (
    MIB,
    SIMPLE_MAGIC,
    RawClient,
    ServedImage,
    make_image,
    random_image,
    request,
)


def test_unknown_command_gets_einval_and_disc_gets_no_reply(
        serve: Callable[..., ServedImage]) -> None:
    s = serve(direct=False)
    c = RawClient(s.socket)
    try:
        c.handshake()
        c.sock.sendall(request(77, 5) + request(0, 6, 0, 8) + request(3, 7))
        replies = {}
        for _ in range(3):
            magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert magic == SIMPLE_MAGIC
            replies[cookie] = error
            if cookie == 6 and not error:
                assert c.recv_exact(8) == bytes(8)
        assert replies == {5: 22, 6: 0, 7: 0}
        # Requests in flight before DISC are answered; DISC itself is not.
        c.sock.sendall(request(0, 8, 0, 4096) + request(2, 9))
        magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
        assert (magic, error, cookie) == (SIMPLE_MAGIC, 0, 8)
        c.recv_exact(4096)
        c.sock.settimeout(5)
        assert c.sock.recv(1) == b""
    finally:
        c.close()


def test_stop_closes_idle_clients_and_removes_socket(workdir: str) -> None:
    s = ServedImage(workdir, make_image(workdir), direct=False)
    try:
        c = RawClient(s.socket)
        c.handshake()
        assert s.run(lambda: s.server.connections) == 1
        c.sock.sendall(request(0, 1, 0, 4096))
        c.recv_exact(16 + 4096)
        [(peer, stats)] = s.run(s.server.connection_statistics).items()
        assert peer.startswith("unix#")
        assert (stats.requests, stats.reads, stats.bytes_read) == (1, 1, 4096)
        s.call(s.server.stop(timeout=5.0))
        assert not os.path.exists(s.socket)
        assert c.closed_by_server()
        c.close()
    finally:
        s.close()


def test_socket_mode_is_0600(serve: Callable[..., ServedImage]) -> None:
    s = serve(direct=False)
    assert os.stat(s.socket).st_mode & 0o777 == 0o600


def test_thousands_of_pipelined_requests_with_a_small_window(
        serve: Callable[..., ServedImage]) -> None:
    s = serve(direct=False, max_inflight=4)
    c = RawClient(s.socket)
    try:
        c.handshake()
        count = 3000
        # Paused, the VBD holds the first requests; the rest wait in the server's backlog
        # and, once resumed, complete without waiting.
        s.call(s.vbd.pause())
        c.sock.sendall(b"".join(request(0, i, (i % 100) * 512, 512) for i in range(count)))
        time.sleep(0.3)
        assert s.run(lambda: s.vbd.inflight) == 0  # waiting for the resume, not admitted
        s.call(s.vbd.resume())
        seen = set()
        for _ in range(count):
            magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert (magic, error) == (SIMPLE_MAGIC, 0)
            c.recv_exact(512)
            seen.add(cookie)
        assert seen == set(range(count))
    finally:
        c.close()
    assert s.run(s.server.statistics).reads == count


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_writes_that_wait_keep_their_own_data(
        serve: Callable[..., ServedImage], direct: bool) -> None:
    """WRITE payloads are lent from the receive buffer (no copy) only while they are
    written at once; writes that wait (a paused VBD, AIO, a full window) must keep their
    own copy while the receive buffer fills with the next requests."""
    s = serve(direct=direct, max_inflight=150)
    c = RawClient(s.socket)

    def writes(first: int, n: int) -> bytes:
        return b"".join(request(1, i, i * 512, 512) + bytes([i % 251]) * 512
                        for i in range(first, first + n))

    try:
        c.handshake()
        s.call(s.vbd.pause())
        # Each send is read into the start of the receive buffer, over the one before:
        # 100 writes wait in the VBD, 50 more, then the window is full (backlog).
        for first in (0, 100, 200):
            c.sock.sendall(writes(first, 100))
            time.sleep(0.2)
        s.call(s.vbd.resume())
        seen = set()
        for _ in range(300):
            magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert (magic, error) == (SIMPLE_MAGIC, 0)
            seen.add(cookie)
        assert seen == set(range(300))
        # Running: writes go at once (buffered) or to AIO while the next ones arrive.
        for first in range(300, 2300, 200):
            c.sock.sendall(writes(first, 200))
        for _ in range(2000):
            assert struct.unpack(">IIQ", c.recv_exact(16))[:2] == (SIMPLE_MAGIC, 0)
    finally:
        c.close()
    s.call(s.vbd.flush())
    with open(s.image, "rb") as f:
        data = f.read(2300 * 512)
    for i in range(2300):
        assert data[i * 512 : (i + 1) * 512] == bytes([i % 251]) * 512, f"block {i}"


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_large_reads_to_a_slow_reader_are_not_corrupted(
        workdir: str, serve: Callable[..., ServedImage], direct: bool) -> None:
    """Replies larger than the socket takes at once: the server writes what fits itself
    and leaves the rest to the transport, in order, buffers kept until sent."""
    mib = 1 << 20
    image = make_image(workdir, data={i * mib: bytes([i + 1]) * mib for i in range(48)})
    s = serve(image, direct=direct)
    c = RawClient(s.socket)
    try:
        c.handshake()
        order = [(i * 7) % 48 for i in range(48)] * 3
        c.sock.sendall(b"".join(request(0, n, blk * mib, mib) for n, blk in enumerate(order)))
        time.sleep(0.5)  # let the server fill its socket and transport buffers
        for _ in order:
            magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert (magic, error) == (SIMPLE_MAGIC, 0)
            data = c.recv_exact(mib)
            expected = order[cookie] + 1
            assert data.count(expected) == mib, f"reply {cookie} corrupted"
            time.sleep(0.005)
    finally:
        c.close()


def test_stop_with_a_request_stuck_in_a_paused_vbd(
        serve: Callable[..., ServedImage], caplog: pytest.LogCaptureFixture) -> None:
    s = serve(direct=False)
    c = RawClient(s.socket)
    try:
        c.handshake()
        s.call(s.vbd.pause())
        c.sock.sendall(request(0, 1, 0, 4096))
        time.sleep(0.2)
        # Stop gives the stuck request 0.5 s, then closes anyway (the call would give up
        # after 10 s if it waited for the resume).
        s.call(s.server.stop(timeout=0.5), timeout=10)
        assert c.closed_by_server()
        # The request completes later, into a closed connection: dropped quietly.
        s.call(s.vbd.resume())
        time.sleep(0.2)
    finally:
        c.close()
    assert not [r for r in caplog.records
                if r.name.startswith("blktap.frontends") and r.levelname == "ERROR"]


# ------------------------------------------------------------------------- lanes
def lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nbd-lane"]


def read_reply(c: RawClient, length: int) -> tuple[int, int, bytes]:
    """(error, cookie, data) of a simple READ reply (no data after an error)."""
    magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
    assert magic == SIMPLE_MAGIC
    return error, cookie, c.recv_exact(length) if not error else b""


def lone_reads(c: RawClient, image: bytes, reads: list[tuple[int, int]], first: int = 0) -> None:
    """Each READ sent alone, its reply awaited and checked against ``image``."""
    for n, (offset, length) in enumerate(reads, first):
        c.sock.sendall(request(0, n, offset, length))
        assert read_reply(c, length) == (0, n, image[offset : offset + length]), (offset, length)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_lone_reads_go_to_a_lane_and_anything_else_comes_back(
        workdir: str, serve: Callable[..., ServedImage], direct: bool) -> None:
    """A client sending one READ at a time gets them served by the connection's lane
    (nbd_lane); a write, two requests at once, a read the lane declines (too large,
    unaligned, past the end) or a disconnect are served by the loop as before, and the
    statistics count every read once."""
    path, image = random_image(workdir)
    s = serve(path, direct=direct)
    c = RawClient(s.socket)
    sizes = [4096, 512, 65536, 4096, 262144, 8192, 1024, 131072]
    reads = [((i * 7919 * 4096) % (len(image) - 262144), sizes[i % len(sizes)])
             for i in range(200)]
    try:
        c.handshake()
        lone_reads(c, image, reads)
        stats = s.run(s.server.statistics)
        assert stats.reads == 200 and stats.requests == 200
        assert stats.bytes_read == sum(n for _o, n in reads)
        assert 200 - stats.lane_reads <= 10, "the lane starts after a few lone reads"
        assert len(lane_threads()) == 1
        vbd_stats = s.run(s.vbd.stats)
        assert vbd_stats["secs"][0] == stats.bytes_read // 512
        assert vbd_stats["images"][0]["hits"][0] == stats.bytes_read // 512  # sectors
        # Two requests at once: handed back, both answered.
        c.sock.sendall(request(0, 1000, 0, 4096) + request(0, 1001, 4096, 4096))
        replies = sorted([read_reply(c, 4096), read_reply(c, 4096)])
        assert replies == [(0, 1000, image[:4096]), (0, 1001, image[4096:8192])]
        # The loop serves a while, then a lane again; a write hands it back.
        lone_reads(c, image, reads[:20], first=2000)
        assert lane_threads()
        c.sock.sendall(request(1, 3000, 8192, 4096) + b"\xab" * 4096)
        assert struct.unpack(">IIQ", c.recv_exact(16)) == (SIMPLE_MAGIC, 0, 3000)
        image = image[:8192] + b"\xab" * 4096 + image[12288:]
        # Reads the lane declines: larger than it takes, unaligned, past the end.
        lone_reads(c, image, reads[:20], first=4000)
        lone_reads(c, image, [(0, 1 << 20), (8000, 5000), (100, 1)], first=5000)
        c.sock.sendall(request(0, 6000, len(image) - 4096, 8192))
        assert read_reply(c, 8192) == (22, 6000, b"")  # EINVAL
        lone_reads(c, image, reads[:20], first=7000)
        stats = s.run(s.server.statistics)
        assert stats.reads == 200 + 2 + 20 + 20 + 3 + 1 + 20 and stats.writes == 1
        assert stats.errors == 1
        c.sock.sendall(request(2, 8000))  # DISC: no reply, the server closes
        assert c.closed_by_server()
    finally:
        c.close()
    deadline = time.monotonic() + 10
    while (lane_threads() or s.run(lambda: s.server.connections)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lane_threads() and s.run(lambda: s.server.connections) == 0


def start_lane(s: ServedImage, c: RawClient, image: bytes) -> None:
    c.handshake()
    lone_reads(c, image, [(i * 4096, 4096) for i in range(12)])
    assert lane_threads() and s.run(s.server.statistics).lane_reads > 0


def test_pause_while_a_lane_waits_holds_its_reads_until_resume(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    path, image = random_image(workdir)
    s = serve(path)
    c = RawClient(s.socket)
    try:
        start_lane(s, c, image)
        s.call(s.vbd.pause())
        c.sock.sendall(request(0, 77, 65536, 4096))
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)  # the read waits for the paused VBD: no reply, no error
        c.sock.settimeout(10)
        s.call(s.vbd.resume())
        assert read_reply(c, 4096) == (0, 77, image[65536:69632])
        lone_reads(c, image, [(i * 8192, 4096) for i in range(20)], first=100)
        assert lane_threads()
        # The resumed image's counts start again: the read that waited and 20 more.
        assert s.run(s.vbd.stats)["images"][0]["hits"][0] == 21 * 4096 // 512
    finally:
        c.close()


def test_vbd_pause_waits_for_a_thread_read_in_progress(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    """The VBD closes its image only once no thread is inside a read of it."""
    path, _image = random_image(workdir)
    s = serve(path)
    reader = s.run(s.vbd.thread_io)
    try:
        reader.busy = True  # as a lane thread inside ThreadIO.read
        pause = asyncio.run_coroutine_threadsafe(s.vbd.pause(), s.loop)
        time.sleep(0.3)
        assert not pause.done() and s.vbd.chain is not None
        reader.reads = 5  # what the thread counted before it left
        reader.busy = False
        pause.result(5)
        assert s.vbd.chain is None
        assert s.run(s.vbd.stats)["secs"][0] == 0
        assert not reader.read(0, memoryview(bytearray(4096)))  # paused: declined
        s.call(s.vbd.resume())
        buf = aligned(4096)  # O_DIRECT: memory it takes
        assert reader.read(0, buf) and bytes(buf) == _image[:4096]
        assert reader.reads == 1 and s.run(s.vbd.stats)["secs"][0] == 8
    finally:
        s.run(lambda: s.vbd.release_thread_io(reader))
    assert s.run(s.vbd.stats)["secs"][0] == 8


@pytest.mark.parametrize("how", ["stop", "disconnect"])
def test_a_lane_ends_with_its_connection(workdir: str, serve: Callable[..., ServedImage],
                                         how: str) -> None:
    path, image = random_image(workdir)
    s = serve(path)
    c = RawClient(s.socket)
    try:
        start_lane(s, c, image)
        if how == "stop":
            # Nothing is in flight: stop does not wait for its 60 s timeout (the call
            # gives up after 30 s).
            s.call(s.server.stop(timeout=60.0), timeout=30)
            assert c.closed_by_server()
        else:
            c.close()
        deadline = time.monotonic() + 10
        while lane_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not lane_threads()
        assert s.run(lambda: s.server.connections) == 0
        assert s.run(s.server.statistics).lane_reads > 0
    finally:
        c.close()


@pytest.mark.parametrize("stop", [False, True], ids=["read-slowly", "stop-meanwhile"])
def test_lane_replies_to_a_client_that_does_not_read(
        workdir: str, serve: Callable[..., ServedImage], stop: bool) -> None:
    """Lone 256 KiB READs whose replies the client leaves unread fill the socket: the
    lane waits for room, sending every reply whole (the requests that piled up meanwhile
    arrive together: the loop answers them, in any order); stopped meanwhile, it hands
    the rest of its reply to the loop, which sends it before closing."""
    path, image = random_image(workdir)
    s = serve(path)
    c = RawClient(s.socket)
    big = 256 * 1024
    # More than the socket takes (SO_SNDBUF: SOCKET_BUFFER, doubled by the kernel).
    offsets = [((i * 13) % 30) * big for i in range(3 * SOCKET_BUFFER // big)]
    try:
        start_lane(s, c, image)
        for n, offset in enumerate(offsets):
            c.sock.sendall(request(0, n, offset, big))
            time.sleep(0.01)  # each arrives alone
        if not stop:
            seen = set()
            for _ in offsets:
                error, cookie, data = read_reply(c, big)
                assert error == 0 and cookie not in seen
                assert data == image[offsets[cookie] : offsets[cookie] + big], cookie
                seen.add(cookie)
            assert seen == set(range(len(offsets)))
            return
        stopping = asyncio.run_coroutine_threadsafe(s.server.stop(timeout=5.0), s.loop)
        time.sleep(0.3)
        stream = bytearray()
        with contextlib.suppress(ConnectionResetError):  # requests left unread: reset
            while chunk := c.sock.recv(1 << 20):
                stream += chunk
        stopping.result(10)
        # Closed between replies: the one the lane was sending was finished.
        size = 16 + big
        assert len(stream) % size == 0 and len(stream) >= 2 * size, len(stream)
        seen = set()
        for n in range(len(stream) // size):
            reply = stream[n * size : (n + 1) * size]
            magic, error, cookie = struct.unpack(">IIQ", reply[:16])
            assert (magic, error) == (SIMPLE_MAGIC, 0) and cookie not in seen
            assert reply[16:] == image[offsets[cookie] : offsets[cookie] + big], cookie
            seen.add(cookie)
    finally:
        c.close()


def write_reply(c: RawClient) -> tuple[int, int]:
    """(error, cookie) of a simple reply without data."""
    magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
    assert magic == SIMPLE_MAGIC
    return error, cookie


def big_writes(c: RawClient, image: bytearray, offsets: list[int], first: int = 0,
               length: int = MIB, flags: int = 0) -> None:
    """WRITEs of ``length`` random bytes at ``offsets`` (none overlapping), all sent at
    once by another thread; every reply must be a success. ``image`` follows."""
    payloads = [os.urandom(length) for _ in offsets]
    sender = threading.Thread(target=lambda: c.sock.sendall(b"".join(
        request(1, n, offset, length, flags) + payload
        for n, (offset, payload) in enumerate(zip(offsets, payloads, strict=True), first))))
    sender.start()
    try:
        cookies = sorted(write_reply(c) for _ in offsets)
    finally:
        sender.join(30)
    assert cookies == [(0, n) for n in range(first, first + len(offsets))]
    for offset, payload in zip(offsets, payloads, strict=True):
        image[offset : offset + length] = payload


@contextlib.contextmanager
def random_served(workdir: str, serve: Callable[..., ServedImage], direct: bool = False
                  ) -> Iterator[tuple[str, bytearray, ServedImage, RawClient]]:
    """A 32 MiB image of random bytes served (buffered unless ``direct``), what it holds
    (for the test to follow), and a client connected to it (closed after)."""
    path, data = random_image(workdir, 32 * MIB)
    s = serve(path, direct=direct)
    c = RawClient(s.socket)
    try:
        yield path, bytearray(data), s, c
    finally:
        c.close()


def start_write_lane(s: ServedImage, c: RawClient, image: bytearray) -> None:
    c.handshake()
    big_writes(c, image, [(i * 5 % 16) * MIB for i in range(12)], first=10_000)
    assert len(lane_threads()) == 2 and s.run(s.server.statistics).lane_writes > 0


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_large_writes_go_to_a_write_lane(workdir: str,
                                         serve: Callable[..., ServedImage]) -> None:
    """A client streaming 1 MiB WRITEs (many in flight) gets them written by the
    connection's write lane (two threads: one receives while the other writes); replies,
    data and every statistic as through the loop."""
    with random_served(workdir, serve) as (path, image, s, c):
        c.handshake()
        offsets = [(i * 7 % 32) * MIB for i in range(32)]  # each once: none overlaps
        big_writes(c, image, offsets)
        stats = s.run(s.server.statistics)
        assert stats.writes == stats.requests == 32 and stats.bytes_written == 32 * MIB
        assert 32 - stats.lane_writes <= 12, "the lane starts after a few large writes"
        assert len(lane_threads()) == 2
        vbd_stats = s.run(s.vbd.stats)
        assert vbd_stats["secs"] == [0, 32 * MIB // 512]
        assert vbd_stats["images"][0]["hits"] == [0, 32 * MIB // 512]
        assert file_bytes(path) == image
        # FUA writes are the lane's too.
        before = stats.lane_writes
        big_writes(c, image, offsets[:8], first=100, flags=1)
        assert s.run(s.server.statistics).lane_writes == before + 8
        assert file_bytes(path) == image
    deadline = time.monotonic() + 10
    while lane_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lane_threads()


@pytest.mark.parametrize("case", ["read", "flush", "small-write", "unaligned-write",
                                  "write-past-the-end", "huge-write", "two-at-once", "disc"])
def test_a_write_lane_hands_back_anything_else(workdir: str,
                                               serve: Callable[..., ServedImage],
                                               case: str) -> None:
    """While a write lane runs, anything but a large WRITE the VBD takes comes back to
    the loop, which answers it as before (the lane's writes done first); then large
    WRITEs go on."""
    with random_served(workdir, serve) as (path, image, s, c):
        start_write_lane(s, c, image)
        if case == "read":
            c.sock.sendall(request(0, 1, 3 * MIB - 100, 4096))
            assert read_reply(c, 4096) == (0, 1, bytes(image[3 * MIB - 100 : 3 * MIB + 3996]))
        elif case == "flush":
            c.sock.sendall(request(3, 1))
            assert write_reply(c) == (0, 1)
        elif case == "small-write":
            c.sock.sendall(request(1, 1, 4096, 4096) + b"\x5a" * 4096)
            assert write_reply(c) == (0, 1)
            image[4096:8192] = b"\x5a" * 4096
        elif case == "unaligned-write":  # the thread declines it: the loop writes it
            payload = os.urandom(MIB)
            c.sock.sendall(request(1, 1, 5 * MIB + 100, MIB) + payload)
            assert write_reply(c) == (0, 1)
            image[5 * MIB + 100 : 6 * MIB + 100] = payload
        elif case == "write-past-the-end":
            c.sock.sendall(request(1, 1, 32 * MIB - 4096, MIB) + b"\x01" * MIB)
            assert write_reply(c) == (28, 1)  # ENOSPC (the spec's for writes), nothing written
        elif case == "huge-write":  # more than a lane thread's buffer
            payload = os.urandom(6 * MIB)
            c.sock.sendall(request(1, 1, 16 * MIB, 6 * MIB) + payload)
            assert write_reply(c) == (0, 1)
            image[16 * MIB : 22 * MIB] = payload
        elif case == "two-at-once":  # a large write, then a read of what it wrote
            payload = os.urandom(MIB)
            c.sock.sendall(request(1, 1, 30 * MIB, MIB) + payload
                           + request(1, 2, 0, 512) + b"\x33" * 512)
            assert sorted([write_reply(c), write_reply(c)]) == [(0, 1), (0, 2)]
            image[30 * MIB : 31 * MIB] = payload
            image[:512] = b"\x33" * 512
        else:
            c.sock.sendall(request(2, 1))  # DISC: no reply, the server closes
            assert c.closed_by_server()
            deadline = time.monotonic() + 10
            while lane_threads() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not lane_threads() and file_bytes(path) == image
            return
        big_writes(c, image, [(i * 3 % 16) * MIB for i in range(12)], first=20_000)
        assert file_bytes(path) == image
        stats = s.run(s.server.statistics)
        assert stats.writes == 24 + {"read": 0, "flush": 0, "two-at-once": 2}.get(case, 1)
        assert stats.errors == (case == "write-past-the-end")


def test_thread_io_writes_what_the_loop_would_and_declines_the_rest(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    """ThreadIO.write writes aligned, in-range data of a running, writable, buffered VBD
    and declines, untouched, anything else; STATS count what it wrote once."""
    path, data = random_image(workdir, 4 * MIB)
    s = serve(path, direct=False)
    io = s.run(lambda: s.vbd.thread_io(write=True))
    try:
        payload = memoryview(bytearray(os.urandom(MIB)))
        assert not io.write(100, payload)  # unaligned
        assert not io.write(3 * MIB + 512, payload)  # past the end
        assert not io.write(-512, payload[:512])
        assert file_bytes(path) == data
        assert io.write(MIB, payload, fua=True)
        assert file_bytes(path) == data[:MIB] + bytes(payload) + data[2 * MIB:]
        assert io.writes == 1 and io.sectors == [0, MIB // 512]
        s.call(s.vbd.pause())
        assert not io.write(0, payload)  # paused
        assert s.run(s.vbd.stats)["secs"] == [0, MIB // 512]  # taken at the pause
        s.call(s.vbd.resume())
        assert io.write(0, payload)
        assert s.run(s.vbd.stats)["images"][0]["hits"] == [0, MIB // 512]  # resumed image's
    finally:
        s.run(lambda: s.vbd.release_thread_io(io))
    assert s.run(s.vbd.stats)["secs"] == [0, 2 * MIB // 512]


def test_no_thread_writes_to_a_read_only_vbd(workdir: str) -> None:
    async def check() -> tuple[bool, object]:
        vbd = VBD(1)
        await vbd.open(ImageSpec("aio", make_image(workdir)),
                       OpenOptions(read_only=True, direct=False))
        try:
            return vbd.thread_io_possible(write=True), vbd.thread_io(write=True)
        finally:
            await vbd.close()

    assert asyncio.run(check()) == (False, None)


def test_no_write_lane_for_a_direct_vbd(workdir: str,
                                        serve: Callable[..., ServedImage]) -> None:
    """O_DIRECT writes go through Linux AIO from the loop: no write lane."""
    with random_served(workdir, serve, direct=True) as (path, image, s, c):
        c.handshake()
        big_writes(c, image, [(i * 7 % 32) * MIB for i in range(32)])
        assert s.run(s.server.statistics).lane_writes == 0 and not lane_threads()
        assert file_bytes(path) == image


def test_pause_while_a_write_lane_runs_holds_its_writes_until_resume(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    """A write the lane receives while the VBD is paused comes back to the loop, where
    it waits for the resume: no reply, no error, nothing lost."""
    with random_served(workdir, serve) as (path, image, s, c):
        start_write_lane(s, c, image)
        s.call(s.vbd.pause())
        payload = os.urandom(MIB)
        c.sock.sendall(request(1, 77, 20 * MIB, MIB) + payload)
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
        c.sock.settimeout(10)
        s.call(s.vbd.resume())
        assert write_reply(c) == (0, 77)
        image[20 * MIB : 21 * MIB] = payload
        big_writes(c, image, [(i * 3 % 16) * MIB for i in range(12)], first=100)
        assert file_bytes(path) == image
        stats = s.run(s.server.statistics)
        assert stats.writes == 12 + 1 + 12
        # The resumed image counts the write that waited and those after it.
        assert s.run(s.vbd.stats)["images"][0]["hits"][1] == 13 * MIB // 512


@pytest.mark.parametrize("how", ["stop", "stop-mid-payload", "disconnect"])
def test_a_write_lane_ends_with_its_connection(workdir: str,
                                               serve: Callable[..., ServedImage],
                                               how: str) -> None:
    with random_served(workdir, serve) as (path, image, s, c):
        start_write_lane(s, c, image)
        if how == "disconnect":
            c.close()
        else:
            if how == "stop-mid-payload":  # the lane hands back half a request
                c.sock.sendall(request(1, 5, 0, MIB) + b"\x44" * (MIB // 2))
                time.sleep(0.2)
            # Nothing is in flight: stop does not wait for its 60 s timeout (the call
            # gives up after 30 s).
            s.call(s.server.stop(timeout=60.0), timeout=30)
            assert c.closed_by_server()
        deadline = time.monotonic() + 10
        while lane_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not lane_threads()
        assert s.run(lambda: s.server.connections) == 0
        assert file_bytes(path) == image  # the half-received write was not written


@pytest.mark.parametrize("threads", [0, 1], ids=["no-thread", "one-thread"])
def test_a_write_lane_without_all_its_threads_leaves_the_loop_serving(
        workdir: str, serve: Callable[..., ServedImage], threads: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of threads: a lane that cannot start is not used, one that started only some
    of its threads returns at once; either way the loop answers every request."""
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def start(thread: threading.Thread) -> None:
        if thread.name == "nbd-lane":
            if len(started) >= threads:
                raise RuntimeError("can't start new thread")
            started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with random_served(workdir, serve) as (path, image, s, c):
        c.handshake()
        big_writes(c, image, [(i * 7 % 32) * MIB for i in range(32)])
        assert file_bytes(path) == image
        stats = s.run(s.server.statistics)
        assert stats.writes == 32
        if not threads:  # (one that started may serve a few before it sees the stop)
            assert stats.lane_writes == 0
        assert len(started) == threads and not any(t.is_alive() for t in started)


# ---------------------------------------------------- requests served inline
def test_a_batch_served_inline_is_answered_in_order_and_counted(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    """Small READs and WRITEs arriving many at a time on a buffered raw image are served
    by the connection itself (VBD.sync_file: one preadv/pwritev each): every reply, the
    order within the batch (a READ after a WRITE of the same block sees it), FUA, what
    the inline path leaves to the general one (unaligned, zero-length, past the end),
    and every statistic."""
    with random_served(workdir, serve) as (path, image, s, c):
        assert s.run(s.vbd.sync_file) is not None
        c.handshake()
        batch: list[bytes] = []
        expected: dict[int, tuple[int, bytes | None]] = {}  # cookie: (error, READ data)
        reads = writes = read_bytes = written = 0
        for n in range(200):
            offset = (n * 7919 % 8192) * 4096
            length = 4096 * (1 + n % 3)
            if n % 4 == 1:  # the block the previous request read: write it, FUA or not
                offset = ((n - 1) * 7919 % 8192) * 4096
                payload = os.urandom(length)
                batch.append(request(1, n, offset, length, flags=n % 8 // 4) + payload)
                image[offset : offset + length] = payload
                expected[n] = (0, None)
                writes += 1
                written += length
            else:
                if n % 4 == 2:  # what the previous request wrote
                    offset, length = ((n - 2) * 7919 % 8192) * 4096, 4096
                batch.append(request(0, n, offset, length))
                expected[n] = (0, bytes(image[offset : offset + length]))
                reads += 1
                read_bytes += length
        # For the general path: unaligned, empty, past the end (EINVAL, ENOSPC).
        batch.append(request(0, 200, 1000, 3000))
        expected[200] = (0, bytes(image[1000:4000]))
        batch.append(request(1, 201, 777, 10) + b"\x33" * 10)
        image[777:787] = b"\x33" * 10
        expected[201] = (0, None)
        batch.append(request(0, 202, 5 * 4096, 0))
        expected[202] = (0, b"")
        batch.append(request(0, 203, 32 * MIB - 4096, 8192))
        expected[203] = (22, None)
        batch.append(request(1, 204, 32 * MIB, 4096) + b"\x01" * 4096)
        expected[204] = (28, None)
        batch.append(request(0, 205, 0, 8192))
        expected[205] = (0, bytes(image[:8192]))
        # Refused by the codec itself (EINVAL), between requests served inline.
        batch.append(request(0, 230, 0, 4096, flags=0x8000))
        expected[230] = (22, None)
        batch.append(request(99, 231, 0, 4096))
        expected[231] = (22, None)
        # More READ data than one batch keeps before it hands replies to the transport.
        for n in range(206, 230):
            offset = (n % 16) * 2 * MIB
            batch.append(request(0, n, offset, 128 * 1024))
            expected[n] = (0, bytes(image[offset : offset + 128 * 1024]))
            reads += 1
            read_bytes += 128 * 1024
        c.sock.sendall(b"".join(batch))
        for _ in range(len(expected)):
            magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert magic == SIMPLE_MAGIC
            want_error, want_data = expected.pop(cookie)
            assert error == want_error, cookie
            if want_data is not None and not error:
                assert c.recv_exact(len(want_data)) == want_data, cookie
        assert not expected
        stats = s.run(s.server.statistics)
        assert (stats.requests, stats.reads, stats.writes) == (230, reads + 4, writes + 2)
        assert stats.errors == 2  # past the end (the codec's refusals are not counted)
        assert stats.bytes_read == read_bytes + 3000 + 8192
        assert stats.bytes_written == written + 10
        vbd_stats = s.run(s.vbd.stats)
        # Image hits are sectors; the unaligned requests reach the image as whole sectors.
        assert vbd_stats["images"][0]["hits"][0] >= (read_bytes + 8192) // 512
        assert vbd_stats["images"][0]["hits"][1] >= written // 512
        assert vbd_stats["secs"][0] >= (read_bytes + 8192) // 512
        assert vbd_stats["errors"] == [0, 0]
    assert file_bytes(path) == image


def test_inline_reads_that_fall_short_are_answered_by_the_general_path(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    """The file shrinks under the VBD: a READ past its new end is short inline, goes the
    general way and gets EIO (counted once); the READs around it are served."""
    with random_served(workdir, serve) as (path, image, s, c):
        c.handshake()
        os.truncate(path, 16 * MIB)
        c.sock.sendall(request(0, 1, 0, 4096) + request(0, 2, 20 * MIB, 4096)
                       + request(0, 3, 16 * MIB - 4096, 4096))
        replies = {}
        for _ in range(3):
            error, cookie, data = read_reply(c, 4096)
            replies[cookie] = (error, data)
        assert replies == {1: (0, bytes(image[:4096])), 2: (5, b""),
                           3: (0, bytes(image[16 * MIB - 4096 : 16 * MIB]))}
        vbd_stats = s.run(s.vbd.stats)
        assert vbd_stats["errors"] == [1, 0]
        assert vbd_stats["images"][0]["fail"] == [8, 0]  # sectors, as the C tapdisk
        assert vbd_stats["images"][0]["hits"][0] == 3 * 8
        stats = s.run(s.server.statistics)
        assert (stats.reads, stats.bytes_read) == (3, 8192)


def test_inline_writes_that_fail_are_answered_by_the_general_path(workdir: str) -> None:
    """A sparse image on a full filesystem (a 1 MiB tmpfs): WRITEs into holes fail with
    ENOSPC inline, go the general way, fail again there and are answered with ENOSPC and
    counted; every other request of the batch is served, and the client stays on."""
    with small_tmpfs(os.path.join(workdir, "small"), "1m") as mount, \
            contextlib.ExitStack() as closing:
        path = make_image(mount, size=16 * MIB, data={0: b"\xab" * 4096})
        s = ServedImage(workdir, path, direct=False)
        closing.callback(s.close)  # before the unmount, even if what follows fails
        c = RawClient(s.socket)
        closing.callback(c.close)
        c.handshake()
        payload = b"\xcd" * 4096
        c.sock.sendall(b"".join(request(1, n, n * 4096 * 4, 4096) + payload
                                for n in range(1, 400))
                       + request(0, 400, 0, 4096))
        errors = {}
        for _ in range(399):
            error, cookie = write_reply(c)
            errors[cookie] = error
        assert read_reply(c, 4096) == (0, 400, b"\xab" * 4096)
        failed = [n for n, error in errors.items() if error]
        assert failed and set(errors.values()) == {0, 28}  # ENOSPC
        with open(path, "rb") as f:
            for n, error in errors.items():
                f.seek(n * 4096 * 4)
                assert f.read(4096) == (bytes(4096) if error else payload), n
        vbd_stats = s.run(s.vbd.stats)
        assert vbd_stats["errors"] == [0, len(failed)]
        assert vbd_stats["images"][0]["fail"] == [0, len(failed) * 8]  # sectors
        assert s.run(s.server.statistics).writes == 399
        # Still served: a write over data already there takes no space.
        c.sock.sendall(request(1, 401, 0, 4096) + payload + request(0, 402, 0, 4096))
        assert write_reply(c) == (0, 401)
        assert read_reply(c, 4096) == (0, 402, payload)


@contextlib.contextmanager
def small_tmpfs(mount: str, size: str) -> Iterator[str]:
    """A tmpfs of ``size`` mounted at ``mount`` (made). Unmounted after; if the body
    failed, lazily and quietly, so that the body's error is the one reported."""
    os.mkdir(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
    try:
        yield mount
    except BaseException:
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
        raise
    subprocess.run(["umount", mount], check=True, timeout=30)  # busy: something still holds it
