"""A VBD's TCP export settings and how tap-ctl hands them to tapdisk.

The C OPEN message has no field for them, and the C tap-ctl must keep working, so the
settings travel beside it: before OPEN, tap-ctl writes ``<run>/tapdisk/export-<minor>.json``
(mode 0600, in the minors directory, which only the run directory's owner can write);
tapdisk's NBD frontend reads and removes it during that OPEN (only a file owned by its own
uid), and tap-ctl removes it when OPEN has answered if it is still there. A C tap-ctl never writes
one, so its OPEN exports on the Unix socket alone, as before.

Format: a JSON object ``{"tcp": "HOST:PORT", "tls_creds": DIR|null, "tls_psk":
FILE|null, "tls_verify_client": bool}``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from blktap.errors import InvalidArgument

__all__ = ["TcpExport", "config_path", "parse_address", "read_config"]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for an IPv6 address) as (host, port). HOST is an IP
    address (binding to a name could bind to more than the one address asked for); PORT
    is 1..65535. Raises :class:`InvalidArgument` naming what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text:
        raise InvalidArgument(f"export address {text!r} is not of the form HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # "::1:10809" could as well be an address without a port
        raise InvalidArgument(f"export address {text!r}: {host!r} is not an IP address "
                              "(IPv6 as [ADDR]:PORT)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgument(f"export address {text!r}: {host!r} is not an IP address "
                              "(IPv6 as [ADDR]:PORT)") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidArgument(f"export address {text!r}: port {port_text!r} is not "
                              "a number from 1 to 65535")
    return host, int(port_text)


@dataclass(frozen=True)
class TcpExport:
    """Export on TCP ``address`` (``HOST:PORT``), with TLS when ``tls_creds`` (an X.509
    directory: ca-cert.pem, server-cert.pem, server-key.pem) or ``tls_psk`` (a PSK file)
    is set; ``tls_verify_client`` demands client certificates signed by ca-cert.pem."""

    address: str
    tls_creds: str | None = None
    tls_psk: str | None = None
    tls_verify_client: bool = False

    def __post_init__(self) -> None:
        parse_address(self.address)
        if self.tls_creds is not None and self.tls_psk is not None:
            raise InvalidArgument("--tls-creds and --tls-psk exclude each other")
        if self.tls_verify_client and self.tls_creds is None:
            raise InvalidArgument("--tls-verify-client needs --tls-creds")

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_address(self.address)

    @property
    def tls(self) -> str | None:
        """``"x509"``, ``"psk"`` or None (plain TCP)."""
        return "x509" if self.tls_creds else "psk" if self.tls_psk else None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_doc(cls, doc: Any) -> TcpExport:
        """From the JSON object ``to_json`` makes; :class:`InvalidArgument` otherwise."""
        if not isinstance(doc, dict) or not isinstance(doc.get("address"), str):
            raise InvalidArgument("export settings: not an object with an address")
        try:
            return cls(address=doc["address"], tls_creds=doc.get("tls_creds"),
                       tls_psk=doc.get("tls_psk"),
                       tls_verify_client=bool(doc.get("tls_verify_client", False)))
        except TypeError as exc:
            raise InvalidArgument(f"export settings: {exc}") from None


def config_path(minors_dir: str, minor: int) -> str:
    """Where tap-ctl leaves the settings of ``minor``'s OPEN."""
    return os.path.join(minors_dir, f"export-{minor}.json")


def write_config(minors_dir: str, minor: int, export: TcpExport) -> str:
    """Write the settings for the next OPEN of ``minor`` (mode 0600, replacing any
    leftover); return the path, which the caller removes once OPEN has answered."""
    path = config_path(minors_dir, minor)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, export.to_json().encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_config(minors_dir: str, minor: int) -> TcpExport | None:
    """The settings tap-ctl left for this OPEN of ``minor``, or None (no file: the Unix
    socket alone). The file is removed once read: it is for one OPEN (a tap-ctl killed
    before it could remove it must not leave a TCP export to a later C tap-ctl's OPEN).
    A file not owned by this process's uid, or one that does not parse, is refused with
    :class:`InvalidArgument`."""
    path = config_path(minors_dir, minor)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidArgument(f"{path}: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise InvalidArgument(f"{path}: not owned by tapdisk's user; refused")
        raw = os.read(fd, 65536)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{path}: not JSON: {exc}") from None
    return TcpExport.from_doc(doc)
