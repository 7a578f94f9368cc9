"""What an image stack can do, as data: computed when the stack is opened (open, resume),
narrowed by each layer on the way up, read by the VBD and the frontends.

Two kinds of fields:

* **What the stack supports** (``writable``, ``flush``, ``trim``, ``zero``,
  ``fast_zero``, ``multi_conn``, ``block_status``): what a frontend may advertise (NBD
  transmission flags) and serve.
* **Which fast routes may serve a request** (:class:`Routes`, once for reads and once for
  writes). A fast route reaches the chain's one image without passing through the layers
  (and the chain): the image's coroutine called by the VBD itself (``direct``), the
  driver's synchronous ``read_now``/``write_now`` (``sync``), blocking I/O from a thread
  of a frontend (``thread``: :class:`blktap.vbd.ThreadIO`, the NBD lanes), or the image's
  descriptor lent to a frontend that serves requests itself (``lent_fd``:
  :meth:`blktap.vbd.VBD.sync_file`, the NBD connection's inline path). A layer that must
  see every write (a mirror, fault injection) turns every write route off; one that only
  watches writes keeps the read routes.
* **Who must hear of every write before it starts** (``observers``, each a
  :class:`WriteObserver`): a layer that only has to *know* which bytes are written (a
  changed-block log marks a bitmap) declares itself an observer with
  :meth:`Capabilities.observe_writes` instead of turning the write routes off. Every fast
  route then calls each observer's ``mark`` before it issues a write (and makes the marks
  durable first for a FUA write); the general path reaches the layer itself. Write-zeroes
  and discard take no fast route: the layer sees them.

A layer may only narrow: :meth:`Capabilities.narrow` refuses to turn anything on (or to
drop an observer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Routes:
    """The fast routes past the layers one kind of request (reads, or writes) may take.

    Each is allowed only where the chain's one image offers it too (see
    :class:`blktap.block.driver.FastIO`); the VBD decides per request among the allowed
    ones (see docs/architecture.md)."""

    direct: bool = False
    """The VBD calls the one image's coroutine itself (no layer, no chain)."""
    sync: bool = False
    """The driver completes the request synchronously (``read_now``/``write_now``)."""
    thread: bool = False
    """Another thread does blocking I/O on the image (``read_blocking``/``write_blocking``)."""
    lent_fd: bool = False
    """A frontend serves the request itself on the image's lent descriptor (``sync_fd``)."""

    def __and__(self, other: Routes) -> Routes:
        return Routes(self.direct and other.direct, self.sync and other.sync,
                      self.thread and other.thread, self.lent_fd and other.lent_fd)

    @property
    def any(self) -> bool:
        return self.direct or self.sync or self.thread or self.lent_fd


NO_ROUTES = Routes()
ALL_ROUTES = Routes(direct=True, sync=True, thread=True, lent_fd=True)


@dataclass(frozen=True, slots=True, eq=False)
class WriteObserver:
    """What a layer that watches writes (a changed-block log) gives the fast routes, so
    that writes need not pass through it (see the module docstring). Compared by
    identity."""

    mark: Callable[[int, int], object]
    """``mark(offset, length)``: ``length`` (> 0) bytes at ``offset`` (inside the device)
    are about to be written (what it returns is ignored). Called before the write is
    issued, from the event loop or from another thread (an NBD lane): thread-safe,
    cheap, never blocks for long."""
    sync_now: Callable[[], None]
    """Make every mark made before the call durable, blocking the caller (before a FUA
    write on a synchronous or thread route). Thread-safe. Raises OSError on failure."""
    sync: Callable[[], Awaitable[None]]
    """:attr:`sync_now` for the event loop (before a FUA write on the direct route)."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an image stack can do (see the module docstring). Frozen: build a narrower
    one with :meth:`narrow`."""

    writable: bool = True
    """Writes, zeroes and trims are accepted (False for a read-only VBD)."""
    flush: bool = True
    """Flush and FUA make completed writes durable."""
    trim: bool = True
    """Discard (NBD TRIM) is passed down (advisory)."""
    zero: bool = True
    """Write-zeroes is served (else a frontend writes zeros itself or refuses)."""
    fast_zero: bool = False
    """Write-zeroes is cheaper than writing zeros (NBD FAST_ZERO succeeds)."""
    multi_conn: bool = True
    """Clients on several connections see one consistent device: a flush on one makes the
    writes completed on all of them durable (NBD CAN_MULTI_CONN)."""
    block_status: bool = True
    """Allocation status can be reported (NBD base:allocation)."""
    reads: Routes = NO_ROUTES
    """Fast routes READs may take past the layers."""
    writes: Routes = NO_ROUTES
    """Fast routes WRITEs may take past the layers."""
    observers: tuple[WriteObserver, ...] = ()
    """Called by every fast route before it issues a write (see :class:`WriteObserver`),
    bottom layer's first."""

    def narrow(self, **changes: Any) -> Capabilities:
        """A copy with ``changes`` (field=value), each no wider than now: a bool may only
        become False, routes only lose members, observers only be added (after those
        there). Raises ValueError for a widening and TypeError for an unknown field."""
        names = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in names:
                raise TypeError(f"Capabilities has no field {name!r}")
            old = getattr(self, name)
            if name == "observers":
                if not isinstance(value, tuple) or value[:len(old)] != old:
                    raise ValueError(f"a layer may only add observers: {old} -> {value}")
            elif isinstance(old, Routes):
                if not isinstance(value, Routes) or (old & value) != value:
                    raise ValueError(f"a layer may only narrow {name}: {old} -> {value}")
            elif not isinstance(value, bool) or (value and not old):
                raise ValueError(f"a layer may only narrow {name}: {old} -> {value}")
        return replace(self, **changes)

    def must_see_writes(self) -> Capabilities:
        """Narrowed for a layer that must see every write (and zero and trim): no write
        takes a fast route past it. Reads keep theirs."""
        return self.narrow(writes=NO_ROUTES)

    def observe_writes(self, observer: WriteObserver) -> Capabilities:
        """With ``observer`` called by the fast routes before every write they issue (a
        layer that only watches writes, e.g. a changed-block log): the routes stay."""
        return self.narrow(observers=(*self.observers, observer))

    def must_see_everything(self) -> Capabilities:
        """Narrowed for a layer that must see every request: no fast route at all."""
        return self.narrow(reads=NO_ROUTES, writes=NO_ROUTES)
