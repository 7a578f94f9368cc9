#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for trying and testing the rbd driver.
#
#   scripts/ceph-cluster.sh start DIR   start it (or find it running) in DIR; the last line
#                                       printed is the path of DIR/ceph.conf
#   scripts/ceph-cluster.sh stop DIR    stop every daemon of DIR and remove what start made
#   scripts/ceph-cluster.sh status DIR  exit 0 when the cluster of DIR answers
#
# One monitor, one manager and one OSD, bound to 127.0.0.1 only (a free port chosen at
# start), no authentication (auth *_required = none), pool size 1, and a pool named `rbd`
# initialised for RBD. The OSD stores objects in memory (memstore: no mkfs, nothing
# written to disk until it stops cleanly); CEPH_CLUSTER_STORE=bluestore puts them in a
# sparse file DIR/osd.0/block instead (slower to create, survives kill -9).
# CEPH_CLUSTER_STORE_BYTES sets the store's size (default 4 GiB; memstore keeps it in RAM
# only as it is written).
#
# Clients find the cluster with CEPH_CONF=DIR/ceph.conf (the `ceph`, `rbd`, `rados` tools,
# librados, qemu's rbd driver with `rbd:pool/image:conf=DIR/ceph.conf`, our rbd driver).
# `start` on a running cluster only prints the path again; a DIR whose daemons died is
# wiped and started anew (memstore kept nothing). Exit 0 on success, 1 with a message on
# stderr otherwise (a failed start stops what it started).
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2" 2>/dev/null || true
[ -d "$2" ] || { echo "ceph-cluster: $2: not a directory" >&2; exit 1; }
dir=$(cd "$2" && pwd)
conf=$dir/ceph.conf
marker=$dir/.ceph-cluster
store=${CEPH_CLUSTER_STORE:-memstore}
store_bytes=${CEPH_CLUSTER_STORE_BYTES:-$((4 << 30))}
daemons=(mon.a mgr.x osd.0)

die() {
    echo "ceph-cluster: $*" >&2
    exit 1
}

ceph_() { timeout 30 ceph --conf "$conf" --connect-timeout 10 "$@"; }

alive() {  # a process that has not exited (a zombie has: only its parent has to reap it)
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

pid_of() {  # the pid of a daemon of this cluster that is alive, or nothing
    local f=$dir/run/$1.pid pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f" 2>/dev/null) || return 0
    [ -n "$pid" ] && alive "$pid" || return 0
    # Only a ceph daemon started with this cluster's conf counts (pids are reused).
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$conf" && echo "$pid"
    return 0
}

stop_daemons() {
    local name pid pids=() i
    for name in "${daemons[@]}"; do
        pid=$(pid_of "$name")
        [ -n "$pid" ] && pids+=("$pid")
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    # Everything is removed next, so nothing needs a clean shutdown (the OSD's takes
    # seconds): kill at once. SIGKILL also ends a daemon a test has stopped (SIGSTOP).
    kill -KILL "${pids[@]}" 2>/dev/null || true
    for i in $(seq 100); do
        local alive=()
        for pid in "${pids[@]}"; do alive "$pid" && alive+=("$pid"); done
        [ ${#alive[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    die "daemons ${alive[*]} did not exit"
}

wipe() {
    # Only what start made: DIR itself stays unless it is left empty.
    rm -rf "$dir/mon.a" "$dir/mgr.x" "$dir/osd.0" "$dir/run" "$dir/log" "$dir/keyring" \
        "$dir/monmap" "$conf" "$marker"
    rmdir "$dir" 2>/dev/null || true
}

running() {
    [ -f "$marker" ] && [ -f "$conf" ] || return 1
    local name
    for name in "${daemons[@]}"; do
        [ -n "$(pid_of "$name")" ] || return 1
    done
    ceph_ health >/dev/null 2>&1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local port=$1
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
public network = 127.0.0.1/32
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
mon cluster log file = $dir/log/cluster.log
crash dir = $dir/log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd failsafe full ratio = .99
mon osd full ratio = .98
mon osd backfillfull ratio = .97
mon osd nearfull ratio = .96
mon warn on insecure global id reclaim allowed = false

[mon]
mon data = $dir/\$name
mon initial members = a

[mgr]
mgr data = $dir/\$name
mgr initial modules = 

[osd]
osd data = $dir/\$name
osd objectstore = $store
memstore device bytes = $store_bytes
bluestore block path = $dir/\$name/block
bluestore block create = true
bluestore block size = $store_bytes
bluestore fsck on mount = false
osd max object name len = 460
osd max object namespace len = 64
osd op thread timeout = 60
EOF
}

start_failed() {
    trap - EXIT
    stop_daemons || true
    echo "ceph-cluster: start failed; the last lines of its logs:" >&2
    tail -n 20 "$dir"/log/*.log >&2 2>/dev/null || true
    wipe
    exit 1
}

start() {
    if running; then
        echo "$conf"
        return 0
    fi
    stop_daemons
    wipe
    mkdir -p "$dir" "$dir/run" "$dir/log" "$dir/mon.a" "$dir/mgr.x" "$dir/osd.0"
    : >"$marker"
    # Whatever ends start early (a failed command, die): stop what started, remove it.
    trap 'start_failed' EXIT
    fsid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$(free_port)"
    # Even without authentication the monitor's mkfs wants its key.
    ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' \
        --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    local port
    port=$(sed -n 's/^mon host = v2:127.0.0.1://p' "$conf")
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon --conf "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
    ceph-mon --conf "$conf" -i a 2>>"$dir/log/mon.a.stderr"
    ceph_ osd pool create rbd 8 8 >/dev/null 2>&1 ||
        ceph_ osd pool create rbd 8 8 >/dev/null
    local uuid id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(ceph_ osd new "$uuid")
    [ "$id" = 0 ] || die "expected osd id 0, got $id"
    ceph-osd --conf "$conf" -i 0 --mkfs --osd-uuid "$uuid" >/dev/null 2>&1 ||
        die "ceph-osd --mkfs failed (see $dir/log/osd.0.log)"
    ceph-osd --conf "$conf" -i 0 2>>"$dir/log/osd.0.stderr"
    ceph-mgr --conf "$conf" -i x 2>>"$dir/log/mgr.x.stderr"
    ceph_ osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
    ceph_ osd pool application enable rbd rbd >/dev/null 2>&1
    # The pool is usable once its placement groups are active: a write returns then.
    timeout 60 rados --conf "$conf" -p rbd put .ceph-cluster-probe /dev/null ||
        die "the OSD did not make the pool active within 60 s"
    rados --conf "$conf" -p rbd rm .ceph-cluster-probe
    trap - EXIT
    echo "$conf"
}

case $cmd in
start)
    command -v ceph-mon >/dev/null || die "ceph-mon is not installed (scripts/setup.sh installs it)"
    start
    ;;
stop)
    if [ ! -f "$marker" ] && [ -n "$(ls -A "$dir")" ]; then
        die "$dir holds no cluster started by this script; not removing it"
    fi
    stop_daemons
    wipe
    ;;
status)
    running || die "no running cluster in $dir"
    ;;
*)
    usage
    ;;
esac
