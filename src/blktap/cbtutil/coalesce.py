"""``cbt-util coalesce -p PARENT -c CHILD``: OR a parent log's bitmap into its child's."""

from __future__ import annotations

from blktap.cbtutil.logfile import open_log, read_log, sync, write_changed
from blktap.proto import cbt


def coalesce(parent_path: str, child_path: str) -> cbt.CbtLog:
    """Set in the child log every bit set in the parent log; return the child's new log.

    Only the child's bitmap changes (its header is kept). Raises LogOpenError, the
    :class:`blktap.proto.cbt.CbtLogError` subclasses for either file, and InvalidArgument
    when the parent's bitmap is larger than the child's (the C tool's refusal; nothing is
    written then). Durable when this returns; only the bytes that gain bits are written.
    """
    with open_log(parent_path) as pfd:
        parent = read_log(pfd, parent_path)
    with open_log(child_path, writable=True) as cfd:
        child = read_log(cfd, child_path)
        merged = cbt.coalesced(parent, child)
        write_changed(cfd, child.bitmap, merged.bitmap, cbt.HEADER_SIZE)
        sync(cfd)
        return merged
