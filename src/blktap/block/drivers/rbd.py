"""The ``rbd`` driver: an image in a Ceph cluster (a RADOS block device) through librbd.

Image strings (what follows ``rbd:`` in ``tap-ctl create -a rbd:...``)::

    POOL/IMAGE[@SNAP][:key=value]...
    POOL/NAMESPACE/IMAGE[@SNAP][:key=value]...

Keys:

* ``conf=PATH`` — the cluster's ``ceph.conf``. Without it librados looks where the
  ``ceph``/``rbd`` tools do: ``$CEPH_CONF``, then ``/etc/ceph/ceph.conf``, ...
* ``id=NAME`` — the client id (``admin`` for ``client.admin``). Without it: ``--id``,
  ``--user`` or ``--name client.NAME`` in ``$CEPH_ARGS``, else librados' default (admin).
* ``keyring=PATH`` — the client's keyring (cephx); unneeded on a cluster without auth.
* ``timeout=SECONDS`` — how long one request may wait for the cluster before it fails
  with ETIMEDOUT (librados' ``rados_osd_op_timeout``/``rados_mon_op_timeout``, and the
  connection's ``client_mount_timeout``). Default 120, the C tapdisk's request timeout;
  0 waits for ever (librados' own default).
* any other ``key=value`` is a Ceph client option set on the connection
  (``mon_host=127.0.0.1:3300``, ``rbd_cache=false``, ...), after ``conf`` and after
  ``$CEPH_ARGS``, which is applied as the Ceph tools apply it.

Values cannot contain ``:``. Examples: ``rbd:rbd/vm1``, ``rbd:rbd/base@gold``,
``rbd:rbd/vm1:conf=/run/ceph-test/ceph.conf:id=admin``.

Behaviour:

* I/O uses librbd's asynchronous calls, any number in flight. librbd completes them on
  its own threads; those only queue the result, and the event loop is woken once per
  batch (``call_soon_threadsafe``) to finish the waiting coroutines. Reads are copied
  into the caller's buffer on the loop; librbd copies writes when they are submitted
  (``rbd_disable_zero_copy_writes`` is forced on), so a cancelled caller may reuse its
  buffer at once. Two exceptions, both measured faster: reads of LARGE_READ bytes or
  more use librbd's synchronous read in a pool of threads, and threads other than the
  loop's (an NBD connection's read lane, for a client sending one request at a time)
  read with it directly (``read_blocking``): half the latency at queue depth 1.
* ``flush`` is ``rbd_aio_flush`` (librbd's write-back cache, when enabled, is written
  out and the OSDs have the data durably). A ``fua`` write is the write then a flush.
* ``write_zeroes`` is ``rbd_aio_write_zeroes`` (deallocating where librbd can when
  ``may_unmap``, else thick: zeros are written); ``discard`` is ``rbd_aio_discard``.
* ``block_status`` comes from ``rbd_diff_iterate2`` over the image and its clone
  parents (the object map's fast-diff where the image has it): written extents are DATA,
  the rest reads as zeros (ZERO). The image holds every byte it shows as far as a chain
  is concerned (``fully_allocated``): an RBD clone's parent is followed by librbd, never
  by the chain, and an rbd image is always the root of a chain (it may be the raw
  parent of a local differencing VHD: ``vhd-util snapshot -m -p rbd:pool/image``).
  ``diff_iterate`` is synchronous: block status waits for the cluster's answer.
* ``@SNAP`` opens that snapshot, always read-only (writes fail with EPERM).
* A read-write open takes the image's exclusive lock explicitly
  (``rbd_lock_acquire(EXCLUSIVE)``), so librbd will not hand it to another client on
  request: a second read-write open of the image anywhere (another tapdisk, another
  host, ``rbd-nbd``, qemu) fails with Busy (EBUSY) naming the holder, while read-only
  opens are allowed. The lock is released on close (or, for a client that died, when
  the cluster notices, after its watch timeout).
* Blocking librados/librbd calls (connect, open, lock, close) run in a worker thread: an
  unreachable cluster never blocks the event loop; ``timeout`` bounds them.

Needs Debian's ``python3-rados``/``python3-rbd``, made importable in the project's
virtual environment by ``scripts/setup.sh``. Without them the driver is registered but
opening fails with NotFound naming the missing module.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import functools
import logging
import os
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from blktap.block.driver import (
    SECTOR_SIZE,
    Alloc,
    Extent,
    FastIO,
    ImageInfo,
    OpenOptions,
    register,
)
from blktap.errors import Busy, InvalidArgument, NotFound, ReadOnly

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120
"""Seconds a request may wait for the cluster (the C tapdisk's default request timeout)."""

_KNOWN_KEYS = ("conf", "id", "keyring", "timeout")


@dataclass(frozen=True, slots=True)
class RbdTarget:
    """A parsed ``rbd:`` image string (see the module docstring)."""

    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    conf: str | None = None
    client_id: str | None = None
    keyring: str | None = None
    timeout: int = DEFAULT_TIMEOUT
    options: tuple[tuple[str, str], ...] = field(default=())
    """Other Ceph client options, in the order given."""

    @property
    def name(self) -> str:
        """``pool[/namespace]/image[@snap]``, as the ``rbd`` tool spells it."""
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snapshot}" if self.snapshot is not None else ""
        return f"{self.pool}/{ns}{self.image}{snap}"


def parse_target(path: str) -> RbdTarget:
    """Parse ``POOL[/NAMESPACE]/IMAGE[@SNAP][:key=value]...``.

    Raises InvalidArgument for an empty pool, image or snapshot name, a missing ``/``,
    an option without ``=``, a repeated option, or a timeout that is not a non-negative
    integer. Pure: reads no environment and no file.
    """
    spec, *opts = path.split(":")
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument(
            f"rbd image must be POOL/IMAGE or POOL/NAMESPACE/IMAGE, not {spec!r}")
    pool, image = parts[0], parts[-1]
    namespace = parts[1] if len(parts) == 3 else ""
    snapshot: str | None = None
    if "@" in image:
        image, snapshot = image.split("@", 1)
        if not image or not snapshot or "@" in snapshot:
            raise InvalidArgument(f"rbd image@snapshot is malformed: {spec!r}")
    values: dict[str, str] = {}
    extra: list[tuple[str, str]] = []
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not key or not value:
            raise InvalidArgument(f"rbd option must be key=value, not {opt!r} in {path!r}")
        if key in values or any(k == key for k, _ in extra):
            raise InvalidArgument(f"rbd option {key!r} given twice in {path!r}")
        if key in _KNOWN_KEYS:
            values[key] = value
        else:
            extra.append((key, value))
    timeout = DEFAULT_TIMEOUT
    if "timeout" in values:
        text = values["timeout"]
        if not text.isdigit():
            raise InvalidArgument(f"rbd timeout must be whole seconds, not {text!r}")
        timeout = int(text)
    return RbdTarget(
        pool=pool, image=image, namespace=namespace, snapshot=snapshot,
        conf=values.get("conf"), client_id=values.get("id"), keyring=values.get("keyring"),
        timeout=timeout, options=tuple(extra),
    )  # fmt: skip


def client_id_from_env(ceph_args: str) -> str | None:
    """The client id ``$CEPH_ARGS`` names (``--id X``, ``--user X``, ``--name client.X``,
    ``-n client.X``, or their ``=`` forms), or None."""
    words = shlex.split(ceph_args)
    for i, word in enumerate(words):
        key, eq, value = word.partition("=")
        if not eq:
            value = words[i + 1] if i + 1 < len(words) else ""
        if key in ("--id", "--user", "-i") and value:
            return value
        if key in ("--name", "-n") and value.startswith("client."):
            return value[len("client."):]
    return None


def _bindings() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules, imported on first use (they load librados)."""
    try:
        import rados  # type: ignore[import-not-found,unused-ignore]
        import rbd  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise NotFound(
            f"the rbd driver needs the Ceph Python bindings ({exc.name}: install python3-rbd "
            "and python3-rados and run scripts/setup.sh)") from None
    return rados, rbd


def _os_error(exc: BaseException, what: str) -> OSError:
    """A librados/librbd exception as an OSError with its errno (EIO if it has none)."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code == 0:
        code = errno.EIO
    code = abs(code)
    return OSError(code, f"{what}: {exc}")


LARGE_READ = 128 * 1024
"""Reads of this many bytes or more go to librbd's synchronous read in a pool of threads
(:func:`_large_pool`) instead of its aio call: measured here (1 MiB at queue depth 8
over NBD) about 15% more throughput. Smaller reads, and all writes (which the
asynchronous call takes without a copy of ours, and which gained nothing), stay
asynchronous."""
LARGE_READ_THREADS = 16
"""Large reads in flight at once in the process (beyond that they queue)."""
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _large_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(LARGE_READ_THREADS,
                                                      thread_name_prefix="rbd-io")
    return _pool


class _Completions:
    """Hands librbd's completions (on its threads) to the event loop.

    A librbd thread only appends ``(future, result, data)`` to a deque and, when no
    drain is pending, schedules one with ``call_soon_threadsafe``: one wake-up of the
    loop per batch, however many requests complete meanwhile. The drain runs on the loop
    and settles each future that is still waited for.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._done: collections.deque[tuple[asyncio.Future[Any], int, Any]] = (
            collections.deque())
        self._scheduled = False

    def callback(self, fut: asyncio.Future[Any]) -> Callable[..., None]:
        """The ``oncomplete`` for one request: librbd calls it as ``(completion)`` or,
        for reads, ``(completion, data)``; ``fut`` gets the return value (or the bytes
        read), or an OSError for a negative one."""
        return functools.partial(self._complete, fut)

    def _complete(self, fut: asyncio.Future[Any], completion: Any, data: Any = None) -> None:
        # On a librbd thread, holding the GIL: nothing here may block or raise.
        self._done.append((fut, completion.get_return_value(), data))
        if not self._scheduled:
            self._scheduled = True
            # RuntimeError: the loop is closed, nobody waits any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Reset before popping: a completion appended after the last pop schedules
        # another drain; one appended before it is popped here.
        self._scheduled = False
        done = self._done
        while done:
            fut, result, data = done.popleft()
            if fut.done():  # cancelled by its caller
                continue
            if result < 0:
                fut.set_exception(OSError(-result, os.strerror(-result)))
            else:
                fut.set_result(data if data is not None else result)


class RbdImage:
    """An open ``rbd`` image. Create it with :func:`open_rbd`."""

    type_name = "rbd"
    parent = None
    fully_allocated = True

    def __init__(
        self, path: str, target: RbdTarget, session: _Session, image: Any, *,
        size: int, read_only: bool,
    ) -> None:  # fmt: skip
        self.path = path
        self.target = target
        self.read_only = read_only
        self.info = ImageInfo(size=size - size % SECTOR_SIZE)
        self._session = session
        self._image = image
        self._completions = _Completions(asyncio.get_running_loop())
        self._threads: set[concurrent.futures.Future[Any]] = set()
        self._closed = False
        _, rbd = _bindings()
        self._thick = int(rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION)

    def fast_io(self) -> FastIO:
        """Blocking reads for other threads (``read_blocking``): librbd's synchronous
        read waits without the GIL and returns in the caller's thread, while the
        asynchronous path pays a librbd thread taking the GIL for the callback and a
        wake-up of the loop; for a client sending one request at a time (an NBD read
        lane) that is most of the latency. Nothing for the loop itself: every request
        is a network round trip."""
        return FastIO(read_blocking=self._read_blocking)

    def _read_blocking(self, offset: int, buf: memoryview) -> bool:
        """``rbd_read`` into a buffer of librbd's, then copied into ``buf``; in any
        thread. Raises OSError as :meth:`read`."""
        n = len(buf)
        try:
            data = self._image.read(offset, n)
        except Exception as exc:
            raise _os_error(exc, f"{self.target.name}: read of {n} bytes at {offset}") from None
        if len(data) != n:
            raise OSError(errno.EIO, f"{self.target.name}: short read of {n} bytes at {offset}")
        buf[:] = data
        return True

    # ---------------------------------------------------------------- status
    def allocation(self, offset: int, length: int) -> list[Extent]:
        """One DATA extent: the chain never looks below an rbd image (see module doc)."""
        return [Extent(offset, length, Alloc.DATA)]

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """DATA where the image (or its clone parents) holds written extents, ZERO
        elsewhere, from ``diff_iterate``; widened to whole sectors. Blocks the calling
        thread for the cluster's answer."""
        found: list[tuple[int, int]] = []

        def extent(off: int, n: int, exists: bool) -> int:
            if exists:
                found.append((off, off + n))
            return 0

        try:
            self._image.diff_iterate(offset, length, None, extent, include_parent=True)
        except Exception as exc:
            raise _os_error(exc, f"{self.target.name}: allocation") from None
        end = offset + length
        out: list[Extent] = []
        pos = offset
        for lo, hi in sorted(found):
            lo = max(offset, lo - lo % SECTOR_SIZE)
            hi = min(end, -(-hi // SECTOR_SIZE) * SECTOR_SIZE)
            if hi <= pos:
                continue
            if lo > pos:
                out.append(Extent(pos, lo - pos, Alloc.ZERO))
            else:
                lo = pos
            if out and out[-1].alloc == Alloc.DATA:
                last = out.pop()
                lo = last.offset
            out.append(Extent(lo, hi - lo, Alloc.DATA))
            pos = hi
        if pos < end:
            out.append(Extent(pos, end - pos, Alloc.ZERO))
        return out

    # ------------------------------------------------------------------ I/O
    def _submit(self, what: str, call: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            call(*args, self._completions.callback(fut))
        except Exception as exc:
            raise _os_error(exc, f"{self.target.name}: {what}") from None
        return fut

    async def _wait(self, what: str, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        except OSError as exc:
            raise OSError(exc.errno, f"{self.target.name}: {what}: {exc.strerror}") from None

    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``. Raises OSError (the cluster's errno; EIO for a
        short read). librbd reads into its own buffer: ``buf`` is only written on success,
        on the loop."""
        n = len(buf)
        what = f"read of {n} bytes at {offset}"
        if n >= LARGE_READ:
            data = await self._in_thread(what, self._image.read, offset, n)
        else:
            data = await self._wait(what, self._submit(what, self._image.aio_read, offset, n))
        if len(data) != n:
            raise OSError(errno.EIO, f"{self.target.name}: short {what} ({len(data)} bytes)")
        buf[:] = data

    async def _in_thread(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, a synchronous librbd call, in the large-read pool."""
        work = _large_pool().submit(call, *args)
        # close() waits for these: a cancelled caller's call may still be running.
        self._threads.add(work)
        work.add_done_callback(self._threads.discard)
        try:
            return await asyncio.wrap_future(work)
        except OSError:
            raise
        except Exception as exc:
            raise _os_error(exc, f"{self.target.name}: {what}") from None

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"{self.target.name}: the rbd image is open read-only")

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write ``data``; with ``fua``, flush afterwards. Raises OSError. The caller may
        reuse ``data`` as soon as this returns or is cancelled."""
        self._check_writable()
        what = f"write of {len(data)} bytes at {offset}"
        # The binding takes bytes or a bytearray (not a memoryview) and librbd copies it
        # at submission (rbd_disable_zero_copy_writes, forced on by _connect): a view of
        # a whole bytearray (an NBD payload) goes as it is.
        obj = data.obj
        payload = obj if type(obj) is bytearray and len(obj) == data.nbytes else bytes(data)
        await self._wait(what, self._submit(what, self._image.aio_write, payload, offset))
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """``rbd_aio_write_zeroes``: deallocates where it can when ``may_unmap``, else
        writes zeros (thick)."""
        self._check_writable()
        what = f"write-zeroes of {length} bytes at {offset}"
        fut = self._submit(what, self._aio_write_zeroes(0 if may_unmap else self._thick),
                           offset, length)
        await self._wait(what, fut)

    def _aio_write_zeroes(self, flags: int) -> Callable[..., Any]:
        image = self._image

        def call(offset: int, length: int, oncomplete: Callable[..., None]) -> Any:
            return image.aio_write_zeroes(offset, length, oncomplete, zero_flags=flags)

        return call

    async def discard(self, offset: int, length: int) -> None:
        """``rbd_aio_discard``: the range reads as before or as zeros afterwards."""
        self._check_writable()
        what = f"discard of {length} bytes at {offset}"
        await self._wait(what, self._submit(what, self._image.aio_discard, offset, length))

    async def flush(self) -> None:
        """``rbd_aio_flush``: every completed write is durable in the cluster. A read-only
        image is never flushed."""
        if self.read_only:
            return
        await self._wait("flush", self._submit("flush", self._image.aio_flush))

    async def close(self) -> None:
        """Close the image (librbd writes back its cache and releases the exclusive
        lock), then the connection when no other image uses it. Idempotent; in a worker
        thread. Raises OSError when the close fails; the handles are released anyway."""
        if self._closed:
            return
        self._closed = True
        image, self._image = self._image, None
        await asyncio.to_thread(_close_image, self.target.name, image, self._session,
                                list(self._threads))


def _close_image(name: str, image: Any, session: _Session,
                 threads: list[concurrent.futures.Future[Any]]) -> None:
    concurrent.futures.wait(threads)  # synchronous calls still using the image
    try:
        image.close()
    except Exception as exc:
        raise _os_error(exc, f"{name}: close") from None
    finally:
        session.release()


# --------------------------------------------------------------------- connections
@dataclass(frozen=True, slots=True)
class _SessionKey:
    conf: str | None
    client_id: str | None
    keyring: str | None
    timeout: int
    options: tuple[tuple[str, str], ...]
    ceph_args: str
    ceph_conf: str


class _Session:
    """One librados connection and its I/O contexts by pool/namespace, shared by every
    image of the process opened with the same settings; shut down with the last one."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _open: ClassVar[dict[_SessionKey, _Session]] = {}

    def __init__(self, key: _SessionKey, cluster: Any) -> None:
        self.key = key
        self.cluster = cluster
        self.users = 0
        self._ioctxs: dict[tuple[str, str], Any] = {}

    @classmethod
    def acquire(cls, target: RbdTarget) -> _Session:
        """The session for ``target``'s settings, connected (blocks; call in a worker
        thread). Raises NotFound (no ceph.conf), OSError (ETIMEDOUT: unreachable)."""
        key = _SessionKey(
            conf=target.conf, client_id=target.client_id, keyring=target.keyring,
            timeout=target.timeout, options=target.options,
            ceph_args=os.environ.get("CEPH_ARGS", ""), ceph_conf=os.environ.get("CEPH_CONF", ""),
        )  # fmt: skip
        with cls._lock:
            session = cls._open.get(key)
            if session is None:
                session = cls(key, _connect(target, key.ceph_args))
                cls._open[key] = session
            session.users += 1
            return session

    def ioctx(self, pool: str, namespace: str) -> Any:
        """The I/O context of ``pool``/``namespace`` (opened once). Raises NotFound."""
        rados, _ = _bindings()
        with self._lock:
            ctx = self._ioctxs.get((pool, namespace))
            if ctx is None:
                try:
                    ctx = self.cluster.open_ioctx(pool)
                except rados.ObjectNotFound:
                    raise NotFound(f"rbd: pool {pool!r} does not exist") from None
                if namespace:
                    ctx.set_namespace(namespace)
                self._ioctxs[(pool, namespace)] = ctx
            return ctx

    def release(self) -> None:
        """One image fewer; the last one closes the I/O contexts and the connection."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            del self._open[self.key]
            ctxs = list(self._ioctxs.values())
            self._ioctxs.clear()
        for ctx in ctxs:
            ctx.close()
        self.cluster.shutdown()


def _connect(target: RbdTarget, ceph_args: str) -> Any:
    rados, _ = _bindings()
    client_id = target.client_id or client_id_from_env(ceph_args)
    conf: dict[str, str] = {}
    if target.keyring:
        conf["keyring"] = target.keyring
    if target.timeout:
        seconds = str(target.timeout)
        conf.update(rados_osd_op_timeout=seconds, rados_mon_op_timeout=seconds,
                    client_mount_timeout=seconds)
    try:
        cluster = rados.Rados(rados_id=client_id, conffile=target.conf or "")
    except rados.ObjectNotFound:
        where = target.conf or os.environ.get("CEPH_CONF") or "/etc/ceph/ceph.conf"
        raise NotFound(f"rbd: no Ceph configuration at {where} (set CEPH_CONF or "
                       "conf= in the image string)") from None
    except Exception as exc:
        raise _os_error(exc, "rbd: reading the Ceph configuration") from None
    try:
        if ceph_args:
            cluster.conf_parse_env("CEPH_ARGS")
        # Writes are handed over as the caller's buffers: librbd must copy them at
        # submission (its default), whatever the string or ceph.conf says.
        forced = {"rbd_disable_zero_copy_writes": "true"}
        for key, value in (*conf.items(), *target.options, *forced.items()):
            try:
                cluster.conf_set(key, value)
            except Exception as exc:
                raise InvalidArgument(f"rbd: Ceph option {key}={value!r}: {exc}") from None
        cluster.connect(timeout=target.timeout or 0)
    except BaseException as exc:
        cluster.shutdown()
        if isinstance(exc, (InvalidArgument, KeyboardInterrupt, SystemExit)):
            raise
        raise _os_error(exc, "rbd: connecting to the Ceph cluster") from None
    return cluster


def _open_blocking(path: str, target: RbdTarget, read_only: bool) -> tuple[_Session, Any, int]:
    """Connect, open the image and, read-write, take its exclusive lock. Returns the
    session, the librbd image and its size. Everything is released on failure."""
    rados, rbd = _bindings()
    session = _Session.acquire(target)
    image: Any = None
    try:
        ioctx = session.ioctx(target.pool, target.namespace)
        try:
            image = rbd.Image(ioctx, target.image, snapshot=target.snapshot,
                              read_only=read_only)
        except rbd.ImageNotFound:
            what = f"snapshot {target.name}" if target.snapshot else f"image {target.name}"
            raise NotFound(f"rbd: {what} does not exist") from None
        if not read_only:
            try:
                image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            except (rbd.ReadOnlyImage, rbd.ImageBusy) as exc:
                owners = _lock_owners(image)
                raise Busy(
                    f"rbd: image {target.name} is open read-write by another client"
                    f"{' (' + owners + ')' if owners else ''}; open it read-only or close "
                    f"it there first ({exc})") from None
        size = int(image.size())
    except (rbd.Error, rados.Error) as exc:
        _release(image, session)
        raise _os_error(exc, f"rbd: opening {target.name}") from None
    except BaseException:
        _release(image, session)
        raise
    return session, image, size


def _release(image: Any, session: _Session) -> None:
    try:
        if image is not None:
            image.close()
    finally:
        session.release()


def _lock_owners(image: Any) -> str:
    try:
        return ", ".join(str(owner["owner"]) for owner in image.lock_get_owners())
    except Exception:
        return ""


async def open_rbd(path: str, options: OpenOptions) -> RbdImage:
    """Open ``rbd:path`` (see the module docstring for the syntax).

    Raises InvalidArgument (malformed string, unknown Ceph option), NotFound (bindings,
    configuration, pool, image or snapshot missing), Busy (another client holds the
    image read-write), OSError (the cluster's errno; ETIMEDOUT when unreachable within
    ``timeout``). A snapshot is always opened read-only. Nothing stays open after a
    failure. ``options.direct`` is ignored (librbd has no page cache to bypass).
    """
    target = parse_target(path)
    _bindings()
    read_only = options.read_only or target.snapshot is not None
    try:
        session, image, size = await asyncio.to_thread(_open_blocking, path, target, read_only)
    except OSError as exc:
        if exc.errno == errno.EROFS and not read_only:
            raise ReadOnly(f"rbd: {target.name} cannot be opened read-write: {exc}") from None
        raise
    log.debug("rbd: opened %s size=%d%s", target.name, size, " read-only" if read_only else "")
    return RbdImage(path, target, session, image, size=size, read_only=read_only)


register("rbd", open_rbd)
