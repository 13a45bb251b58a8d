"""A Flask app that answers with the URL it builds for itself and the client it sees
(tests/e2e/test_edge.py: what a Flask app behind a proxy gets)."""
from flask import Flask, jsonify, request, url_for

app = Flask(__name__)


@app.route("/")
def index():
    return jsonify(url=url_for("index", _external=True), remote=request.remote_addr,
                   secure=request.is_secure)
