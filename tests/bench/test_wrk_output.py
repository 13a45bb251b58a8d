"""The one wrk parser (tests/molt_testlib.py) that the suites and bench/ share: what it reads
from wrk's report, and what a real wrk run against a real server gives it."""
from __future__ import annotations

import http.server
import math
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from molt_testlib import Wrk, parse_wrk, wrk_argv  # noqa: E402

# wrk 4.1's report with --latency, errors of every kind, and a p99 in seconds.
REPORT = """\
Running 1s test @ http://127.0.0.1:8000/
  2 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   516.00us  200.00us   3.00s    90.00%
    Req/Sec     9.50k   500.00     10.00k    80.00%
  Latency Distribution
     50%  480.00us
     75%  600.00us
     90%    1.20ms
     99%    2.50s
  18900 requests in 1.00s, 2.00MB read
  Socket errors: connect 4, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  18900.25
Transfer/sec:      2.00MB
"""


def test_every_figure_of_the_report():
    r = parse_wrk(REPORT)
    assert r["requests"] == 18900 and r["rps"] == 18900.25
    assert math.isclose(r["p50"], 0.48) and math.isclose(r["p99"], 2500.0)
    assert (r["connect"], r["read"], r["write"], r["timeout"]) == (4, 3, 1, 2)
    assert r["non2xx"] == 5
    assert r["socket_errors"] == 10 and r["failed"] == 15


def test_a_clean_run_without_latency_lines():
    clean = "\n".join(line for line in REPORT.splitlines()
                      if not line.lstrip().startswith(("Socket", "Non-2xx", "50%", "99%")))
    r = parse_wrk(clean)
    assert r["requests"] == 18900 and r["failed"] == 0
    assert math.isnan(r["p50"]) and math.isnan(r["p99"])


def test_command_line_of_the_tests_and_of_the_bench():
    assert wrk_argv("http://h/", 6, 16) == [
        "wrk", "-t2", "-c16", "-d6s", "--latency", "--timeout", "10s", "http://h/"]
    # The bench keeps wrk's own timeout and sends Connection: close for its close runs.
    assert wrk_argv("http://h/", 3, 64, threads=2, close=True, timeout=None) == [
        "wrk", "-t2", "-c64", "-d3s", "--latency", "-H", "Connection: close", "http://h/"]


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        status = 200 if self.path == "/" else 404
        self.send_response(status)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


def test_real_wrk_against_a_real_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        ok = Wrk(f"http://127.0.0.1:{port}/", duration=1, connections=2, threads=1).result()
        missing = Wrk(f"http://127.0.0.1:{port}/nope", duration=1, connections=2,
                      threads=1).result()
    finally:
        server.shutdown()
        server.server_close()
    assert ok["requests"] > 0 and ok["failed"] == 0, ok["output"]
    assert ok["p50"] > 0 and ok["p99"] >= ok["p50"], ok["output"]
    assert ok["elapsed"] >= 1.0
    assert missing["non2xx"] == missing["requests"] > 0, missing["output"]
