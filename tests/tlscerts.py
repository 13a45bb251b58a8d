"""Test certificates made with the `openssl` command at test time: a CA, a server certificate
for localhost/127.0.0.1 signed by it, and a client certificate for mutual TLS."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass
class Certs:
    dir: str
    ca: str
    ca_key: str
    cert: str
    key: str
    client_cert: str
    client_key: str


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def server_cert(d: str, ca: str, ca_key: str, name: str, cn: str = "localhost") -> tuple:
    """A server certificate and key named `name`.pem / `name`.key, signed by the CA."""
    ext = os.path.join(d, name + ".ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out",
             name + ".csr", "-subj", "/CN=%s" % cn, cwd=d)
    _openssl("x509", "-req", "-in", name + ".csr", "-CA", ca, "-CAkey", ca_key,
             "-CAcreateserial", "-days", "2", "-out", name + ".pem", "-extfile", ext, cwd=d)
    return os.path.join(d, name + ".pem"), os.path.join(d, name + ".key")


def make(d: str) -> Certs:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/O=molt tests/CN=molt test CA", cwd=d)
    ca, ca_key = os.path.join(d, "ca.pem"), os.path.join(d, "ca.key")
    cert, key = server_cert(d, ca, ca_key, "server")
    client_ext = os.path.join(d, "client.ext")
    with open(client_ext, "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out",
             "client.csr", "-subj", "/O=Example/CN=client one", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-days", "2", "-out", "client.pem", "-extfile", client_ext, cwd=d)
    return Certs(d, ca, ca_key, cert, key, os.path.join(d, "client.pem"),
                 os.path.join(d, "client.key"))
