"""``fault``: fault injection, as nbdkit's ``error`` and ``delay`` filters together.

Selected in the image string with its settings (one field, no ``:``) after its name::

    fault:op=write,errno=ENOSPC,offset=0-1M,rate=0.5,after=10,latency=5ms,seed=7:vhd:/p

Settings (comma-separated ``key=value``, each optional):

``op``
    The operations it acts on, joined with ``+``: ``read``, ``write``, ``zero``
    (write-zeroes), ``trim``, ``flush``, or ``any`` (all five; the default).
``errno``
    The error a hit fails with: a name from :mod:`errno` (``EIO``, the default;
    ``ENOSPC``, ``EAGAIN``, ``EBUSY``, ...) or ``none`` (a hit only waits ``latency``).
``offset``
    ``START-END``: only requests overlapping bytes ``[START, END)`` (K, M, G, T suffixes,
    powers of 1024; END may be empty for the end of the device). Flush has no range and
    is not limited by it. Default: the whole device.
``rate``
    The probability (0..1) that a matching request is hit (default 1).
``after``
    Matching requests to let through before the first hit (default 0).
``count``
    At most this many hits, then pass-through (default: no limit).
``latency``
    How long each hit waits before it fails or passes down: ``5ms``, ``0.2s``, ``100us``
    (a bare number is milliseconds; default 0).
``seed``
    The seed of the ``rate`` draws (default 0): the same settings and the same sequence of
    requests hit the same requests.

A request *matches* when its operation and range are selected; a matching request past
``after`` and within ``count`` is a *hit* with probability ``rate``. Several fault
layers stack (``fault:op=read,errno=EIO:fault:op=write,latency=1ms:aio:/p``); the
empty field (``fault::aio:/p``) or no field (``fault:aio:/p``) means the defaults, which
fail every request with EIO. ``fault:rate=0:...`` passes everything through (and is seen
by every request, unlike ``null``).

Errors: a hit raises :class:`InjectedFault` with the chosen errno, which the frontends
report as any other (NBD: ENOSPC as NBD_ENOSPC, EIO as NBD_EIO, ...). EAGAIN and EBUSY
are retried by the VBD until its request timeout (:mod:`blktap.block.retry`).

Capabilities: a layer acting on reads must see every request
(:meth:`~blktap.block.capabilities.Capabilities.must_see_everything`); one acting on
writes, zeroes or trims every write (``must_see_writes``); one on flush alone narrows
nothing (flushes always reach the stack).
"""

from __future__ import annotations

import asyncio
import errno as _errno
import random
from collections.abc import Mapping
from dataclasses import dataclass

from blktap.block.capabilities import Capabilities
from blktap.block.driver import OpenOptions
from blktap.block.layer import Layer, LayerOpener, Stack, register_with_settings
from blktap.errors import BlktapError, InvalidArgument

OPS = ("read", "write", "zero", "trim", "flush")
"""The operations a fault layer can act on (``op=``)."""

_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TIME_PER_SECOND = {"us": 1e6, "ms": 1e3, "s": 1.0, "": 1e3}
_KEYS = ("op", "errno", "offset", "rate", "after", "count", "latency", "seed")


class InjectedFault(BlktapError):
    """The error a fault layer's hit raises (``errno`` as its settings say)."""


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """A fault layer's settings, parsed and validated (see the module docstring)."""

    ops: frozenset[str] = frozenset(OPS)
    errno: int | None = _errno.EIO
    """None: a hit only waits ``latency_s``."""
    start: int = 0
    end: int | None = None
    """Exclusive; None for the end of the device."""
    rate: float = 1.0
    after: int = 0
    count: int | None = None
    latency_s: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``key=value,...``. Raises InvalidArgument naming the bad key or value."""
        fields: dict[str, str] = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in _KEYS:
                raise InvalidArgument(
                    f"fault: {item!r} is not one of {', '.join(k + '=' for k in _KEYS)}")
            if key in fields:
                raise InvalidArgument(f"fault: {key}= given twice")
            fields[key] = value
        return cls._from_fields(fields)

    @classmethod
    def _from_fields(cls, f: Mapping[str, str]) -> FaultSpec:
        ops = frozenset(OPS)
        if "op" in f:
            names = f["op"].split("+")
            bad = [n for n in names if n not in (*OPS, "any")]
            if bad or not names:
                raise InvalidArgument(
                    f"fault: op={f['op']!r}: each must be one of {', '.join(OPS)}, any")
            ops = frozenset(OPS) if "any" in names else frozenset(names)
        err: int | None = _errno.EIO
        if "errno" in f:
            name = f["errno"]
            if name == "none":
                err = None
            elif name.isupper() and isinstance(getattr(_errno, name, None), int):
                err = getattr(_errno, name)
            else:
                raise InvalidArgument(f"fault: errno={name!r} is not an errno name or none")
        start, end = 0, None
        if "offset" in f:
            lo, sep, hi = f["offset"].partition("-")
            if not sep:
                raise InvalidArgument(f"fault: offset={f['offset']!r} must be START-END")
            start = _size("offset", lo) if lo else 0
            end = _size("offset", hi) if hi else None
            if end is not None and end <= start:
                raise InvalidArgument(f"fault: offset={f['offset']!r} is an empty range")
        rate = 1.0
        if "rate" in f:
            try:
                rate = float(f["rate"])
            except ValueError:
                rate = -1.0
            if not 0.0 <= rate <= 1.0:
                raise InvalidArgument(f"fault: rate={f['rate']!r} must lie in 0..1")
        return cls(
            ops=ops, errno=err, start=start, end=end, rate=rate,
            after=_count("after", f["after"]) if "after" in f else 0,
            count=_count("count", f["count"]) if "count" in f else None,
            latency_s=_seconds(f["latency"]) if "latency" in f else 0.0,
            seed=_count("seed", f["seed"]) if "seed" in f else 0,
        )

    @property
    def on_reads(self) -> bool:
        return "read" in self.ops

    @property
    def on_writes(self) -> bool:
        return bool(self.ops & {"write", "zero", "trim"})


def _count(key: str, text: str) -> int:
    if not text.isdigit():
        raise InvalidArgument(f"fault: {key}={text!r} must be a whole number")
    return int(text)


def _size(key: str, text: str) -> int:
    number, suffix = text.rstrip("KMGTkmgt"), text[len(text.rstrip("KMGTkmgt")):].upper()
    if not number.isdigit() or suffix not in _SIZE_SUFFIX:
        raise InvalidArgument(f"fault: {key}= size {text!r} must be N[K|M|G|T]")
    return int(number) * _SIZE_SUFFIX[suffix]


def _seconds(text: str) -> float:
    number = text.rstrip("mus")
    suffix = text[len(number):]
    try:
        value = float(number) if suffix in _TIME_PER_SECOND else -1.0
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise InvalidArgument(f"fault: latency={text!r} must be N[us|ms|s]")
    return value / _TIME_PER_SECOND[suffix]


class Injector:
    """Decides which requests are hit (pure: no I/O, no clock; the layer waits and
    raises). Deterministic for a given spec and sequence of requests."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self._random = random.Random(spec.seed)
        self.matched = 0
        """Requests that matched (operation and range)."""
        self.hits = 0

    def hit(self, op: str, offset: int, length: int) -> bool:
        """Whether the request ``op`` of ``length`` bytes at ``offset`` is hit."""
        spec = self.spec
        if op not in spec.ops:
            return False
        if op != "flush" and not (
                offset + length > spec.start and (spec.end is None or offset < spec.end)):
            return False
        self.matched += 1
        if self.matched <= spec.after or (spec.count is not None and self.hits >= spec.count):
            return False
        # Draw for every eligible request, even at rate 1, so that the seed's sequence
        # does not depend on the rate.
        if self._random.random() >= spec.rate:
            return False
        self.hits += 1
        return True


class FaultLayer(Layer):
    """Injects the faults of its :class:`FaultSpec` into the requests it sees."""

    name = "fault"

    def __init__(self, next: Stack, options: OpenOptions, spec: FaultSpec) -> None:
        self.spec = spec
        self.injector = Injector(spec)
        super().__init__(next, options)

    @classmethod
    def opener(cls, settings: str) -> LayerOpener:
        """An opener of the layer with ``settings`` (validated now: InvalidArgument)."""
        spec = FaultSpec.parse(settings)

        async def open_(next: Stack, options: OpenOptions) -> Layer:
            return cls(next, options, spec)

        return open_

    def narrow(self, caps: Capabilities) -> Capabilities:
        if self.spec.on_reads:
            return caps.must_see_everything()
        if self.spec.on_writes:
            return caps.must_see_writes()
        return caps

    async def _maybe_fail(self, op: str, offset: int, length: int) -> None:
        if not self.injector.hit(op, offset, length):
            return
        spec = self.spec
        if spec.latency_s:
            await asyncio.sleep(spec.latency_s)
        if spec.errno is not None:
            name = _errno.errorcode.get(spec.errno, str(spec.errno))
            raise InjectedFault(f"injected {name} on {op} {offset}+{length}",
                                errno=spec.errno)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._maybe_fail("read", offset, len(buf))
        await self.next.read(offset, buf)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self._maybe_fail("write", offset, len(data))
        await self.next.write(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        await self._maybe_fail("zero", offset, length)
        await self.next.write_zeroes(offset, length, may_unmap, fua)

    async def discard(self, offset: int, length: int) -> None:
        await self._maybe_fail("trim", offset, length)
        await self.next.discard(offset, length)

    async def flush(self) -> None:
        await self._maybe_fail("flush", 0, 0)
        await self.next.flush()


register_with_settings("fault", FaultLayer.opener)
