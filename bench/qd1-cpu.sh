#!/usr/bin/env bash
# Queue-depth-1 4 KiB random reads against NBD servers, one fio run each, in turns, with
# the CPU each server spends per request (its /proc/PID/stat user and system ticks over
# the run, divided by the requests fio made). nbd-compare gives the IOPS to quote; this
# tells where a server's time goes.
#
#   bench/qd1-cpu.sh [direct|buffered] [ROUNDS]
#
# direct (default): ours (O_DIRECT) vs qemu-nbd --cache=none --aio=native;
# buffered: ours with --no-direct vs nbdkit file. ROUNDS (default 3) alternates them.
# Ours is `python -m blktap.frontends.nbd_server` (the NbdServer the daemon runs).
# Image: $BENCH_IMAGE (default /var/tmp/blktap-bench.raw, 1 GiB, made by nbd-compare.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-direct}
rounds=${2:-3}
image=${BENCH_IMAGE:-/var/tmp/blktap-bench.raw}
py=$root/.venv/bin/python
[ -f "$image" ] || { echo "no $image: run bench/nbd-compare.sh once" >&2; exit 2; }
work=$(mktemp -d /tmp/qd1-cpu.XXXXXX)
sock=$work/s.sock
trap 'rm -rf "$work"' EXIT

case $mode in
direct)
    servers=("ours|env PYTHONPATH=$root/src $py -m blktap.frontends.nbd_server --socket $sock --image aio:$image"
             "qemu-nbd|qemu-nbd -t -f raw --cache=none --aio=native -k $sock $image") ;;
buffered)
    cat "$image" > /dev/null
    servers=("ours|env PYTHONPATH=$root/src $py -m blktap.frontends.nbd_server --socket $sock --image aio:$image --no-direct"
             "nbdkit|nbdkit -f -U $sock file $image") ;;
*) echo "usage: $0 [direct|buffered] [ROUNDS]" >&2; exit 22 ;;
esac

ticks() { local a; read -r -a a < "/proc/$1/stat"; echo "${a[13]} ${a[14]}"; }

for _ in $(seq "$rounds"); do
    for spec in "${servers[@]}"; do
        name=${spec%%|*}
        rm -f "$sock"
        ${spec#*|} 2>"$work/server.err" &
        pid=$!
        for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
        read -r u0 s0 < <(ticks "$pid")
        fio --name=qd1 --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=randread \
            --bs=4k --iodepth=1 --runtime=5 --time_based --size=1g \
            --output-format=json --output="$work/fio.json" >/dev/null
        read -r u1 s1 < <(ticks "$pid")
        kill "$pid"; wait "$pid" 2>/dev/null || true
        python3 - "$name" $((u1 - u0)) $((s1 - s0)) "$(getconf CLK_TCK)" "$work/fio.json" <<'PY'
import json, sys
name, user, system, hz, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
read = json.load(open(path))["jobs"][0]["read"]
n = read["total_ios"]
us = 1e6 / hz / n
print(f"{name:10} {read['iops']:8.0f} IOPS  user {user * us:5.1f} us  sys {system * us:5.1f} us"
      f" per request  clat {read['clat_ns']['mean'] / 1000:6.1f} us")
PY
    done
done
