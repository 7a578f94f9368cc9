"""Helpers for the VHD tests: the reference fixtures and their manifest, copies, and
running the external peers (qemu-img, qemu-io, vhdiinfo)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from tests.reference_data import reference_dir

FIXTURES = reference_dir("vhd")  # the C-made reference VHD images (tests/data/vhd.tar.xz)

T = TypeVar("T")


def manifest() -> list[dict[str, Any]]:
    with open(FIXTURES / "manifest.json") as f:
        images: list[dict[str, Any]] = json.load(f)["images"]
    return images


MANIFEST = manifest()
VHD_FILES = [m["file"] for m in MANIFEST]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def copy_fixtures(dest: Path) -> Path:
    """Copy every fixture into ``dest`` (writable), keeping relative parent links."""
    for name in os.listdir(FIXTURES):
        target = dest / name
        shutil.copyfile(FIXTURES / name, target)
        target.chmod(0o644)
    return dest


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (the project's setup installs it)")
    return path


def tool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    need(args[0])
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


async def chain_bytes(path: str, type_name: str = "vhd") -> bytes:
    chain = await Chain.open(type_name, path, OpenOptions(read_only=True))
    try:
        buf = bytearray(chain.size)
        await chain.read(0, memoryview(buf))
        return bytes(buf)
    finally:
        await chain.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_state(path: str | Path) -> tuple[str, int, int]:
    """(sha256 of the bytes, mtime_ns, size): what 'nothing was written' compares."""
    data = Path(path).read_bytes()
    st = os.stat(path)
    return sha256(data), st.st_mtime_ns, st.st_size
