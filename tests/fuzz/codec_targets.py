"""In-process fuzz targets: the sans-IO codecs and parsers fed bytes directly, with no
socket, file or event loop, so that a run reaches millions of inputs (the end-to-end
targets of tests/fuzz/targets.py reach hundreds per second).

Each target asserts the invariants its callers rely on; any exception other than the
errors the code documents (and AssertionError for a broken invariant) is a crash.

- ``nbd-proto``: :class:`blktap.proto.nbd.ServerCodec`. Byte 0 picks the export
  (read-only, flush, trim, zero, block status, a dirty bitmap), borrowed payloads and
  required TLS; byte 1 how far a valid handshake goes before the input's own bytes
  (none, OPT_GO, structured replies + SET_META_CONTEXT + OPT_GO, OPT_EXPORT_NAME) and
  how the stream is cut. The stream is fed three ways: whole, in chunks, and as the
  server's connection does (feed during negotiation, feed_partial / feed_request in
  transmission, WRITE payloads received into payload_buffer()). Invariants: only
  ProtocolError is raised, after which the codec is FAILED and stays so; the three
  ways give the same events, the same output and the same end (unless a client sends
  bytes behind STARTTLS, which only the byte boundary decides); every Request is one
  HeaderCheck accepts with flags the command may carry, READ/WRITE within MAX_BLOCK, a
  WRITE carries exactly its payload, nothing follows DISC or ABORT; the codec's output
  parses as option replies, the NBD_OPT_EXPORT_NAME reply and error replies; a
  BLOCK_STATUS reply never describes more than the request's length.
- ``control-proto``: :mod:`blktap.proto.control`. Byte 0's low bit picks the side:
  the server's :class:`RequestReader` (fed as tapdisk's control connection feeds it)
  or tap-ctl's :class:`ReplyReader` for the request type byte 1 names. Invariants:
  only MessageError (EINVAL/EBUSY on the server side, EPROTO on the client side);
  whole and chunked feeding agree; a request read re-encodes (encode_request) to bytes
  that read back to the same request; the server's checks of an OPEN/RESUME's
  ``type:path`` (ImageSpec.parse, the fault layer's settings, a mirror secondary) raise
  only BlktapError and a parsed image string prints back to itself; a LIST reply's
  entries count down to the terminating count-0 message, a STATS body has the length
  its head announced.
- ``vhd-parse``: the VHD parsers on in-memory bytes (footer, dynamic header, BAT,
  batmap header, parent name, locators, bitmaps) and ``check_vhd``. Invariants: only
  ImageFormatError; a parsed structure encodes to bytes that parse back to it; BAT
  entries survive encode_bat; bitmap runs agree with bit tests; ``check_vhd`` never
  raises. (The ``vhd`` target adds the driver's open of the file.)
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import struct
from collections.abc import Callable
from typing import Any

# blktap is imported in start(), not here: the coverage-guided runner imports this
# module first and blktap afterwards, under its instrumentation.

# ------------------------------------------------------------------------- helpers


def _cuts(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut into chunks whose sizes cycle through a pattern ``seed`` picks (1..64
    bytes, and some 28-byte NBD headers split in odd places)."""
    sizes = (1 + seed % 7, 1 + (seed * 7) % 29, 28, 1 + (seed * 13) % 64, 27, 544 - seed % 3)
    out = []
    pos = i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos:pos + n])
        pos += n
        i += 1
    return out


# --------------------------------------------------------------------- nbd-proto
_OPTS = 0x49484156454F5054


def _nbd_option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", _OPTS, opt, len(payload)) + payload


def _meta_payload(*queries: str) -> bytes:
    body = b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)
    return struct.pack(">I", 0) + struct.pack(">I", len(queries)) + body


_GO = _nbd_option(7, struct.pack(">IH", 0, 0))
_STARTTLS = _nbd_option(5)
_PREFIXES = (
    b"",
    struct.pack(">I", 3) + _GO,
    struct.pack(">I", 3) + _nbd_option(8)
    + _nbd_option(10, _meta_payload("base:allocation", "qemu:dirty-bitmap:bm")) + _GO,
    struct.pack(">I", 1) + _nbd_option(1),
)
"""Valid handshakes the harness sends before the input's bytes (byte 1 % 4)."""


def _alloc(length: int) -> memoryview:
    """A WRITE payload buffer; large ones mapped (pages cost only once written), so that
    the many 32 MiB WRITE headers a fuzzer makes do not each zero 32 MiB."""
    if length <= 1 << 16:
        return memoryview(bytearray(length))
    return memoryview(mmap.mmap(-1, length))


class _Run:
    """What one way of feeding a stream gave."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.output = bytearray()
        self.failed = False
        self.state = ""


class NbdProtoTarget:
    name = "nbd-proto"

    def start(self) -> None:
        from blktap.errors import ProtocolError
        from blktap.proto import nbd

        self.nbd = nbd
        self.ProtocolError = ProtocolError
        self.errors = {nbd.nbd_error(e) for e in range(1, 256)}
        """Every NBD error code the server can send."""

    def stop(self) -> None:
        pass

    def one(self, data: bytes) -> None:
        nbd = self.nbd
        cfg = data[0] if data else 0
        mode = data[1] if len(data) > 1 else 0
        rest = data[2:]
        export = nbd.ExportInfo(
            size=1 << 20, read_only=bool(cfg & 1), flush=not cfg & 2, trim=not cfg & 4,
            zero=not cfg & 8, block_status=not cfg & 16,
            dirty_bitmap="bm" if cfg & 32 else "", description="fuzz" if cfg & 1 else "")
        borrow = bool(cfg & 64)
        tls = bool(cfg & 128)
        prefix = _PREFIXES[mode % 4]
        # With TLS required, the handshake STARTTLS first (a segment of its own: the
        # client waits for the ACK) and the chosen handshake after it.
        segments = ([struct.pack(">I", 3) + _STARTTLS, prefix[4:] + rest] if tls and prefix
                    else [prefix + rest])

        def codec() -> Any:
            return nbd.ServerCodec(export, _alloc, borrow_payloads=borrow, tls_required=tls)

        whole = self._run(codec(), segments, None)
        chunked = self._run(codec(), segments, mode >> 2)
        server = self._run_server(codec(), segments, mode >> 2)
        if not (tls and not prefix):  # STARTTLS in the input: the byte boundary decides
            for other, how in ((chunked, "in chunks"), (server, "as the server does")):
                assert other.failed == whole.failed, (
                    f"fed {how}: failed={other.failed}, fed whole: failed={whole.failed}")
                assert other.output == whole.output, f"fed {how}: another output"
                if not whole.failed:
                    assert other.events == whole.events, (
                        f"fed {how}: events {other.events[:4]}..., fed whole: "
                        f"{whole.events[:4]}...")
                    assert other.state == whole.state, (other.state, whole.state)
                else:
                    # feed() loses the events of the call that failed: the whole-fed
                    # events are a prefix of the others'.
                    assert other.events[:len(whole.events)] == whole.events
        for run in (whole, chunked, server):
            self._check_output(bytes(run.output), export)

    # -- three ways to feed -------------------------------------------------------
    def _take(self, codec: Any, run: _Run, events: list[Any], seen: dict[str, Any]) -> None:
        nbd = self.nbd
        run.output += codec.output
        codec.output.clear()
        for ev in events:
            assert not seen.get("ended"), f"{ev!r} after the end (DISC or ABORT)"
            if isinstance(ev, nbd.Request):
                self._check_request(codec, ev, seen)
                data = None if ev.data is None else bytes(ev.data)
                run.events.append(("request", int(ev.command), ev.flags, ev.cookie,
                                   ev.offset, ev.length, data))
            elif isinstance(ev, nbd.Negotiated):
                assert "negotiated" not in seen, "a second Negotiated"
                assert codec.state in (nbd.State.TRANSMISSION, nbd.State.CLOSED,
                                       nbd.State.FAILED)
                seen["negotiated"] = ev
                self._check_flags(ev.transmission_flags, codec.export, ev.structured)
                run.events.append(("negotiated", ev))
            elif isinstance(ev, nbd.Aborted):
                seen["ended"] = True
                run.events.append(("aborted",))
            elif isinstance(ev, nbd.StartTls):
                assert codec.tls_required and not codec.tls_active
                seen["tls"] = True
                run.events.append(("starttls",))
            else:
                raise AssertionError(f"unknown event {ev!r}")

    def _failed(self, codec: Any, run: _Run) -> None:
        nbd = self.nbd
        run.failed = True
        run.output += codec.output
        codec.output.clear()
        assert codec.state is nbd.State.FAILED, codec.state
        try:
            codec.feed(b"\0" * 28)
        except self.ProtocolError:
            pass
        else:
            raise AssertionError("a failed codec accepted more bytes")

    def _between_segments(self, codec: Any, seen: dict[str, Any]) -> None:
        if seen.pop("tls", False):
            codec.tls_started()  # the TLS layer is the identity here

    def _run(self, codec: Any, segments: list[bytes], cut: int | None) -> _Run:
        run = _Run()
        seen: dict[str, Any] = {}
        try:
            for segment in segments:
                self._between_segments(codec, seen)
                for chunk in ([segment] if cut is None else _cuts(segment, cut)):
                    # A memoryview of a bytearray, as a socket read gives.
                    self._take(codec, run, codec.feed(memoryview(bytearray(chunk))), seen)
        except self.ProtocolError:
            self._failed(codec, run)
        run.state = codec.state.value
        return run

    def _run_server(self, codec: Any, segments: list[bytes], cut: int) -> _Run:
        """As blktap.frontends.nbd_connection feeds the codec (its inline parser aside)."""
        nbd = self.nbd
        run = _Run()
        seen: dict[str, Any] = {}
        try:
            for segment in segments:
                self._between_segments(codec, seen)
                for chunk in _cuts(segment, cut + 1):
                    buf = memoryview(bytearray(chunk))
                    end = len(buf)
                    target = codec.payload_buffer()
                    if target is not None:
                        n = min(len(target), end)
                        target[:n] = buf[:n]
                        self._take(codec, run, codec.payload_received(n), seen)
                        buf = buf[n:]
                        end -= n
                        if not end:
                            continue
                    if codec.state is not nbd.State.TRANSMISSION:
                        self._take(codec, run, codec.feed(buf), seen)
                        continue
                    events, pos = codec.feed_partial(buf)
                    assert 0 <= pos <= end, (pos, end)
                    self._take(codec, run, events, seen)
                    while pos < end and codec.state is nbd.State.TRANSMISSION:
                        if codec.between_requests and end - pos >= nbd.REQUEST.size:
                            events, new = codec.feed_request(buf, pos)
                            assert pos < new <= end, (pos, new, end)
                            pos = new
                        else:
                            events, pos = codec.feed(buf[pos:end]), end
                        self._take(codec, run, events, seen)
        except self.ProtocolError:
            self._failed(codec, run)
        run.state = codec.state.value
        return run

    # -- invariants -------------------------------------------------------------
    def _check_request(self, codec: Any, req: Any, seen: dict[str, Any]) -> None:
        nbd = self.nbd
        C = nbd.Command
        assert "negotiated" in seen, "a request before the handshake ended"
        cmd = int(req.command)
        assert codec.header_check.accepts(nbd.REQUEST_MAGIC, req.flags, cmd, req.length), (
            f"HeaderCheck refuses a request the codec passed: {req[:5]}")
        assert not req.flags & ~codec.allowed_flags(req.command), req[:5]
        if req.command in (C.READ, C.WRITE):
            assert req.length <= nbd.MAX_BLOCK, req[:5]
        if req.command is C.WRITE:
            assert req.data is not None and len(req.data) == req.length, req[:5]
        else:
            assert req.data is None, req[:5]
        if req.command is C.BLOCK_STATUS:
            assert codec.base_allocation or codec.dirty_bitmap, req[:5]
            if req.length:
                self._check_block_status(codec, req)
        if req.command is C.DISC:
            seen["ended"] = True

    def _check_block_status(self, codec: Any, req: Any) -> None:
        nbd = self.nbd
        req_one = bool(req.flags & nbd.CommandFlag.REQ_ONE)
        # Extents as a VBD might give them, drawn from the request's own numbers.
        extents = [((req.offset >> (8 * i)) & 0xFFFF, i & 3) for i in range(8)]
        extents.append((req.length, 0))
        reply = codec.reply_block_status(req.cookie, req.length, extents, req_one)
        magic, _flags, rtype, cookie, length, _ctx = struct.unpack_from(">IHHQII", reply)
        assert magic == nbd.STRUCTURED_REPLY_MAGIC and cookie == req.cookie
        assert rtype == nbd.ReplyType.BLOCK_STATUS and length == len(reply) - 20
        body = reply[24:]
        count = len(body) // 8
        assert 1 <= count <= (1 if req_one else nbd.MAX_STATUS_EXTENTS), count
        total = sum(struct.unpack_from(">I", body, 8 * i)[0] for i in range(count))
        assert 0 < total <= req.length, (total, req.length)

    def _check_flags(self, flags: int, export: Any, structured: bool) -> None:
        TF = self.nbd.TransmissionFlag
        assert flags & TF.HAS_FLAGS
        if export.read_only:
            assert flags & TF.READ_ONLY
            assert not flags & (TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FUA)
        assert bool(flags & TF.SEND_DF) == structured
        if not export.flush:
            assert not flags & (TF.SEND_FLUSH | TF.SEND_FUA)

    def _check_output(self, out: bytes, export: Any) -> None:
        """The codec's output: option replies, then (after NBD_OPT_EXPORT_NAME) its
        reply, then transmission error replies; nothing torn."""
        nbd = self.nbd
        pos = 0
        while pos + 20 <= len(out):
            magic, _opt, rep, length = struct.unpack_from(">QIII", out, pos)
            if magic != nbd.OPTION_REPLY_MAGIC:
                break
            assert pos + 20 + length <= len(out), "a torn option reply"
            assert rep in {r.value for r in nbd.Rep}, f"option reply type {rep:#x}"
            pos += 20 + length
        if pos + 10 <= len(out) and struct.unpack_from(">Q", out, pos)[0] == export.size:
            pos += 10  # NBD_OPT_EXPORT_NAME's reply
            if out[pos:pos + 124] == bytes(124):
                pos += 124
        errors = self.errors
        while pos < len(out):
            assert pos + 16 <= len(out), f"a torn reply at {pos} of {len(out)}"
            (magic,) = struct.unpack_from(">I", out, pos)
            if magic == nbd.SIMPLE_REPLY_MAGIC:
                (code,) = struct.unpack_from(">I", out, pos + 4)
                assert code and code in errors, f"simple reply error {code}"
                pos += 16
            else:
                assert magic == nbd.STRUCTURED_REPLY_MAGIC, f"reply magic {magic:#x} at {pos}"
                assert pos + 20 <= len(out), "a torn chunk"
                _m, flags, rtype, _cookie, length = struct.unpack_from(">IHHQI", out, pos)
                assert rtype == nbd.ReplyType.ERROR and flags & nbd.REPLY_FLAG_DONE
                assert pos + 20 + length <= len(out), "a torn error chunk"
                code, mlen = struct.unpack_from(">IH", out, pos + 20)
                assert code and mlen == length - 6, (code, mlen, length)
                pos += 20 + length


# ------------------------------------------------------------------ control-proto
_REQUEST_TYPES = (3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 24, 26, 28)
"""The request types with a reply (blktap.proto.control's reply_type_for)."""


class ControlProtoTarget:
    name = "control-proto"

    def start(self) -> None:
        from blktap.proto import control

        self.ctl = control

    def stop(self) -> None:
        pass

    def one(self, data: bytes) -> None:
        sel = data[0] if data else 0
        rest = data[2:] if len(data) > 1 else b""
        if sel & 1:
            kind = data[1] if len(data) > 1 else 0
            self._client(_REQUEST_TYPES[kind % len(_REQUEST_TYPES)], rest, sel >> 1)
        else:
            self._server(data[1:], sel >> 1)

    # -- the server's RequestReader ---------------------------------------------------
    def _serve(self, chunks: list[bytes]) -> tuple[Any, Any]:
        """As tapdisk's control connection: feed, next_request, again while bytes
        remain after a request; the request and the first error."""
        ctl = self.ctl
        reader = ctl.RequestReader()
        got: Any = None
        error: Any = None

        def received(chunk: bytes) -> None:
            nonlocal got, error
            reader.feed(chunk)
            try:
                req = reader.next_request()
            except ctl.MessageError as exc:
                error = error or exc
                return
            if req is None:
                return
            assert got is None, "a second request from one reader"
            got = req
            if reader.buffered:
                received(b"")

        for chunk in chunks:
            received(chunk)
        if error is not None:
            # Spent: the same error again.
            try:
                reader.next_request()
            except ctl.MessageError as again:
                assert again is error
            else:
                raise AssertionError("a reader that raised did not raise again")
        elif got is None:
            try:
                reader.eof()
            except ctl.MessageError as exc:
                error = exc
            else:
                assert not reader.buffered, "eof() accepted a partial request"
        return got, error

    def _server(self, data: bytes, cut: int) -> None:
        ctl = self.ctl
        whole = self._serve([data])
        chunked = self._serve(_cuts(data, cut))
        assert whole[0] == chunked[0], (whole[0], chunked[0])
        assert (whole[1] is None) == (chunked[1] is None), (whole[1], chunked[1])
        req, error = whole
        if error is not None:
            assert error.errno in (errno.EINVAL, errno.EBUSY), error.errno
            assert chunked[1].errno == error.errno, (chunked[1], error)
            if error.cookie is not None and len(data) >= 4:
                assert error.cookie == struct.unpack_from("<H", data, 2)[0]
            if error.errno == errno.EBUSY:
                assert req is not None, "EBUSY without a request"
        if req is None:
            return
        # What the server read, a client could have sent: it reads back the same.
        raw = ctl.encode_request(req)
        again = self._serve([raw])
        assert again == (req, None), (req, again)
        assert data[:4] == raw[:4], "type and cookie"
        self._check_params(req)

    def _check_params(self, req: Any) -> None:
        """The checks the service makes of an OPEN/RESUME's strings raise only
        BlktapError."""
        from blktap.block.layers.fault import FaultSpec
        from blktap.block.layers.mirror import SecondarySpec
        from blktap.control.options import check_name, split_image
        from blktap.errors import BlktapError
        from blktap.vbd import ImageSpec

        params = req.message.payload
        if not isinstance(params, self.ctl.Params):
            return
        for text in (params.path, params.secondary, req.log_path or ""):
            with contextlib.suppress(BlktapError):
                check_name("path", text)
            with contextlib.suppress(BlktapError):
                split_image(text)
        with contextlib.suppress(BlktapError):
            SecondarySpec.parse(params.secondary)
        try:
            spec = ImageSpec.parse(params.path)
        except BlktapError:
            return
        assert str(spec) == params.path, (str(spec), params.path)
        assert ImageSpec.parse(str(spec)) == spec
        for layer in spec.layers:
            name, _, settings = layer.partition(":")
            if name == "fault":
                with contextlib.suppress(BlktapError):
                    FaultSpec.parse(settings)

    # -- tap-ctl's ReplyReader --------------------------------------------------------
    def _read_reply(self, rtype: int, chunks: list[bytes]) -> tuple[Any, Any]:
        ctl = self.ctl
        reader = ctl.ReplyReader(ctl.MessageType(rtype))
        reply: Any = None
        try:
            for chunk in chunks:
                got = reader.feed(chunk)
                assert got is None or reply is None or got is reply
                reply = got or reply
            done = reader.eof()
            assert done is reply
        except ctl.MessageError as exc:
            assert exc.errno == errno.EPROTO, exc.errno
            return None, exc
        return reply, None

    def _client(self, rtype: int, data: bytes, cut: int) -> None:
        ctl = self.ctl
        whole = self._read_reply(rtype, [data])
        chunked = self._read_reply(rtype, _cuts(data, cut))
        assert whole[0] == chunked[0], (whole[0], chunked[0])
        assert (whole[1] is None) == (chunked[1] is None), (whole[1], chunked[1])
        reply = whole[0]
        if reply is None:
            return
        mtype = reply.message.type
        expected = ctl.reply_type_for(ctl.MessageType(rtype))
        assert mtype in (ctl.MessageType.ERROR, expected), (mtype, expected)
        if mtype is ctl.MessageType.LIST_RSP:
            assert reply.message.payload.count == 0
            assert all(e.count != 0 for e in reply.entries)
        if mtype is ctl.MessageType.STATS_RSP:
            assert len(reply.data) == reply.message.payload.length <= ctl.MAX_STATS_LENGTH
        if reply.is_error:
            assert reply.errno == reply.message.payload.error
        # A reply that decoded encodes again (what tapdisk sends, the client reads).
        raw = ctl.encode(reply.message)
        assert ctl.decode(raw) == reply.message


# ---------------------------------------------------------------------- vhd-parse
class VhdParseTarget:
    name = "vhd-parse"

    def start(self) -> None:
        from blktap.errors import ImageFormatError
        from blktap.proto.vhd import bat, batmap, bitmap, check, footer, header

        self.modules = (ImageFormatError, bat, batmap, bitmap, check, footer, header)

    def stop(self) -> None:
        pass

    def one(self, data: bytes) -> None:
        ImageFormatError, bat, batmap, bitmap, check, footer, header = self.modules
        check_vhd, ParentProbe = check.check_vhd, check.ParentProbe

        def parses(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except ImageFormatError:
                return None

        foot = parses(lambda: footer.parse_footer(data[-512:]))
        if foot is not None:
            foot.faults(None)
            foot.faults(0)
            assert footer.parse_footer(foot.encode()) == foot, "footer encode/parse"
            assert foot.with_checksum().checksum_ok
        head = parses(lambda: header.parse_header(data[512:1536]))
        if head is not None:
            assert header.parse_header(head.encode()) == head, "header encode/parse"
            parses(lambda: head.parent_name)
            for loc in head.locators:
                with contextlib.suppress(ImageFormatError):
                    header.decode_locator_path(loc.code, data[:512])
            parses(lambda: head.faults(len(data)))
        table = parses(lambda: bat.parse_bat(data[1536:], min(len(data) // 4, 1024)))
        if table is not None:
            assert list(bat.parse_bat(bat.encode_bat(table), len(table))) == list(table)
        bm = parses(lambda: batmap.parse_batmap_header(data[:512]))
        if bm is not None:
            assert batmap.parse_batmap_header(bm.encode()) == bm, "batmap header"
            bm.faults(data[512:1024], 64, len(data))
        with contextlib.suppress(ImageFormatError):
            header.decode_parent_name(data[:512])
        self._bitmap(data[:4], data[4:8], bitmap)

        def read(offset: int, length: int) -> bytes:
            return data[offset:offset + length]

        result = check_vhd("fuzz.vhd", read, len(data), now_vhd=0,
                           probe=lambda _path: ParentProbe(False))
        assert isinstance(result.verdict, str)

    @staticmethod
    def _bitmap(raw: bytes, where: bytes, bitmap: Any) -> None:
        if not raw:
            return
        bits = bitmap.from_disk(raw, lsb_first=bool(where[:1] and where[0] & 1))
        assert bitmap.to_disk(bits, lsb_first=bool(where[:1] and where[0] & 1)) == raw
        nbits = len(bits) * 8
        first = where[1] % nbits if len(where) > 1 else 0
        count = (where[2] if len(where) > 2 else nbits) % (nbits - first + 1)
        runs = bitmap.runs(bits, first, count)
        pos = first
        for start, length, bit in runs:
            assert start == pos and length > 0
            assert all(bitmap.test(bits, s) == bit for s in range(start, start + length))
            pos += length
        assert pos == first + (count if count > 0 else 0)
        assert bitmap.all_set(bits, first, count) == (
            count > 0 and all(bitmap.test(bits, s) for s in range(first, first + count)))
        copy = bytearray(bits)
        bitmap.set_range(copy, first, count, bool(len(where) > 3 and where[3] & 1))
        value = bool(len(where) > 3 and where[3] & 1)
        for s in range(nbits):
            inside = first <= s < first + count
            assert bitmap.test(copy, s) == (value if inside else bitmap.test(bits, s))
