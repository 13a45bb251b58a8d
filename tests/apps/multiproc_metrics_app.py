"""A Flask app with prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR set by
molt under metrics.app_multiprocess): a counter per /hit request and a live gauge per
process that served one."""
from flask import Flask
from prometheus_client import Counter, Gauge

app = Flask(__name__)
HITS = Counter("app_hits", "Requests to /hit")
SERVING = Gauge("app_serving_processes", "Processes that served /hit", multiprocess_mode="livesum")


@app.route("/hit")
def hit():
    HITS.inc()
    SERVING.set(1)
    return "hit\n"


@app.route("/healthz")
def healthz():
    return "ok\n"
