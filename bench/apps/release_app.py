"""The release app of the rollover figures (3, 4, 5), copied to each server's release
directory as app.py. It answers the release's VERSION file, read at import, so a client can
tell which release served it. An IMPORT_SLEEP file (seconds) makes the import slow on purpose,
to show a rollover's cost next to the app's own import time."""
import os
import time

_HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str, default: str) -> str:
    try:
        with open(os.path.join(_HERE, name)) as f:
            return f.read().strip() or default
    except FileNotFoundError:
        return default


_IMPORT_SLEEP = float(_read("IMPORT_SLEEP", "0"))
if _IMPORT_SLEEP:
    time.sleep(_IMPORT_SLEEP)
VERSION = _read("VERSION", "0").encode()


def application(environ, start_response):
    body = VERSION + b"\n"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
