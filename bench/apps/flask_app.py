"""Figure 8's good release: a small Flask app (copied as app.py) answering its VERSION."""
import os

from flask import Flask

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "VERSION")) as f:
    VERSION = f.read().strip()

app = Flask(__name__)


@app.route("/")
def index():
    return "version " + VERSION + "\n"
