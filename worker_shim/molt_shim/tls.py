"""TLS on a listener (`listen[].tls`), with Python's ssl module (OpenSSL).

Each worker loads its listener's files once, when it starts: a generation is one set of
certificates, so replacing the files and sending HUP rotates them while the old generation's
connections finish on the old ones.

`ServerSocket` makes a non-blocking TLS socket look like a plain one to the threaded engine:
"would block" in either direction is BlockingIOError, whatever TLS is waiting for. The handshake
runs inside the first reads (OpenSSL's SSL_read performs it), driven by epoll like any read, so
a client that opens TLS and sends nothing holds no thread; the engine's first-request timeout
closes it.
"""
from __future__ import annotations

import os
import socket
import ssl
from typing import Any, Dict, Mapping, Optional

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class ServerSocket(ssl.SSLSocket):
    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        if flags:
            # MSG_PEEK (is the next request already here?): decrypted bytes, or any record.
            if self._sslobj is not None and self.pending():
                return b"\0"
            return socket.socket.recv(self, 1, flags)
        try:
            return super().recv(bufsize)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError() from None
        except ssl.SSLZeroReturnError:
            return b""  # the client's close_notify: an orderly end

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError() from None


def _no_passphrase() -> bytes:
    raise ssl.SSLError("the private key is encrypted with a passphrase")


def make_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """The server context of one listener; raises OSError/ssl.SSLError on a bad file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS.get(str(options.get("min_version") or "1.2"),
                                       ssl.TLSVersion.TLSv1_2)
    # Never OpenSSL's terminal prompt for a passphrase (the master refuses such a key first).
    ctx.load_cert_chain(str(options["cert"]), str(options["key"]), password=_no_passphrase)
    ctx.set_alpn_protocols(["http/1.1"])
    client_ca = str(options.get("client_ca") or "")
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sslsocket_class = ServerSocket
    return ctx


def listener_contexts(cfg: Any, labels: Any) -> Dict[str, ssl.SSLContext]:
    """Listener name -> context, for the listeners with `tls`."""
    out = {}
    for label in labels:
        options = cfg.listener_options(label).get("tls")
        if options:
            out[label] = make_context(options)
    return out


def _oneline(name: Any) -> str:
    """A subject as OpenSSL's X509_NAME_oneline writes it ("/C=DE/O=Example/CN=client"), the
    form uWSGI and Apache's mod_ssl give in SSL_CLIENT_S_DN."""
    short = {"countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
             "organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN",
             "emailAddress": "emailAddress"}
    return "".join("/%s=%s" % (short.get(k, k), v) for rdn in name for k, v in rdn)


def connection_environ(sock: Any) -> Dict[str, str]:
    """The TLS keys of a connection's environ (after its handshake)."""
    env = {"HTTPS": "on", "wsgi.url_scheme": "https"}
    try:
        version = sock.version()
        cert: Optional[Dict[str, Any]] = sock.getpeercert()
    except (ValueError, OSError):
        return env
    if version:
        env["SSL_PROTOCOL"] = version
    if cert:
        env["SSL_CLIENT_S_DN"] = _oneline(cert.get("subject", ()))
        env["SSL_CLIENT_I_DN"] = _oneline(cert.get("issuer", ()))
        env["SSL_CLIENT_VERIFY"] = "SUCCESS"
    return env


TLS_VERSION_NUMBERS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

# RFC 4514 attribute types (the rest keep Python's long name, which RFC 4514 also allows
# only as a dotted OID; certificates in practice use these).
_RFC4514 = {"commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST",
            "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
            "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
            "emailAddress": "emailAddress"}


def _rfc4514_value(value: str) -> str:
    out = "".join("\\" + ch if ch in ',+"\\<>;' else ch for ch in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def rfc4514(name: Any) -> str:
    """A subject as RFC 4514 writes it ("CN=client one,O=Example": last RDN first), the form
    the ASGI TLS extension's client_cert_name uses."""
    return ",".join("+".join("%s=%s" % (_RFC4514.get(k, k), _rfc4514_value(v)) for k, v in rdn)
                    for rdn in reversed(tuple(name)))


def asgi_extension(ssl_object: Any) -> Dict[str, Any]:
    """scope["extensions"]["tls"] of one connection, per the ASGI TLS extension: the verified
    client certificate (PEM, and its subject in RFC 4514 form), the TLS version. The subject is
    the one WSGI apps get as SSL_CLIENT_S_DN (there in OpenSSL's "/O=.../CN=..." form)."""
    cert = ssl_object.getpeercert() or None
    der = ssl_object.getpeercert(binary_form=True) if cert else None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": rfc4514(cert.get("subject", ())) if cert else None,
        "client_cert_error": None,  # a client_ca listener completes no handshake without one
        "tls_version": TLS_VERSION_NUMBERS.get(ssl_object.version() or ""),
        "cipher_suite": None,  # Python's ssl module names the cipher, not its number
    }


def copy_file(send_all: Any, fd: int, offset: int, size: int) -> int:
    """sendfile() for a TLS connection: the bytes must go through the TLS layer."""
    total = 0
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 16), offset)
        if not chunk:
            break
        send_all(chunk)
        offset += len(chunk)
        size -= len(chunk)
        total += len(chunk)
    return total
