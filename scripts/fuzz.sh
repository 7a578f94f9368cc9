#!/bin/sh
# Coverage-guided fuzzing of one target (nbd, control, vhd: end to end; nbd-proto,
# control-proto, vhd-parse: the codecs in-process, fast) for SECONDS seconds:
#   scripts/fuzz.sh TARGET [SECONDS] [--work DIR] [--merge] [--runs N]
# New inputs go to /tmp/blktap-fuzz/TARGET, crashes to its crashes/ directory; see
# tests/fuzz/run.py. Needs atheris (the test extra: scripts/setup.sh installs it).
set -eu
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: scripts/fuzz.sh nbd|control|vhd|nbd-proto|control-proto|vhd-parse [SECONDS] [--work DIR] [--merge] [--runs N]" >&2
    exit 22
fi
exec .venv/bin/python -m tests.fuzz.run "$@"
