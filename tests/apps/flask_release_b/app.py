"""Flask release "b": answers its own version on / (used for rollover tests)."""
from flask import Flask

VERSION = "release-b"
app = Flask(__name__)


@app.route("/")
def index():
    return VERSION


@app.route("/healthz")
def healthz():
    return "ok"
