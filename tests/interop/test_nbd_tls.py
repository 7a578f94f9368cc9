"""TCP and TLS exports (``tap-ctl create --export-tcp``, ``--tls-creds``) against real
clients: nbdinfo, nbdcopy (libnbd), qemu-img and qemu-io (``tls-creds-x509``).

Certificates are made here with openssl: a CA, a server certificate for 127.0.0.1, ::1
and localhost, a client certificate, and a second CA with its own client certificate (the
wrong credentials). Every export binds to the loopback address only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blktap.block.driver import OpenOptions
from blktap.errors import ProtocolError
from blktap.frontends.nbd_listen import TlsListener, tls_context
from blktap.frontends.nbd_server import NbdServer
from blktap.proto import nbd
from blktap.vbd import VBD, ImageSpec
from tests.helpers import TAP_CTL

TOOLS = ("openssl", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io")
_missing = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"tools missing: {_missing}")

SIZE = 16 * 1024 * 1024


def run(*argv: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {proc.stderr}"
    return proc


def _openssl(*args: str) -> None:
    run("openssl", *args)


def _make_ca(d: Path, name: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"),
             "-subj", f"/CN={name}")


def _issue(ca: Path, out: Path, stem: str, cn: str, ext: str) -> None:
    """Write ``<stem>-key.pem`` and ``<stem>-cert.pem`` in ``out``, signed by ``ca``."""
    out.mkdir(parents=True, exist_ok=True)
    csr, extfile = out / f"{stem}.csr", out / f"{stem}.ext"
    extfile.write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(out / f"{stem}-key.pem"),
             "-out", str(csr), "-subj", f"/CN={cn}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca-cert.pem"),
             "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "2",
             "-out", str(out / f"{stem}-cert.pem"), "-extfile", str(extfile))


class Creds:
    """server/: the export's directory; client/: a client of the same CA; wrong/: a
    client whose CA and certificate are another's; anon/: the CA alone (no client
    certificate)."""

    def __init__(self, base: Path) -> None:
        self.server, self.client = base / "server", base / "client"
        self.wrong, self.anon = base / "wrong", base / "anon"
        ca, other = base / "ca", base / "other-ca"
        _make_ca(ca, "blktap test CA")
        _make_ca(other, "another CA")
        _issue(ca, self.server, "server", "localhost",
               "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        _issue(ca, self.client, "client", "client", "extendedKeyUsage=clientAuth\n")
        _issue(other, self.wrong, "client", "intruder", "extendedKeyUsage=clientAuth\n")
        self.anon.mkdir()
        for d in (self.server, self.client, self.anon):
            shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")
        shutil.copy(other / "ca-cert.pem", self.wrong / "ca-cert.pem")

    @staticmethod
    def uri(port: int, creds: Path) -> str:
        return f"nbds://127.0.0.1:{port}/?tls-certificates={creds}"


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    return Creds(tmp_path_factory.mktemp("tls"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Export:
    def __init__(self, image: Path, *args: str) -> None:
        self.port = free_port()
        self.proc = run(TAP_CTL, "create", "-a", f"aio:{image}",
                        "--export-tcp", f"127.0.0.1:{self.port}", *args, check=False)
        self.entry: dict[str, object] = {}
        if self.proc.returncode == 0:
            [self.entry] = json.loads(run(TAP_CTL, "list", "--json").stdout)

    def destroy(self) -> None:
        if self.entry:
            run(TAP_CTL, "destroy", "-p", str(self.entry["pid"]), "-m", str(self.entry["minor"]))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def export(run_dir: str, image: Path) -> Iterator[Callable[..., Export]]:
    made: list[Export] = []

    def make(*args: str) -> Export:
        e = Export(image, *args)
        made.append(e)
        assert e.proc.returncode == 0, e.proc.stderr
        return e

    yield make
    for e in made:
        e.destroy()


# ------------------------------------------------------------------------ clients
def test_nbdinfo_over_tls_and_list_shows_address(export: Callable[..., Export],
                                                 creds: Creds) -> None:
    e = export("--tls-creds", str(creds.server))
    assert e.entry["nbd_tcp"] == {"address": f"127.0.0.1:{e.port}", "tls": "x509",
                                  "verify_client": False}
    info = json.loads(run("nbdinfo", "--json", Creds.uri(e.port, creds.anon)).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == SIZE
    # The settings file was for that OPEN alone.
    assert not [n for n in os.listdir(os.path.join(os.environ["BLKTAP_RUN_DIR"], "tapdisk"))
                if n.startswith("export-")]


def test_nbdcopy_both_ways_over_tls(export: Callable[..., Export], creds: Creds, image: Path,
                                    tmp_path: Path) -> None:
    e = export("--tls-creds", str(creds.server))
    uri = Creds.uri(e.port, creds.anon)
    back = tmp_path / "back.raw"
    run("nbdcopy", uri, str(back))
    assert back.read_bytes() == image.read_bytes()
    new = tmp_path / "new.raw"
    data = os.urandom(SIZE)
    new.write_bytes(data)
    run("nbdcopy", str(new), uri)
    run("nbdcopy", uri, str(back))
    assert back.read_bytes() == data


def test_qemu_io_and_qemu_img_over_tls(export: Callable[..., Export], creds: Creds,
                                       image: Path) -> None:
    e = export("--tls-creds", str(creds.server), "--tls-verify-client")
    obj = f"tls-creds-x509,id=tls0,dir={creds.client},endpoint=client"
    opts = f"driver=nbd,host=127.0.0.1,port={e.port},tls-creds=tls0"
    run("qemu-io", "--object", obj, "--image-opts", opts,
        "-c", "write -P 0x5a 1M 256k", "-c", "flush")
    out = run("qemu-io", "--object", obj, "--image-opts", "-r", opts,
              "-c", "read -P 0x5a 1M 256k").stdout
    assert "read 262144/262144" in out
    with image.open("rb") as f:
        f.seek(1 << 20)
        assert f.read(256 * 1024) == b"\x5a" * 256 * 1024
    out = run("qemu-img", "compare", "--object", obj, "--image-opts",
              f"driver=file,filename={image}", opts).stdout
    assert "identical" in out


def test_plain_tcp_export_with_qemu_img(export: Callable[..., Export], image: Path) -> None:
    e = export()
    assert e.entry["nbd_tcp"] == {"address": f"127.0.0.1:{e.port}", "tls": None,
                                  "verify_client": False}
    out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image),
              f"nbd://127.0.0.1:{e.port}").stdout
    assert "identical" in out


# ---------------------------------------------------------------------- refusals
def test_clients_without_the_right_credentials_are_refused(export: Callable[..., Export],
                                                           creds: Creds) -> None:
    e = export("--tls-creds", str(creds.server), "--tls-verify-client")
    # A plain client: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD.
    plain = run("qemu-img", "info", f"nbd://127.0.0.1:{e.port}", check=False)
    assert plain.returncode != 0 and "TLS" in plain.stderr
    plain = run("nbdinfo", f"nbd://127.0.0.1:{e.port}", check=False)
    assert plain.returncode != 0
    # No client certificate while verification is demanded.
    anon = run("nbdinfo", "--size", Creds.uri(e.port, creds.anon), check=False)
    assert anon.returncode != 0, anon.stdout
    # A certificate (and CA) of another authority: neither side trusts the other.
    wrong = run("nbdinfo", "--size", Creds.uri(e.port, creds.wrong), check=False)
    assert wrong.returncode != 0, wrong.stdout
    obj = f"tls-creds-x509,id=tls0,dir={creds.wrong},endpoint=client"
    wrong = run("qemu-img", "info", "--object", obj, "--image-opts",
                f"driver=nbd,host=127.0.0.1,port={e.port},tls-creds=tls0", check=False)
    assert wrong.returncode != 0
    # The right client certificate passes, and the export is still there.
    assert run("nbdinfo", "--size", Creds.uri(e.port, creds.client)).stdout.strip() == str(SIZE)


def test_wrong_ca_client_refuses_the_server(export: Callable[..., Export], creds: Creds) -> None:
    e = export("--tls-creds", str(creds.server))
    wrong = run("nbdinfo", "--size", Creds.uri(e.port, creds.wrong), check=False)
    assert wrong.returncode != 0
    assert run("nbdinfo", "--size", Creds.uri(e.port, creds.anon)).stdout.strip() == str(SIZE)


# --------------------------------------------------------------------- bad input
def _create_fails(image: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = run(TAP_CTL, "create", "-a", f"aio:{image}", *args, check=False)
    assert proc.returncode != 0
    assert json.loads(run(TAP_CTL, "list", "--json").stdout) == []  # nothing left behind
    return proc


def test_bad_certificate_file(run_dir: str, creds: Creds, image: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(creds.server, bad)
    (bad / "server-cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    proc = _create_fails(image, "--export-tcp", f"127.0.0.1:{free_port()}",
                         "--tls-creds", str(bad))
    assert proc.returncode == 22
    assert f"{bad}/server-cert.pem" in proc.stderr and "do not load" in proc.stderr
    (bad / "server-cert.pem").unlink()
    proc = _create_fails(image, "--export-tcp", f"127.0.0.1:{free_port()}",
                         "--tls-creds", str(bad))
    assert proc.returncode == 2 and f"{bad}/server-cert.pem is missing" in proc.stderr


def test_port_in_use(run_dir: str, image: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = _create_fails(image, "--export-tcp", f"127.0.0.1:{port}")
    assert proc.returncode == 98
    assert f"cannot listen on TCP 127.0.0.1:{port}: Address already in use" in proc.stderr


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "not of the form HOST:PORT"),
    ("127.0.0.1:0", "is not a number from 1 to 65535"),
    ("127.0.0.1:70000", "is not a number from 1 to 65535"),
    ("localhost:10809", "is not an IP address"),
    ("::1:10809", "is not an IP address"),
])
def test_bad_address(run_dir: str, image: Path, address: str, why: str) -> None:
    proc = _create_fails(image, "--export-tcp", address)
    assert proc.returncode == 22 and why in proc.stderr


def test_tls_options_need_an_address_and_psk_is_refused(run_dir: str, creds: Creds,
                                                        image: Path) -> None:
    proc = _create_fails(image, "--tls-creds", str(creds.server))
    assert proc.returncode == 22 and "need --export-tcp" in proc.stderr
    psk = image.parent / "keys.psk"
    psk.write_text("alice:" + "ab" * 32 + "\n")
    proc = _create_fails(image, "--export-tcp", f"127.0.0.1:{free_port()}", "--tls-psk", str(psk))
    assert proc.returncode == 95 and "TLS-PSK is not available" in proc.stderr


def test_ipv6_loopback(export: Callable[..., Export], creds: Creds) -> None:
    if not socket.has_ipv6 or not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6")
    port = free_port()
    image = Path(os.environ["BLKTAP_RUN_DIR"]) / "v6.raw"
    image.write_bytes(bytes(SIZE))
    proc = run(TAP_CTL, "create", "-a", f"aio:{image}", "--export-tcp", f"[::1]:{port}",
               "--tls-creds", str(creds.server))
    [entry] = json.loads(run(TAP_CTL, "list", "--json").stdout)
    try:
        assert proc.returncode == 0
        assert entry["nbd_tcp"]["address"] == f"[::1]:{port}"
        out = run("nbdinfo", "--size", f"nbds://[::1]:{port}/?tls-certificates={creds.anon}")
        assert out.stdout.strip() == str(SIZE)
    finally:
        run(TAP_CTL, "destroy", "-p", str(entry["pid"]), "-m", str(entry["minor"]))


# ------------------------------------------------------------ no raw shortcuts
def test_tls_turns_off_lanes_and_writev(creds: Creds, image: Path, tmp_path: Path) -> None:
    """Under TLS no connection gets the raw descriptor: large sequential reads and writes
    (which start lanes on a plain socket) are all served through the TLS transport. This
    server runs on asyncio's own loop, whose TLS layer passes on data before start_tls
    returns; the tapdisks of the other tests run uvloop's."""

    async def main() -> tuple[int, int, int, list[int]]:
        vbd = VBD(0)
        await vbd.open(ImageSpec.parse(f"aio:{image}"), OpenOptions(direct=False))
        server = NbdServer(vbd, str(tmp_path / "sock"), tcp=("127.0.0.1", 0),
                           tls=tls_context(str(creds.server)))
        await server.start()
        fds: list[int] = []
        try:
            assert server.tcp_port is not None
            uri = Creds.uri(server.tcp_port, creds.anon)
            for argv in (["nbdcopy", "--requests=8", uri, str(tmp_path / "out.raw")],
                         ["nbdcopy", "--requests=8", str(image), uri]):
                proc = await asyncio.create_subprocess_exec(*argv)
                while proc.returncode is None:
                    fds += [c._fd for c in server._conns]
                    await asyncio.sleep(0.001)  # a copy may take only a few ms
                assert await proc.wait() == 0
            stats = server.statistics()
            return stats.reads, stats.lane_reads, stats.lane_writes, fds
        finally:
            await server.stop()
            await vbd.close()

    reads, lane_reads, lane_writes, fds = asyncio.run(main())
    assert reads > 0
    assert (lane_reads, lane_writes) == (0, 0)
    assert fds and set(fds) == {-1}
    assert TlsListener.raw_descriptor is False
    assert (tmp_path / "out.raw").read_bytes() == image.read_bytes()


# ------------------------------------------------------------------ the codec
def _option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data


def _replies(codec: nbd.ServerCodec) -> list[tuple[int, int]]:
    """(option, reply type) of each option reply in the codec's output; clears it."""
    out, found = bytes(codec.output), []
    codec.output.clear()
    while out:
        _magic, option, rep, length = struct.unpack_from(">QIII", out)
        found.append((option, rep))
        out = out[20 + length:]
    return found


def test_codec_starttls_rules() -> None:
    flags = struct.pack(">I", nbd.ClientFlag.FIXED_NEWSTYLE | nbd.ClientFlag.NO_ZEROES)
    go = struct.pack(">IH", 0, 0)
    Opt, R = nbd.Option, nbd.Rep
    codec = nbd.ServerCodec(nbd.ExportInfo(size=SIZE), tls_required=True)
    # Before TLS: everything but STARTTLS and ABORT is refused with ERR_TLS_REQD.
    assert codec.feed(flags + _option(Opt.STRUCTURED_REPLY) + _option(Opt.LIST)
                      + _option(Opt.GO, go) + _option(Opt.STARTTLS, b"x")) == []
    assert _replies(codec) == [(Opt.STRUCTURED_REPLY, R.ERR_TLS_REQD), (Opt.LIST, R.ERR_TLS_REQD),
                               (Opt.GO, R.ERR_TLS_REQD), (Opt.STARTTLS, R.ERR_INVALID)]
    assert not codec.structured
    assert codec.feed(_option(Opt.STARTTLS)) == [nbd.StartTls()]
    assert _replies(codec) == [(Opt.STARTTLS, R.ACK)]
    codec.tls_started()
    # Haggling starts over; a second STARTTLS is invalid.
    events = codec.feed(_option(Opt.STARTTLS) + _option(Opt.STRUCTURED_REPLY) + _option(Opt.GO, go))
    assert [type(e) for e in events] == [nbd.Negotiated]
    assert [r for _o, r in _replies(codec)] == [R.ERR_INVALID, R.ACK, R.INFO, R.ACK]
    assert codec.structured
    # EXPORT_NAME before TLS cannot be answered: the server hangs up.
    codec = nbd.ServerCodec(nbd.ExportInfo(size=SIZE), tls_required=True)
    with pytest.raises(ProtocolError, match="before TLS"):
        codec.feed(flags + _option(Opt.EXPORT_NAME))
    # Bytes after STARTTLS in the same read as it (not yet TLS) are a protocol error.
    codec = nbd.ServerCodec(nbd.ExportInfo(size=SIZE), tls_required=True)
    with pytest.raises(ProtocolError, match="STARTTLS"):
        codec.feed(flags + _option(Opt.STARTTLS) + b"\x16\x03\x01")
    # Without TLS configured STARTTLS is unsupported and the rest goes on as before.
    codec = nbd.ServerCodec(nbd.ExportInfo(size=SIZE))
    codec.feed(flags + _option(Opt.STARTTLS) + _option(Opt.LIST))
    assert [r for _o, r in _replies(codec)] == [R.ERR_UNSUP, R.SERVER, R.ACK]


def test_supervised_restart_keeps_the_tls_export(run_dir: str, creds: Creds,
                                                 image: Path) -> None:
    """A supervisor repeats the OPEN, export settings included, after a crash."""
    port = free_port()
    run(TAP_CTL, "create", "--supervise", "-a", f"aio:{image}",
        "--export-tcp", f"127.0.0.1:{port}", "--tls-creds", str(creds.server))
    [entry] = json.loads(run(TAP_CTL, "list", "--json").stdout)
    first = int(str(entry["pid"]))
    try:
        os.kill(first, 9)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            docs = json.loads(run(TAP_CTL, "list", "--json").stdout)
            pids = [d["pid"] for d in docs if d["pid"] not in (None, first)]
            if pids and docs[0].get("nbd_tcp"):
                entry = docs[0]
                break
            time.sleep(0.2)
        assert entry["pid"] != first, "the supervisor did not restart the tapdisk"
        assert entry["nbd_tcp"] == {"address": f"127.0.0.1:{port}", "tls": "x509",
                                    "verify_client": False}
        out = run("nbdinfo", "--size", Creds.uri(port, creds.anon)).stdout
        assert out.strip() == str(SIZE)
    finally:
        run(TAP_CTL, "destroy", "-p", str(entry["pid"]), "-m", str(entry["minor"]), check=False)


def test_tap_ctl_open_and_the_library_export_tcp(run_dir: str, image: Path) -> None:
    """``tap-ctl open --export-tcp`` and ``Control.create`` with ``OpenOptions.export``."""
    from blktap.control import Control, OpenOptions, TcpExport

    pid = run(TAP_CTL, "spawn").stdout.strip()
    minor = run(TAP_CTL, "allocate").stdout.strip().rsplit("-", 1)[1]
    run(TAP_CTL, "attach", "-p", pid, "-m", minor)
    port = free_port()
    run(TAP_CTL, "open", "-p", pid, "-m", minor, "-a", f"aio:{image}",
        "--export-tcp", f"127.0.0.1:{port}")
    out = run("qemu-img", "info", "--output=json", f"nbd://127.0.0.1:{port}").stdout
    assert json.loads(out)["virtual-size"] == SIZE
    run(TAP_CTL, "destroy", "-p", pid, "-m", minor)
    ctl = Control()
    port = free_port()
    created = ctl.create(f"aio:{image}", OpenOptions(export=TcpExport(f"127.0.0.1:{port}")))
    try:
        out = run("qemu-img", "info", "--output=json", f"nbd://127.0.0.1:{port}").stdout
        assert json.loads(out)["virtual-size"] == SIZE
    finally:
        ctl.destroy(created.pid, created.minor)
