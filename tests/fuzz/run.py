"""Coverage-guided fuzzing of one target with atheris (libFuzzer for Python).

    python -m tests.fuzz.run TARGET [SECONDS] [--work DIR] [--merge] [--runs N]
    scripts/fuzz.sh TARGET SECONDS          (the same, from the repository root)

TARGET is nbd, control or vhd (end to end), or nbd-proto, control-proto or vhd-parse
(in-process, fast): tests/fuzz/targets.py. The committed corpus
tests/fuzz/corpus/TARGET/ seeds the run and is only read; inputs that reach new
coverage are written to WORK/corpus/ (WORK: --work, default /tmp/blktap-fuzz/TARGET),
crashes and hangs to WORK/crashes/ (``crash-<sha1>``, ``timeout-<sha1>``). ``--merge``
then adds to the committed corpus only the inputs of WORK/corpus/ that add coverage
(libFuzzer's -merge=1). The last lines printed are libFuzzer's (``stat::``
executions, executions per second). Exit status: 0 when nothing was found, else
libFuzzer's (a crash or a hang).

A crash found becomes a regression test: copy the input into the corpus as
``regress-<what>`` (tests/fuzz/test_fuzz.py replays every corpus file), fix, commit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from tests.fuzz import targets
from tests.fuzz.targets import TARGETS, corpus_dir

_ROOT = Path(__file__).resolve().parents[2]

# Everything a target runs, imported under atheris's instrumentation for coverage.
_INSTRUMENTED = {
    "nbd": ("blktap.proto.nbd", "blktap.frontends.nbd_server", "blktap.frontends.nbd_lane",
            "blktap.vbd", "blktap.block.chain", "blktap.block.drivers.aio"),
    "control": ("blktap.proto.control", "blktap.tapdisk.control_server",
                "blktap.tapdisk.service", "blktap.vbd", "blktap.block.chain"),
    "vhd": ("blktap.proto.vhd.footer", "blktap.proto.vhd.header", "blktap.proto.vhd.bat",
            "blktap.proto.vhd.batmap", "blktap.proto.vhd.bitmap", "blktap.proto.vhd.check",
            "blktap.block.drivers.vhd", "blktap.block.chain"),
    "nbd-proto": ("blktap.proto.nbd",),
    "control-proto": ("blktap.proto.control", "blktap.vbd", "blktap.block.layer",
                      "blktap.block.layers.fault", "blktap.block.layers.mirror",
                      "blktap.control.options"),
    "vhd-parse": ("blktap.proto.vhd.footer", "blktap.proto.vhd.header",
                  "blktap.proto.vhd.bat", "blktap.proto.vhd.batmap",
                  "blktap.proto.vhd.bitmap", "blktap.proto.vhd.check"),
}

# The in-process targets' inputs stay short (libFuzzer's -max_len; the others take
# libFuzzer's default, the longest seed), and vhd-parse reads the vhd corpus too
# (the same input: one file's bytes).
_MAX_LEN = {"nbd-proto": 8192, "control-proto": 2048, "vhd-parse": 16384}
_ALSO_SEEDED_BY = {"vhd-parse": ("vhd",)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("seconds", type=int, nargs="?", default=60,
                   help="total fuzzing time (default 60)")
    p.add_argument("--work", help="where new inputs and crashes go "
                                  "(default /tmp/blktap-fuzz/TARGET)")
    p.add_argument("--merge", action="store_true",
                   help="merge the work directory's coverage-adding inputs into the "
                        "committed corpus instead of fuzzing")
    p.add_argument("--runs", type=int, default=-1, help="stop after N inputs")
    p.add_argument("--libfuzzer", nargs=argparse.REMAINDER, default=None,
                   help="pass the rest to libFuzzer as they are (how libFuzzer starts "
                        "this script again for a merge)")
    args = p.parse_args(argv)
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install -e '.[test]' (or use the hypothesis "
              "fuzzers in tests/fuzz/test_fuzz.py)", file=sys.stderr)
        return 2
    import importlib

    with atheris.instrument_imports(include=["blktap"]):
        for module in _INSTRUMENTED[args.target]:
            importlib.import_module(module)
    work = args.work or os.path.join("/tmp/blktap-fuzz", args.target)
    # libFuzzer reads corpus directories recursively: new inputs get one of their own.
    found = os.path.join(work, "corpus")
    crashes = os.path.join(work, "crashes")
    os.makedirs(found, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    corpus = corpus_dir(args.target)
    # libFuzzer ends the process without returning: the target's temporary files go
    # under WORK/scratch, emptied by the next run.
    scratch = os.path.join(work, "scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    targets.SCRATCH = scratch
    target = TARGETS[args.target]()
    target.start()

    def one(data: bytes) -> None:
        target.one(data)

    argv0 = sys.argv[0]
    if args.libfuzzer is not None:
        flags = args.libfuzzer
    elif args.merge:
        # libFuzzer merges in child processes it starts as argv[0]: a launcher that
        # comes back here with the same target.
        launcher = os.path.join(work, "launcher")
        with open(launcher, "w") as f:
            f.write(f"#!/bin/sh\ncd {shlex.quote(str(_ROOT))} && exec "
                    f"{shlex.quote(sys.executable)} -m tests.fuzz.run {args.target} "
                    f"--work {shlex.quote(work)} --libfuzzer \"$@\"\n")
        os.chmod(launcher, 0o755)
        argv0 = launcher
        flags = ["-merge=1", corpus, found]
    else:
        flags = [f"-max_total_time={args.seconds}", f"-runs={args.runs}", "-timeout=30",
                 "-rss_limit_mb=4096", f"-artifact_prefix={crashes}/", "-print_final_stats=1"]
        if args.target in _MAX_LEN:
            flags.append(f"-max_len={_MAX_LEN[args.target]}")
        flags += [found, corpus]
        flags += [corpus_dir(other) for other in _ALSO_SEEDED_BY.get(args.target, ())]
    atheris.Setup([argv0, *flags], one)
    try:
        atheris.Fuzz()  # exits the process when done (libFuzzer's exit status)
    finally:
        target.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
