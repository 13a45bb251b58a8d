"""The edge: HTTPS hello world (keep-alive and `Connection: close`) against gunicorn with
--certfile/--keyfile and uWSGI's --https-socket; and the cost of trusted-proxy handling (molt
with and without `proxy:`, both sent the same forwarding headers), in the same run."""
from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from ..common import APPS, Params, say
from ..load import throughput
from ..peers import Gunicorn, MoltServer, Server, Uwsgi
from ..report import Report

FORWARDING_HEADERS = ["-H", "X-Forwarded-For: 203.0.113.7, 10.0.0.2",
                      "-H", "X-Forwarded-Proto: https", "-H", "X-Forwarded-Host: shop.example"]


def _certs(work: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    import tlscerts  # the tests' certificate maker: a CA and a server certificate, via openssl

    d = work / "certs"
    d.mkdir(exist_ok=True)
    return tlscerts.make(str(d))


def measure(p: Params, work: Path, results: dict):
    say("edge: HTTPS hello world, 4 workers; trusted-proxy handling on and off")
    app_dir = work / "hello"
    app_dir.mkdir(exist_ok=True)
    shutil.copy(APPS / "hello_wsgi.py", app_dir / "hello_wsgi.py")
    app = "hello_wsgi:application"
    certs = _certs(work)
    tls = {"cert": certs.cert, "key": certs.key}
    molt_https = MoltServer(work / "edge", "molt", app, app_dir, 4, threads=4, extra={
        "listen": [{"address": "tcp://127.0.0.1:0", "tls": tls}]})
    # The same molt on its Python engine (`molt` above is `engine: auto`: the native one).
    molt_python = MoltServer(work / "edge", "molt-python-engine", app, app_dir, 4, threads=4,
                             extra={"engine": "python",
                                    "listen": [{"address": "tcp://127.0.0.1:0", "tls": tls}]})
    gunicorn = Gunicorn(work / "edge", "gunicorn-gthread", app, app_dir, 4, threads=4,
                        extra=["--certfile", certs.cert, "--keyfile", certs.key])
    uwsgi = Uwsgi(work / "edge", "uwsgi", app, app_dir, 4, threads=4,
                  https=(certs.cert, certs.key))
    https: list[Server] = [molt_https, molt_python, gunicorn, uwsgi]
    for s in https:
        s.scheme = "https"
    plain = MoltServer(work / "edge", "molt-no-proxy", app, app_dir, 4, threads=4)
    proxied = MoltServer(work / "edge", "molt-proxy", app, app_dir, 4, threads=4, extra={
        "proxy": {"trusted": ["127.0.0.1", "10.0.0.0/8"]}})
    everyone = https + [plain, proxied]
    try:
        for s in everyone:
            s.start()
        for s in everyone:
            s.wait_ready(4)
            results["commands"]["edge " + s.label] = shlex.join(s.argv)
        results["commands"]["molt.yaml (edge https)"] = json.dumps(molt_https.config)
        throughput(p, https, False, results, "https_keepalive")
        throughput(p, https, True, results, "https_close")
        throughput(p, [plain, proxied], False, results, "proxy_cost", extra=FORWARDING_HEADERS)
    finally:
        for s in everyone:
            s.stop()


def report(doc: Report):
    results, c, add = doc.results, doc.c, doc.add
    if "https_keepalive" not in results:
        return
    add("## 11. The edge: HTTPS, and trusted-proxy handling")
    add("")
    add("The WSGI hello world of figure 1 over TLS (a 2048-bit RSA certificate made for the "
        "run), 4 workers: molt with `listen[].tls` (`molt`: the native engine, which `engine: "
        "auto` picks; `molt-python-engine`: `engine: python`), gunicorn gthread with "
        "`--certfile/--keyfile`, uWSGI with `--https-socket`.")
    add("")
    doc.commands("edge", results["https_keepalive"], c.get("wrk https_keepalive", ""),
                 c.get("wrk https_close", ""))
    add("uWSGI's `--https-socket` closes the connection after every response (it sends "
        "`Connection: close`), so its keep-alive row is a new TLS connection per request too.")
    add("")
    doc.tp_table("https_keepalive", "molt", "HTTPS keep-alive")
    doc.tp_table("https_close", "molt", "HTTPS `Connection: close` (a handshake per request)")
    add("Trusted-proxy handling: two molts serve the same app, one with `proxy.trusted` "
        "(127.0.0.1 and 10.0.0.0/8), one without; wrk sends both the same `X-Forwarded-For`, "
        "`-Proto` and `-Host` headers, keep-alive.")
    add("")
    doc.tp_table("proxy_cost", "molt-proxy", "With and without `proxy:`")
