"""blktap.prefork: the switch, request framing with descriptors, the uid check."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from blktap import prefork


@pytest.mark.parametrize(("value", "expected"), [
    (None, prefork.DEFAULT_IDLE), ("", prefork.DEFAULT_IDLE), ("off", None), ("OFF", None),
    ("no", None), ("0", None), ("-3", None), ("2.5", 2.5), ("junk", prefork.DEFAULT_IDLE),
])
def test_idle_seconds(value: str | None, expected: float | None) -> None:
    env = {} if value is None else {prefork.ENV: value}
    assert prefork.idle_seconds(env) == expected


def test_a_request_carries_its_fields_and_descriptors() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    got: list[int] = []
    try:
        fields = [b"magic", b"22", b"/some where", *prefork.environment_fields({"A": "1=2"})]
        prefork.send(left, fields, [write_end, 0])
        received, got = prefork.receive(right, 4)
        assert received == fields
        assert prefork.parse_environment(received[3:]) == {b"A": b"1=2"}
        assert len(got) == 2 and write_end not in got  # new descriptors, same files
        os.write(got[0], b"through the passed descriptor")
        assert os.read(read_end, 100) == b"through the passed descriptor"
        assert os.path.samestat(os.fstat(got[1]), os.fstat(0))
    finally:
        for fd in (read_end, write_end, *got):
            os.close(fd)
        left.close()
        right.close()


def test_the_peer_uid_is_checked() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        assert prefork.peer_uid(left) == os.geteuid()
    assert prefork.connect(b"\0blktap-prefork-test-nobody-listens") is None


def test_installation_names_the_interpreter_directory() -> None:
    blktap, where = prefork.installation()
    assert blktap.endswith(b"blktap/__init__.py")
    assert where == os.fsencode(os.path.realpath(os.path.dirname(sys.executable)))
