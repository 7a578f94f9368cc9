"""FUSE over io_uring (Linux 6.14 and later), sans-IO: the layouts a server shares with
the kernel.

Layouts follow ``include/uapi/linux/fuse.h`` (protocol 7.42) and ``fs/fuse/dev_uring.c``.
After INIT (answered on ``/dev/fuse`` with FUSE_OVER_IO_URING among its flags), the server
hands the kernel *ring entries*: each is an ``IORING_OP_URING_CMD`` on the ``/dev/fuse``
descriptor, in a ring made with IORING_SETUP_SQE128, carrying a
:data:`CMD_REQ` in the SQE's 80-byte command area and, for REGISTER, two iovecs: a
:data:`REQ_HEADER_SIZE`-byte header buffer and a payload buffer of at least
:func:`payload_size` bytes. The command completes (CQE result 0) when the kernel has
written a request into the entry:

* ``in_out`` (offset 0): the request's ``fuse_in_header``;
* ``op_in`` (offset :data:`OP_OFFSET`): the opcode's first argument (``fuse_read_in``,
  ``fuse_write_in``, ...; nothing for opcodes without one, e.g. LOOKUP);
* ``ring_ent_in_out`` (offset :data:`ENT_OFFSET`): :data:`ENT_IN_OUT` (flags,
  commit_id = the request's unique, payload_sz);
* the payload buffer: the remaining arguments (a WRITE's data, a LOOKUP's name),
  ``payload_sz`` bytes.

The server answers in the same entry: a ``fuse_out_header`` in ``in_out``, the result
(a READ's data, a ``fuse_write_out``, ...) in the payload buffer and its length in
``payload_sz``, then COMMIT_AND_FETCH with the request's unique as ``commit_id`` and the
entry's queue: the kernel takes the reply and puts the next request in the same entry.

Queues are per CPU (``qid`` = the CPU the requesting task runs on; as many as the possible
CPUs), and the kernel switches a connection to the ring only once every queue has an
entry; until then, and afterwards for FORGET and INTERRUPT, requests come through
``/dev/fuse`` as before. A connection that negotiated the flag holds every request until
then: the server must register on every queue (or have a REGISTER fail, which makes the
kernel fall back to ``/dev/fuse``).
"""

from __future__ import annotations

import enum
import struct

from blktap.errors import ProtocolError
from blktap.proto import fuse

INIT_OVER_IO_URING = 1 << 41
"""FUSE_OVER_IO_URING (a flags2 bit, so INIT_EXT must be set): offered at INIT when the
kernel's ``fuse.enable_uring`` parameter is on; in the reply, the server will serve
requests through ring entries."""

MIN_MINOR = 42
"""The protocol minor version that defines the ring's layouts."""


class Cmd(enum.IntEnum):
    """``fuse_uring_cmd``: the SQE's ``cmd_op``."""

    REGISTER = 1
    """Hand the kernel a new entry (header and payload buffers) for queue ``qid``."""
    COMMIT_AND_FETCH = 2
    """The reply to the entry's request is in the entry; put the next request in it."""


HEADER_IN_OUT_SIZE = 128
"""FUSE_URING_IN_OUT_HEADER_SZ: room for fuse_in_header / fuse_out_header."""
OP_IN_OUT_SIZE = 128
"""FUSE_URING_OP_IN_OUT_SZ: room for an opcode's first argument."""
OP_OFFSET = HEADER_IN_OUT_SIZE
ENT_OFFSET = HEADER_IN_OUT_SIZE + OP_IN_OUT_SIZE
ENT_IN_OUT = struct.Struct("=QQIIQ")  # flags commit_id payload_sz padding reserved
PAYLOAD_SZ_OFFSET = ENT_OFFSET + 16
"""Where ``ring_ent_in_out.payload_sz`` is, from the start of the header buffer."""
REQ_HEADER_SIZE = ENT_OFFSET + ENT_IN_OUT.size
"""sizeof(struct fuse_uring_req_header): the least a header buffer may be (288)."""

CMD_REQ = struct.Struct("=QQH6x")  # flags commit_id qid padding
CMD_AREA_SIZE = 80
"""The command area of a 128-byte SQE; the bytes past CMD_REQ must be zero."""

_PAYLOAD_SZ = struct.Struct("=I")


def payload_size(max_write: int, max_pages: int, page_size: int = 4096) -> int:
    """The least payload buffer a REGISTER may hand over: the kernel's
    ``max(FUSE_MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE)`` for the values the
    INIT reply gave."""
    return max(fuse.MIN_READ_BUFFER, max_write, max_pages * page_size)


def encode_cmd_req(qid: int, commit_id: int = 0) -> bytes:
    """The command area (all 80 bytes) of a REGISTER (``commit_id`` 0) or
    COMMIT_AND_FETCH."""
    return CMD_REQ.pack(0, commit_id, qid) + bytes(CMD_AREA_SIZE - CMD_REQ.size)


def decode_entry(header: bytes | memoryview | bytearray) -> tuple[int, int, int, int, int, int]:
    """``(length, opcode, unique, nodeid, op_in size, payload_sz)`` of the request in
    a filled header buffer. ``op_in size`` is what the header's length leaves for the
    first argument once the in-header and the payload are counted.

    Raises ProtocolError when the lengths do not add up.
    """
    if len(header) < REQ_HEADER_SIZE:
        raise ProtocolError(f"FUSE ring header of {len(header)} bytes, need {REQ_HEADER_SIZE}")
    length, opcode, unique, nodeid = fuse.IN_HEADER_PREFIX.unpack_from(header)
    (payload_sz,) = _PAYLOAD_SZ.unpack_from(header, PAYLOAD_SZ_OFFSET)
    op_size = length - fuse.IN_HEADER.size - payload_sz
    if not 0 <= op_size <= OP_IN_OUT_SIZE:
        raise ProtocolError(f"FUSE ring request {unique}: length {length} with a "
                             f"{payload_sz}-byte payload")
    return length, opcode, unique, nodeid, op_size, payload_sz


def encode_reply_header(header: bytearray | memoryview, unique: int, error: int,
                        payload_sz: int) -> None:
    """Write a reply into a header buffer: ``fuse_out_header`` (``error`` 0 or a positive
    errno, sent negated) and ``payload_sz``, the bytes of result put in the payload
    buffer (0 with an error)."""
    fuse.OUT_HEADER.pack_into(header, 0, fuse.OUT_HEADER.size + payload_sz, -error, unique)
    _PAYLOAD_SZ.pack_into(header, PAYLOAD_SZ_OFFSET, payload_sz)

