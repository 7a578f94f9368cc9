"""Built-in image drivers. Each module calls ``blktap.block.driver.register`` on import."""

from __future__ import annotations

import importlib

BUILTIN = ("ram", "aio", "vhd", "rbd", "nbd")


def load_all() -> None:
    for name in BUILTIN:
        try:
            importlib.import_module(f"blktap.block.drivers.{name}")
        except ModuleNotFoundError as exc:
            # A driver still being written is simply absent from the registry.
            if exc.name != f"blktap.block.drivers.{name}":
                raise
