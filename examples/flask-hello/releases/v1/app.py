"""The example app: a small Flask release that says which release answered."""
from flask import Flask, jsonify

app = Flask(__name__)
RELEASE = "v1"


@app.route("/")
def index():
    return f"Hello from molt's example app, release {RELEASE}\n"


@app.route("/healthz")
def healthz():
    # molt runs this request inside every new worker before it counts as ready.
    return jsonify(status="ok", release=RELEASE)
