"""Layers: small wrappers over ``next`` (the chain, or another layer), as nbdkit's filters.

A VBD's image stack is, top to bottom: its layers, then the :class:`~blktap.block.chain.Chain`
(leaf-first images). Layers are named in the image string before the driver type, top
first, each by its C type name where the C tapdisk has one: ``null:aio:/srv/disk.raw``,
``log:vhd:/srv/vm.vhd``, ``null:null:aio:/p`` (see :func:`split_layers`). A layer registered
with :func:`register_with_settings` may take one settings field after its name
(``fault:op=write,errno=EIO:vhd:/p``). The VBD opens the
chain, then each layer over what is open so far, bottom-up, and sends every request that
does not take a fast route to the top of the stack.

How to write a layer
--------------------
1. One module in ``blktap/block/layers/`` (``null.py`` is the smallest), added to
   ``BUILTIN`` below.
2. Subclass :class:`Layer`. Every operation passes to ``self.next`` by default: override
   only what the layer changes, and call ``self.next`` for the rest of the work. The
   arguments a layer receives are already validated by the VBD (inside the device,
   writable when writing); ``read``/``write`` may be unaligned (the chain aligns).
3. Override :meth:`Layer.narrow` when the layer must see requests the fast routes would
   take past it: a layer that must see every write, zero and trim (a mirror, fault
   injection on writes) returns ``caps.must_see_writes()``; one that must see every
   request (a cache, a rate limit) ``caps.must_see_everything()``; one that cannot
   promise multi-connection consistency narrows ``multi_conn``. A layer that only has to
   *know* of each write before it starts (a changed-block log) keeps the routes and
   returns ``caps.observe_writes(WriteObserver(mark, sync_now, sync))``: every fast
   route calls ``mark`` (from any thread) before it issues a write, and syncs first for
   a FUA write; the writes of the general path, zeroes and trims still reach the layer.
   A layer may only narrow (:meth:`Capabilities.narrow`). A pass-through layer narrows
   nothing, so the fast routes stay and most requests never reach it.
4. Open and close: ``open(next, options)`` builds it (the default constructor; a
   classmethod to override for a layer that opens files, reading its settings from
   ``options``); override :meth:`Layer.close` to release what the layer holds (write
   back a bitmap, ...) and then ``await super().close()``, which closes ``next``. A flush
   must reach the layer's own durable state too: override :meth:`Layer.flush` (write
   back, then ``await self.next.flush()``). A layer whose record must cover every
   acknowledged write (a changed-block log) updates it before it awaits
   ``self.next.write`` (the acknowledgement follows that), for ``write_zeroes`` and
   ``discard`` as for ``write``.
5. ``register("name", LayerClass.open)`` at the end of the module; a layer with settings
   in the image string registers ``register_with_settings("name", make)`` instead, where
   ``make(settings)`` validates them (InvalidArgument) and returns the opener.
6. Tests: the layer in pass-through mode over every driver configuration in
   ``tests/unit/test_driver_conformance.py``, and tests of what it adds.

The contract of each operation is the chain's (:class:`~blktap.block.chain.Chain`), which
is the bottom of every stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

from blktap.block.capabilities import Capabilities
from blktap.block.driver import OpenOptions
from blktap.errors import NotFound

if TYPE_CHECKING:
    from blktap.block.chain import Chain, StatusExtent


class Stack(Protocol):
    """What a layer sees below it, and what the VBD sends requests to: the chain or a
    layer. ``offset``/``length`` lie inside the device; writes only reach a writable stack."""

    @property
    def chain(self) -> Chain:
        """The chain at the bottom (its images, statistics and size)."""

    @property
    def size(self) -> int: ...

    def capabilities(self) -> Capabilities:
        """What the stack down from here can do (constant while it is open)."""

    async def read(self, offset: int, buf: memoryview) -> None: ...

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool,
                           fua: bool) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    def block_status(self, offset: int, length: int) -> list[StatusExtent]: ...

    async def close(self) -> None:
        """Close this and everything below; raises the first error after closing all."""


class DirtyBitmap(Protocol):
    """A record of changed blocks kept by a layer (the CBT log), as a frontend reads it
    (the NBD ``qemu:dirty-bitmap:<name>`` metadata context)."""

    @property
    def bitmap_name(self) -> str:
        """The name a frontend gives the record (fixed while the layer is open)."""

    def dirty_extents(self, offset: int, length: int,
                      limit: int = 1 << 30) -> list[tuple[int, int]]:
        """``length`` (> 0) bytes at ``offset`` as runs of (bytes, 1 changed / 0 not),
        split at the record's block boundaries, at most ``limit`` runs. Every write
        acknowledged before the call is seen. Only while the stack is open."""


class Layer:
    """A layer over ``next`` that passes every operation through (see the module
    docstring for how to write one). ``name`` is its prefix in the image string."""

    name: ClassVar[str] = ""

    def __init__(self, next: Stack, options: OpenOptions) -> None:
        self.next = next
        self.options = options
        self._caps = self.narrow(next.capabilities())

    @classmethod
    async def open(cls, next: Stack, options: OpenOptions) -> Layer:
        """Open the layer over ``next`` (which stays open, and the caller's, on failure)."""
        return cls(next, options)

    @property
    def chain(self) -> Chain:
        return self.next.chain

    @property
    def size(self) -> int:
        return self.next.size

    def narrow(self, caps: Capabilities) -> Capabilities:
        """This layer's capabilities given those of ``next``: ``caps`` narrowed (never
        widened). Called once, when the layer is opened over ``next``."""
        return caps

    def capabilities(self) -> Capabilities:
        return self._caps

    async def read(self, offset: int, buf: memoryview) -> None:
        await self.next.read(offset, buf)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self.next.write(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        await self.next.write_zeroes(offset, length, may_unmap, fua)

    async def discard(self, offset: int, length: int) -> None:
        await self.next.discard(offset, length)

    async def flush(self) -> None:
        await self.next.flush()

    def block_status(self, offset: int, length: int) -> list[StatusExtent]:
        return self.next.block_status(offset, length)

    def dirty_bitmap(self) -> DirtyBitmap | None:
        """The changed-block record kept by this layer or one below it, if any (a layer
        that keeps one overrides this). The chain at the bottom keeps none."""
        below = self.next
        return below.dirty_bitmap() if isinstance(below, Layer) else None

    async def close(self) -> None:
        await self.next.close()


LayerOpener = Callable[[Stack, OpenOptions], Awaitable[Layer]]
"""``opener(next, options)`` opens one layer over ``next``."""

BUILTIN = ("null", "fault")
"""Modules of ``blktap.block.layers`` that register a layer on import."""

_REGISTRY: dict[str, LayerOpener] = {}
_WITH_SETTINGS: dict[str, Callable[[str], LayerOpener]] = {}


def register(name: str, opener: LayerOpener) -> None:
    """Make ``name`` (a prefix in the image string) open a layer with ``opener``."""
    _REGISTRY[name] = opener


def register_with_settings(name: str, make: Callable[[str], LayerOpener]) -> None:
    """Make ``name`` a layer that may take one settings field after it in the image
    string (``name:SETTINGS:type:path``; see :func:`split_layers`): ``make(settings)``
    returns its opener ("" when the field is absent) and raises InvalidArgument for bad
    settings."""
    _WITH_SETTINGS[name] = make


def _load_builtin() -> None:
    for module in BUILTIN:
        importlib.import_module(f"blktap.block.layers.{module}")


def layer_names() -> frozenset[str]:
    _load_builtin()
    return frozenset(_REGISTRY) | frozenset(_WITH_SETTINGS)


def opener_for(name: str) -> LayerOpener:
    """The opener of layer ``name``, or of ``"name:SETTINGS"`` for a layer registered
    with settings. Raises NotFound (ENOENT) for an unknown layer, InvalidArgument for bad
    settings."""
    _load_builtin()
    base, _, settings = name.partition(":")
    if base in _WITH_SETTINGS:
        return _WITH_SETTINGS[base](settings)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NotFound(f"unknown layer {name!r}") from None


def split_layers(text: str) -> tuple[tuple[str, ...], str]:
    """Split ``"l1:l2:type:path"`` into the layers (top first) and ``"type:path"``:
    leading fields that name a registered layer, as long as a ``type:path`` follows.
    A layer registered with settings takes the field after its name as its settings
    when that field is empty or holds a ``=`` (no driver type does), and is returned as
    ``"name:SETTINGS"``: ``"fault:op=read:aio:/p"`` gives ``(("fault:op=read",), "aio:/p")``."""
    layers: list[str] = []
    names = layer_names()
    rest = text
    while True:
        head, sep, tail = rest.partition(":")
        if not sep or head not in names or ":" not in tail:
            return tuple(layers), rest
        if head in _WITH_SETTINGS:
            settings, _, after = tail.partition(":")
            if not settings or "=" in settings:
                if ":" not in after:
                    return tuple(layers), rest
                layers.append(f"{head}:{settings}")
                rest = after
                continue
        layers.append(head)
        rest = tail


async def open_stack(layers: Sequence[str | LayerOpener], chain: Chain,
                     options: OpenOptions) -> Stack:
    """Open ``layers`` (top first; each a registered name or an opener, for a layer whose
    settings do not come in the image string) over ``chain``, bottom-up. On failure
    closes every layer opened so far and the chain, then raises."""
    stack: Stack = chain
    try:
        for layer in reversed(layers):
            opener = opener_for(layer) if isinstance(layer, str) else layer
            stack = await opener(stack, options)
    except BaseException:
        await stack.close()
        raise
    return stack
