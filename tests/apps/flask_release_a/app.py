"""Flask release "a": answers its own version on / (used for rollover tests)."""
from flask import Flask

VERSION = "release-a"
app = Flask(__name__)


@app.route("/")
def index():
    return VERSION


@app.route("/healthz")
def healthz():
    return "ok"
