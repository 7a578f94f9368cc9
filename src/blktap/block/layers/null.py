"""``null``: the layer that changes nothing (nbdkit's ``nofilter``).

Proves the layer mechanism: ``null:aio:/path`` must serve, list and count exactly as
``aio:/path``, and as fast, since it narrows no capability (every fast route stays, so
most requests never reach it). Requests that do reach it pass through unchanged.
"""

from __future__ import annotations

from blktap.block.layer import Layer, register


class NullLayer(Layer):
    """Passes everything to ``next``."""

    name = "null"


register("null", NullLayer.open)
