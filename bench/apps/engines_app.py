"""The engines section's app (bench/molt_bench/sections/engines.py): one WSGI callable with a
route per measured case, and a small Flask page mounted under /flask/."""
from flask import Flask, render_template_string

HELLO = b"Hello, world!"
BODY_64K = b"x" * 65536

flask_app = Flask(__name__)
PAGE = """<!doctype html><title>{{ title }}</title><ul>
{% for item in items %}<li>{{ loop.index }}: {{ item }}</li>{% endfor %}</ul>"""


@flask_app.route("/flask/")
def flask_page():
    return render_template_string(PAGE, title="molt bench", items=["alpha", "beta", "gamma"] * 5)


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
        return [HELLO]
    if path == "/64k":
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", "65536")])
        return [BODY_64K]
    if path == "/post":
        data = environ["wsgi.input"].read()
        body = b"%d" % len(data)
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path.startswith("/flask/"):
        return flask_app(environ, start_response)
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]
