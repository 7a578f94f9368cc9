"""What an open (and create) asks of tapdisk: the image string and the OPEN flags."""

from __future__ import annotations

from dataclasses import dataclass

from blktap.errors import InvalidArgument
from blktap.proto import control as ctl
from blktap.proto.tcp_export import TcpExport

__all__ = ["ImageInfo", "OpenOptions", "check_name", "split_image"]


def check_name(what: str, text: str) -> None:
    """Raise :class:`InvalidArgument` if ``text`` (an image, secondary or log path) holds
    a control character: a newline would forge lines of ``list``'s one-VBD-per-line
    output. tapdisk refuses them too."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidArgument(f"{what} {text!r}: control characters are not allowed")


def split_image(image: str) -> tuple[str, str]:
    """Split ``"type:/path"`` at the first colon. Raises :class:`InvalidArgument` if the
    type or the path is empty or there is no colon."""
    kind, sep, path = image.partition(":")
    if not sep or not kind or not path:
        raise InvalidArgument(f"image {image!r} is not of the form type:/path")
    return kind, path


@dataclass(frozen=True)
class OpenOptions:
    """Options of ``tap-ctl open``/``create``, each mapped to the C OPEN flag it sets.

    ``read_only`` (-R, RDONLY); ``parent_minor`` (-e, REUSE_PRT with prt_devnum);
    ``local_cache`` (-r, ADD_LCACHE, as the C tap-ctl maps -r); ``secondary`` (-2,
    SECONDARY); ``standby`` (-s, STANDBY); ``request_timeout_s`` (-t, req_timeout);
    ``no_o_direct`` (-D, NO_O_DIRECT); ``log_path`` (-C, ADD_LOG); ``key`` (-E,
    OPEN_ENCRYPTED); ``shared`` (SHARED); ``extra_flags`` for any other flag.
    ``export`` (``--export-tcp`` and its TLS options) sets no flag: the C OPEN has no
    field for it, so it travels in a file beside the OPEN (:mod:`blktap.proto.tcp_export`).
    """

    read_only: bool = False
    parent_minor: int | None = None
    local_cache: bool = False
    secondary: str | None = None
    standby: bool = False
    request_timeout_s: int = 0
    no_o_direct: bool = False
    log_path: str | None = None
    key: bytes | None = None
    shared: bool = False
    extra_flags: ctl.OpenFlag = ctl.OpenFlag(0)  # noqa: RUF009 - an immutable enum value
    export: TcpExport | None = None

    @property
    def flags(self) -> ctl.OpenFlag:
        """The OPEN flags these options set."""
        F = ctl.OpenFlag
        flags = self.extra_flags
        for wanted, flag in (
            (self.read_only, F.RDONLY),
            (self.parent_minor is not None, F.REUSE_PRT),
            (self.local_cache, F.ADD_LCACHE),
            (self.secondary is not None, F.SECONDARY),
            (self.standby, F.STANDBY),
            (self.no_o_direct, F.NO_O_DIRECT),
            (self.log_path is not None, F.ADD_LOG),
            (self.key is not None, F.OPEN_ENCRYPTED),
            (self.shared, F.SHARED),
        ):
            if wanted:
                flags |= flag
        return flags

    def request(self, minor: int, image: str) -> ctl.Request:
        """The OPEN request for VBD ``minor`` and ``image``; :class:`InvalidArgument` if a
        value does not fit the message (a path of 256 bytes or more, a bad key size, a
        control character in a name...)."""
        check_name("image", image)
        check_name("secondary image", self.secondary or "")
        check_name("log path", self.log_path or "")
        params = ctl.Params(
            flags=self.flags,
            devnum=minor,
            path=image,
            prt_devnum=ctl.NO_PARENT if self.parent_minor is None else self.parent_minor,
            req_timeout=self.request_timeout_s,
            secondary=self.secondary or "",
        )
        req = ctl.Request(
            message=ctl.request(ctl.MessageType.OPEN, minor, params),
            log_path=self.log_path,
            key=self.key,
        )
        ctl.encode_request(req)  # validate now
        return req


@dataclass(frozen=True)
class ImageInfo:
    """What OPEN answered: the size of the opened image."""

    sectors: int
    sector_size: int
    info: int

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.sectors * self.sector_size
