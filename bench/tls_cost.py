#!/usr/bin/env python3
"""The cost of TLS on an NBD export: TLS over TCP against plain TCP and the Unix socket.

    .venv/bin/python bench/tls_cost.py [--rounds 5] [--seconds 5] [--size-mib 256]

Two read-only VBDs of one raw image (``tap-ctl create -R -D``: no O_DIRECT, so reads
come from the page cache and the transport is what differs): one exported on
127.0.0.1 with ``--tls-creds`` (certificates made here with openssl), one on plain TCP;
the Unix socket of the second is the third variant. The client is libnbd's Python
binding (fio's nbd engine cannot do TLS): asynchronous preads at a fixed queue depth for
a fixed time, 4 KiB random reads at QD32 and 1 MiB random reads at QD8. Each round runs
every (workload, variant) pair once, the variant order rotating per round, so a noisy
machine hits all alike; medians and the spread are printed. The client is one Python
thread: at 4 KiB its own cost is part of every number (the same for all three).
Removes everything it made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
TAP_CTL = str(BIN / "tap-ctl")

# Run under an interpreter that has libnbd's ``nbd`` module (the venv's .pth, else
# Debian's python3): prints {"ops": N, "bytes": B, "seconds": S}.
CLIENT = r"""
import json, random, sys, time, nbd
uri, bs, qd, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE if uri.startswith("nbds") else nbd.TLS_DISABLE)
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
size = h.get_size()
blocks = size // bs
bufs = [nbd.Buffer(bs) for _ in range(qd)]
rng = random.Random(1)
done = 0
def issue(i):
    h.aio_pread(bufs[i], rng.randrange(blocks) * bs,
                completion=lambda *a, i=i: (finished.append(i), 1)[1])
finished = []
start = time.monotonic()
end = start + seconds
for i in range(qd):
    issue(i)
while True:
    h.poll(-1)
    while finished:
        i = finished.pop()
        done += 1
        if time.monotonic() < end:
            issue(i)
    if h.aio_in_flight() == 0:
        break
elapsed = time.monotonic() - start
h.shutdown()
print(json.dumps({"ops": done, "bytes": done * bs, "seconds": elapsed}))
"""

WORKLOADS = {"4k-randread-qd32": (4096, 32), "1m-randread-qd8": (1 << 20, 8)}


def client_python() -> str:
    probe = subprocess.run([sys.executable, "-c", "import nbd"], capture_output=True)
    return sys.executable if probe.returncode == 0 else "/usr/bin/python3"


def run(*argv: str, env: dict[str, str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"{argv[:3]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def make_creds(d: Path) -> None:
    env = dict(os.environ)
    d.mkdir()
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"),
        "-subj", "/CN=bench CA", env=env)
    (d / "s.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server-key.pem"),
        "-out", str(d / "s.csr"), "-subj", "/CN=127.0.0.1", env=env)
    run("openssl", "x509", "-req", "-in", str(d / "s.csr"), "-CA", str(d / "ca-cert.pem"),
        "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "1",
        "-out", str(d / "server-cert.pem"), "-extfile", str(d / "s.ext"), env=env)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tls-cost-"))
    env = dict(os.environ, BLKTAP_RUN_DIR=str(work / "run"), BLKTAP_DEV_DIR=str(work / "dev"),
               BLKTAP_BLOCKDEV="off")
    vbds: list[dict[str, object]] = []
    try:
        image = work / "disk.raw"
        with image.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        creds = work / "creds"
        make_creds(creds)
        tls_port, tcp_port = free_port(), free_port()
        run(TAP_CTL, "create", "-R", "-D", "-a", f"aio:{image}",
            "--export-tcp", f"127.0.0.1:{tls_port}", "--tls-creds", str(creds), env=env)
        run(TAP_CTL, "create", "-R", "-D", "-a", f"aio:{image}",
            "--export-tcp", f"127.0.0.1:{tcp_port}", env=env)
        vbds = json.loads(run(TAP_CTL, "list", "--json", env=env))
        unix = next(str(v["nbd_socket"]) for v in vbds
                    if (v["nbd_tcp"] or {}).get("tls") is None)  # type: ignore[attr-defined]
        uris = {"tls": f"nbds://127.0.0.1:{tls_port}/?tls-certificates={creds}",
                "tcp": f"nbd://127.0.0.1:{tcp_port}/",
                "unix": f"nbd+unix:///?socket={unix}"}
        py = client_python()
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)  # warm
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        names = list(uris)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for wl, (bs, qd) in WORKLOADS.items():
                for name in order:
                    out = run(py, "-c", CLIENT, uris[name], str(bs), str(qd),
                              str(args.seconds), env=env)
                    doc = json.loads(out.strip().splitlines()[-1])
                    iops = doc["ops"] / doc["seconds"]
                    mibs = doc["bytes"] / doc["seconds"] / (1 << 20)
                    results.setdefault((wl, name), []).append((iops, mibs))
                    print(f"round {rnd + 1} {wl:18} {name:5} {iops:9.0f} IOPS "
                          f"{mibs:8.1f} MiB/s", file=sys.stderr)
        print(f"\n{'workload':18} {'export':6} {'IOPS (median)':>14} {'MiB/s':>8} "
              f"{'min..max MiB/s':>18} {'vs unix':>8}")
        for wl in WORKLOADS:
            base = statistics.median(m for _i, m in results[(wl, "unix")])
            for name in names:
                rows = results[(wl, name)]
                iops = statistics.median(i for i, _m in rows)
                mibs = statistics.median(m for _i, m in rows)
                lo, hi = min(m for _i, m in rows), max(m for _i, m in rows)
                print(f"{wl:18} {name:6} {iops:14.0f} {mibs:8.1f} {lo:8.1f}..{hi:8.1f} "
                      f"{mibs / base:7.2f}x")
    finally:
        for v in vbds:
            subprocess.run([TAP_CTL, "destroy", "-p", str(v["pid"]), "-m", str(v["minor"])],
                           env=env, capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
