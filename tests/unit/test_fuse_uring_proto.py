"""blktap.proto.fuse_uring: the ring entry layouts (include/uapi/linux/fuse.h, 7.42)."""

from __future__ import annotations

import struct

import pytest

from blktap.errors import ProtocolError
from blktap.proto import fuse, fuse_uring


def filled_entry(opcode: int, unique: int, nodeid: int, op_in: bytes, payload_sz: int) -> bytearray:
    """A header buffer as the kernel fills it for a request."""
    header = bytearray(512)
    length = fuse.IN_HEADER.size + len(op_in) + payload_sz
    fuse.IN_HEADER.pack_into(header, 0, length, opcode, unique, nodeid, 0, 0, 1234, 0, 0)
    header[fuse_uring.OP_OFFSET:fuse_uring.OP_OFFSET + len(op_in)] = op_in
    fuse_uring.ENT_IN_OUT.pack_into(header, fuse_uring.ENT_OFFSET, 0, unique, payload_sz, 0, 0)
    return header


def test_sizes_match_the_kernel_structs() -> None:
    assert fuse_uring.REQ_HEADER_SIZE == 288  # sizeof(struct fuse_uring_req_header)
    assert fuse_uring.ENT_IN_OUT.size == 32
    assert fuse_uring.CMD_REQ.size == 24  # sizeof(struct fuse_uring_cmd_req)
    assert fuse_uring.INIT_OVER_IO_URING == 1 << 41


def test_write_request_decodes_with_its_payload() -> None:
    write_in = fuse.WRITE_IN.pack(7, 4096, 65536, 0, 0, 0, 0)
    header = filled_entry(fuse.Opcode.WRITE, 99, 2, write_in, 65536)
    assert fuse_uring.decode_entry(header) == (
        fuse.IN_HEADER.size + len(write_in) + 65536, fuse.Opcode.WRITE, 99, 2, len(write_in),
        65536)


def test_lookup_has_no_first_argument_and_its_name_in_the_payload() -> None:
    header = filled_entry(fuse.Opcode.LOOKUP, 5, 1, b"", 5)
    *_, op_size, payload_sz = fuse_uring.decode_entry(header)
    assert (op_size, payload_sz) == (0, 5)


@pytest.mark.parametrize("payload_sz", [1 << 20, 300])
def test_inconsistent_lengths_are_a_protocol_error(payload_sz: int) -> None:
    header = filled_entry(fuse.Opcode.READ, 5, 2, fuse.READ_IN.pack(0, 0, 4096, 0), 0)
    struct.pack_into("=I", header, fuse_uring.PAYLOAD_SZ_OFFSET, payload_sz)
    if payload_sz == 300:  # the first argument would be longer than its 128-byte room
        struct.pack_into("=I", header, 0, fuse.IN_HEADER.size + 128 + 1 + payload_sz)
    with pytest.raises(ProtocolError):
        fuse_uring.decode_entry(header)
    with pytest.raises(ProtocolError):
        fuse_uring.decode_entry(bytes(100))


def test_reply_header_and_command_area() -> None:
    header = bytearray(512)
    fuse_uring.encode_reply_header(header, 99, 0, 4096)
    assert fuse.OUT_HEADER.unpack_from(header) == (fuse.OUT_HEADER.size + 4096, 0, 99)
    assert struct.unpack_from("=I", header, fuse_uring.PAYLOAD_SZ_OFFSET) == (4096,)
    fuse_uring.encode_reply_header(header, 100, 5, 0)  # EIO: negated, no payload
    assert fuse.OUT_HEADER.unpack_from(header)[1:] == (-5, 100)
    area = fuse_uring.encode_cmd_req(qid=1, commit_id=99)
    assert len(area) == fuse_uring.CMD_AREA_SIZE and area[24:] == bytes(56)
    assert fuse_uring.CMD_REQ.unpack_from(area) == (0, 99, 1)


def test_payload_size_is_the_kernels_max_payload() -> None:
    assert fuse_uring.payload_size(1 << 20, 256) == 1 << 20
    assert fuse_uring.payload_size(4096, 1) == fuse.MIN_READ_BUFFER
    assert fuse_uring.payload_size(128 << 10, 64) == 256 << 10
