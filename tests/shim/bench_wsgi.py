"""Manual benchmark: N shim workers on one shared listener (run by hand, not by pytest).

    /usr/bin/python3 tests/shim/bench_wsgi.py --workers 4 --threads 4 -- wrk -t2 -c64 -d10s
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Listeners, Worker  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--app", default="hello_app:application")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    ls = Listeners(tempfile.mkdtemp(), unix=False)
    workers = [Worker(ls, args.app, threads=args.threads, slot=i,
                      overrides={"heartbeat_interval_ms": 1000}) for i in range(args.workers)]
    try:
        for w in workers:
            w.wait_ready(30)
        cmd = [c for c in args.cmd if c != "--"] + ["http://127.0.0.1:%d/" % ls.port]
        return subprocess.call(cmd)
    finally:
        for w in workers:
            w.drain()
        for w in workers:
            w.wait_exit(20)
            w.stop()


if __name__ == "__main__":
    sys.exit(main())
