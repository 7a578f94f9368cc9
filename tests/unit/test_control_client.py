"""The control client's framing, timeouts and error mapping, against an in-test server.

The server here is a thread on a real Unix socket that answers with hand-built bytes (or
not at all). Everything that needs a working tapdisk is in tests/system.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blktap.control import client
from blktap.control.errors import NoSuchTapdisk, TapdiskError, TimedOut
from blktap.control.options import OpenOptions
from blktap.control.rundir import RunDir
from blktap.errors import InvalidArgument, ProtocolError
from blktap.proto import control as ctl
from tests.helpers import message, short_tempdir

FAKE_PID = 4000000  # above pid_max's default: no real process has it

Handler = Callable[[socket.socket, bytes], None]


class FakeTapdisk:
    """Accepts connections on ctl<FAKE_PID>; ``handler(conn, request_bytes)`` answers."""

    def __init__(self, path: Path, handler: Handler, request_size: int = 544) -> None:
        self.requests: list[bytes] = []
        self._handler = handler
        self._size = request_size
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(path))
        except OSError:
            self._sock.close()
            raise
        self._sock.listen(8)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while len(data) < self._size:
                    chunk = conn.recv(self._size - len(data))
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                self._handler(conn, data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._path.unlink(missing_ok=True)


@pytest.fixture
def rundir() -> Iterator[RunDir]:
    with short_tempdir() as path:
        rd = RunDir(Path(path), Path(path) / "dev")
        rd.ensure()
        yield rd


@contextmanager
def fake(rundir: RunDir, handler: Handler, request_size: int = 544) -> Iterator[FakeTapdisk]:
    server = FakeTapdisk(rundir.ctl_socket(FAKE_PID), handler, request_size)
    try:
        yield server
    finally:
        server.close()


def reply_with(data: bytes, *, chunk: int | None = None) -> Handler:
    def handler(conn: socket.socket, request: bytes) -> None:
        if chunk is None:
            conn.sendall(data)
            return
        for i in range(0, len(data), chunk):
            conn.sendall(data[i : i + chunk])
            time.sleep(0.0005)

    return handler


def silent(delay: float) -> Handler:
    """Answer nothing; return when the client hangs up (or after ``delay``)."""

    def handler(conn: socket.socket, request: bytes) -> None:
        conn.settimeout(delay)
        with contextlib.suppress(OSError):
            conn.recv(1)

    return handler


def test_pid_request_bytes_and_reply(rundir: RunDir) -> None:
    with fake(rundir, reply_with(message(4, 0xFFFF, struct.pack("<i", 1234)))) as server:
        assert client.get_pid(rundir, FAKE_PID) == 1234
    assert server.requests == [message(3, 0xFFFF)]


def test_attach_sends_minor_as_cookie(rundir: RunDir) -> None:
    with fake(rundir, reply_with(message(6, 17))) as server:
        client.attach(rundir, FAKE_PID, 17)
    assert server.requests == [message(5, 17)]


def test_open_request_bytes(rundir: RunDir) -> None:
    options = OpenOptions(read_only=True, no_o_direct=True, request_timeout_s=9)
    with fake(rundir, reply_with(message(8, 2, struct.pack("<QII", 2048, 512, 0)))) as server:
        info = client.open(rundir, FAKE_PID, 2, "aio:/srv/a.img", options)
    assert (info.sectors, info.sector_size, info.size) == (2048, 512, 2048 * 512)
    union = bytearray(536)
    struct.pack_into("<III", union, 0, 0x202, 2, 0)
    union[12 : 12 + 14] = b"aio:/srv/a.img"
    struct.pack_into("<IH", union, 268, 0xFFFFFFFF, 9)
    assert server.requests == [message(7, 2, bytes(union))]


def test_open_with_log_and_key_sends_extras(rundir: RunDir) -> None:
    options = OpenOptions(log_path="/tmp/l", key=b"k" * 32, parent_minor=4)
    size = 544 + 256 + 1 + 32
    reply = message(8, 2, struct.pack("<QII", 8, 512, 0))
    with fake(rundir, reply_with(reply), request_size=size) as server:
        client.open(rundir, FAKE_PID, 2, "vhd:/e.vhd", options)
    (raw,) = server.requests
    flags, devnum = struct.unpack_from("<II", raw, 8)
    assert flags == 0x10 | 0x40 | 0x400 and devnum == 2
    assert struct.unpack_from("<I", raw, 8 + 268)[0] == 4
    assert raw[544:800] == b"/tmp/l".ljust(256, b"\0")
    assert raw[800] == 32 and raw[801:] == b"k" * 32


def test_error_reply_becomes_exception_with_errno(rundir: RunDir) -> None:
    with fake(rundir, reply_with(message(1, 3, struct.pack("<i", errno.ENOENT)))), \
            pytest.raises(TapdiskError, match="No such file") as info:
        client.open(rundir, FAKE_PID, 3, "aio:/missing")
    assert info.value.errno == errno.ENOENT
    assert (info.value.pid, info.value.minor, info.value.request) == (FAKE_PID, 3, "OPEN")


def test_error_reply_reason_is_shown(rundir: RunDir) -> None:
    # Our tapdisk puts the reason in response.message (the C tapdisk leaves it zero).
    union = struct.pack("<i", errno.EOPNOTSUPP) + b"open: not supported yet: encryption\0"
    with fake(rundir, reply_with(message(1, 3, union))), \
            pytest.raises(TapdiskError) as info:
        client.open(rundir, FAKE_PID, 3, "aio:/x")
    assert info.value.errno == errno.EOPNOTSUPP
    assert info.value.message.endswith("OPEN minor 3 failed: open: not supported yet: encryption")


def test_list_stream_in_small_pieces(rundir: RunDir) -> None:
    stream = (
        message(20, 0xFFFF, struct.pack("<iii", 2, 5, 0x2A) + b"vhd:/b.vhd")
        + message(20, 0xFFFF, struct.pack("<iii", 1, 1, 0) + b"aio:/a")
        + message(20, 0xFFFF, struct.pack("<iii", 0, -1, 0))
    )
    with fake(rundir, reply_with(stream, chunk=100)):
        vbds = client.list_vbds(rundir, FAKE_PID)
    assert vbds == [
        client.VbdListing(1, 0, "aio:/a"),
        client.VbdListing(5, 0x2A, "vhd:/b.vhd"),
    ]


def test_stats_body(rundir: RunDir) -> None:
    body = b'{"name": "aio:/a", "secs": [1, 2]}'
    head = message(22, 1, struct.pack("<HH4xQ", 22, 1, len(body)))
    with fake(rundir, reply_with(head + body, chunk=7)):
        assert client.stats(rundir, FAKE_PID, 1) == {"name": "aio:/a", "secs": [1, 2]}
    with fake(rundir, reply_with(head + body)):
        assert client.stats_text(rundir, FAKE_PID, 1) == body.decode()


def test_stats_not_json(rundir: RunDir) -> None:
    with fake(rundir, reply_with(message(22, 1, struct.pack("<HH4xQ", 22, 1, 3)) + b"{{{")), \
            pytest.raises(ProtocolError, match="not JSON") as info:
        client.stats(rundir, FAKE_PID, 1)
    assert info.value.errno == errno.EPROTO


def test_close_timeout_gives_etimedout(rundir: RunDir) -> None:
    # The server stays silent for 30 s: only the client's own 0.3 s timeout can raise
    # TimedOut (after 30 s the server hangs up, which is not a timeout).
    with fake(rundir, silent(30)), \
            pytest.raises(TimedOut, match="CLOSE minor 0") as info:
        client.close(rundir, FAKE_PID, 0, timeout=0.3)
    assert info.value.errno == errno.ETIMEDOUT


def test_pause_timeout_gives_etimedout(rundir: RunDir) -> None:
    with fake(rundir, silent(3)), pytest.raises(TimedOut):
        client.pause(rundir, FAKE_PID, 0, timeout=0.2)


def test_list_has_its_own_timeout(rundir: RunDir) -> None:
    with fake(rundir, silent(3)), pytest.raises(TimedOut):
        client.list_vbds(rundir, FAKE_PID, timeout=0.2)
    assert client.LIST_TIMEOUT == 10.0 and client.STATS_TIMEOUT == 10.0


def test_force_close_sends_force_shutdown(rundir: RunDir) -> None:
    with fake(rundir, reply_with(message(14, 6))) as server:
        client.close(rundir, FAKE_PID, 6, force=True)
    assert server.requests == [message(23, 6)]


def test_closed_without_reply_is_protocol_error(rundir: RunDir) -> None:
    with fake(rundir, reply_with(b"")), pytest.raises(ProtocolError, match="closed") as info:
        client.detach(rundir, FAKE_PID, 1)
    assert info.value.errno == errno.EPROTO


def test_half_reply_is_protocol_error(rundir: RunDir) -> None:
    with fake(rundir, reply_with(message(16, 1)[:300])), pytest.raises(ProtocolError):
        client.detach(rundir, FAKE_PID, 1)


def test_wrong_reply_type_is_protocol_error(rundir: RunDir) -> None:
    with fake(rundir, reply_with(message(8, 1))), pytest.raises(ProtocolError, match="OPEN_RSP"):
        client.detach(rundir, FAKE_PID, 1)


def test_unknown_pid(rundir: RunDir) -> None:
    with pytest.raises(NoSuchTapdisk, match="no control socket") as info:
        client.get_pid(rundir, FAKE_PID)
    assert info.value.errno == errno.ENOENT


def test_stale_socket_is_unknown_pid(rundir: RunDir) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(rundir.ctl_socket(FAKE_PID)))
    sock.close()  # bound, never listening: connect is refused
    with pytest.raises(NoSuchTapdisk, match="stale") as info:
        client.attach(rundir, FAKE_PID, 0)
    assert info.value.errno == errno.ENOENT


def test_unpause_request_bytes(rundir: RunDir) -> None:
    with fake(rundir, reply_with(message(12, 3)), request_size=544 + 256) as server:
        client.unpause(rundir, FAKE_PID, 3, image="vhd:/new.vhd", log_path="/tmp/cbt")
    (raw,) = server.requests
    assert struct.unpack_from("<HH", raw) == (11, 3)
    assert struct.unpack_from("<I", raw, 8)[0] == 0x10
    assert raw[8 + 12 : 8 + 12 + 13] == b"vhd:/new.vhd\0"
    assert raw[544:] == b"/tmp/cbt".ljust(256, b"\0")


def test_bad_arguments_fail_before_connecting(rundir: RunDir) -> None:
    with pytest.raises(InvalidArgument):
        client.attach(rundir, FAKE_PID, 16384)
    with pytest.raises(InvalidArgument):
        client.open(rundir, FAKE_PID, 0, "aio:/" + "x" * 300)
    with pytest.raises(InvalidArgument):
        client.open(rundir, FAKE_PID, 0, "aio:/a", OpenOptions(key=b"k" * 200))


def test_salvage_reply_after_a_failed_send() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(message(1, 2, struct.pack("<i", errno.EINVAL)))
        b.close()
        reader = ctl.ReplyReader(ctl.MessageType.OPEN)
        reply = client._salvage_reply(a, reader)
    assert reply is not None and reply.errno == errno.EINVAL
    c, d = socket.socketpair()
    with c, d:
        d.close()
        assert client._salvage_reply(c, ctl.ReplyReader(ctl.MessageType.OPEN)) is None
