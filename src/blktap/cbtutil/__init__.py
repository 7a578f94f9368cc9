"""The operations of ``cbt-util``: create, read, set and coalesce changed block tracking
logs (``.cbtlog``), byte-compatible with the C blktap's tool.

Every function here takes paths and plain values, returns values and raises
:class:`blktap.errors.BlktapError` subclasses; nothing here parses argv or prints
(``blktap.cli.cbt_util`` does). Built on the codec in :mod:`blktap.proto.cbt`.

Modules: :mod:`.logfile` (opening, reading and durably rewriting a log file),
:mod:`.create`, :mod:`.query` (get), :mod:`.setfield` (set, including growing the bitmap),
:mod:`.coalesce`.

A log may be open in a running tapdisk (the ``log`` layer, or the C filter's shared
memory map) while these run: every change is written in place with ``pwrite`` (coherent
with a shared map) and only the bytes that change are written; nothing is replaced by
renaming.
"""
