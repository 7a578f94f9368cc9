"""The operations of ``vhd-util``, one module per verb or group of verbs.

Every function here takes paths and plain values, returns values (or bytes/lines to
print) and raises :class:`blktap.errors.BlktapError` subclasses or ``OSError``; nothing
here parses argv or prints (``blktap.cli.vhd_util`` does). Built on the VHD library in
:mod:`blktap.vhd` and the codecs in :mod:`blktap.proto.vhd`.

Modules: :mod:`.common` (footer rewriting, block allocation helpers), :mod:`.reader`
(reading a chain's virtual disk), :mod:`.progress`, :mod:`.create` (create, snapshot),
:mod:`.query`, :mod:`.setfield`, :mod:`.dump` (read), :mod:`.check`, :mod:`.repair`,
:mod:`.journal` (resize journals, revert), :mod:`.resize`, :mod:`.fill`,
:mod:`.coalesce`, :mod:`.modify`, :mod:`.scan`, :mod:`.key` (key hashes), :mod:`.copy`.
"""
