"""Access log written by a background thread, so a slow stdout or disk never blocks a request.

A serving thread only puts a tuple on a queue: the raw values it already has, and (only when
the format names a header) references to the request's and the response's headers as the
engine holds them. Formatting, header look-ups and the write happen on the log thread.

Targets: stdout (the master reads it and logs it, tagged with generation, slot and pid), or
`logging.access_log_file`, opened O_APPEND by every worker and reopened on SIGUSR1 /
REOPEN_LOGS=1 (logrotate's `create` mode: rename, signal, and the next lines go to a new file).

Formats (docs/logging.md): `logging.format: text` uses `logging.access_log_format`, Python
str.format placeholders, with `{request_header[x-request-id]}` and
`{response_header[content-type]}` for any header ("-" when absent). `logging.format: json`
writes one JSON object per line with fixed fields, plus `request_headers` and
`response_headers` objects holding the headers the format names.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import string
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .config import DEFAULT_ACCESS_LOG_FORMAT

log = logging.getLogger("molt_shim")

# (remote, method, target, protocol, status, bytes, duration_ms, request headers, response
# headers). Headers are None unless the format names one. Request headers: an environ-style
# dict (HTTP_X_REQUEST_ID) or a list of (name, value) bytes pairs (ASGI's scope["headers"]);
# response headers: a "Name: value\r\n" block or a list of pairs.
Entry = Tuple[Any, ...]

REQUEST_HEADER = "request_header"
RESPONSE_HEADER = "response_header"
_REOPEN = object()  # queue marker: reopen the file (on the log thread, between writes)


def _environ_key(name: str) -> str:
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def header_value(headers: Any, name: str) -> str:
    """One header out of whatever form the engine handed over; "-" when it is absent."""
    if headers is None:
        return "-"
    if isinstance(headers, dict):
        value = headers.get(_environ_key(name))
        return "-" if value is None else str(value)
    lowered = name.lower()
    if isinstance(headers, str):  # "Name: value\r\n" lines
        for line in headers.split("\r\n"):
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() == lowered:
                return value.strip()
        return "-"
    wanted = lowered.encode("latin-1")
    for key, value in headers:
        if (key.lower() if isinstance(key, bytes) else key.lower().encode("latin-1")) == wanted:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return "-"


class _Headers:
    """`{request_header[x-request-id]}`: str.format indexes this with the name."""

    __slots__ = ("headers",)

    def __init__(self, headers: Any) -> None:
        self.headers = headers

    def __getitem__(self, name: str) -> str:
        return header_value(self.headers, name)


def named_headers(fmt: str) -> Tuple[List[str], List[str]]:
    """The request and the response header names a format uses (user_agent and referer are
    request headers too)."""
    request: List[str] = []
    response: List[str] = []
    for _, field, _, _ in string.Formatter().parse(fmt):
        if not field:
            continue
        base, _, rest = field.partition("[")
        name = rest.rstrip("]").lower()
        if base == REQUEST_HEADER and name:
            request.append(name)
        elif base == RESPONSE_HEADER and name:
            response.append(name)
        elif base == "user_agent":
            request.append("user-agent")
        elif base == "referer":
            request.append("referer")
    return request, response


class AccessLog:
    def __init__(self, fmt: str, generation: int, worker: int, version: str = "",
                 as_json: bool = False, path: str = "") -> None:
        self._fmt = fmt
        self._generation = generation
        self._worker = worker
        self._version = version
        self._json = as_json
        self._path = path
        self._pid = os.getpid()
        try:  # Reject an unusable format once, at start, instead of on every request.
            self._text(("127.0.0.1:1", "GET", "/?a=1", "HTTP/1.1", 200, 0, 0.0, None, None))
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            log.error("bad access_log_format (%s); using the default", exc)
            self._fmt = DEFAULT_ACCESS_LOG_FORMAT
        self._request_names, self._response_names = named_headers(self._fmt)
        # What the engines check before handing over header references.
        self.wants_request_headers = bool(self._request_names)
        self.wants_response_headers = bool(self._response_names)
        self._out: Any = self._open()
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="molt-accesslog", daemon=True)
        self._thread.start()

    # -- formatting (on the log thread) ---------------------------------------------------------
    def _text(self, entry: Entry) -> str:
        remote, method, target, protocol, status, nbytes, duration_ms, req_h, resp_h = entry
        path, _, query = target.partition("?")
        return self._fmt.format(
            remote=remote, method=method, path=target, query=query, protocol=protocol,
            status=status, bytes=nbytes, duration_ms="%.1f" % duration_ms,
            generation=self._generation, worker=self._worker, version=self._version,
            user_agent=header_value(req_h, "user-agent"), referer=header_value(req_h, "referer"),
            request_header=_Headers(req_h), response_header=_Headers(resp_h))

    def _object(self, entry: Entry) -> str:
        remote, method, target, protocol, status, nbytes, duration_ms, req_h, resp_h = entry
        path, _, query = target.partition("?")
        fields: Dict[str, Any] = {
            "msg": "access", "remote": remote, "method": method, "path": path,
            "query": query, "protocol": protocol, "status": status, "bytes": nbytes,
            "duration_ms": round(duration_ms, 3), "version": self._version}
        if self._request_names:
            fields["request_headers"] = {n: header_value(req_h, n) for n in self._request_names}
        if self._response_names:
            fields["response_headers"] = {n: header_value(resp_h, n)
                                          for n in self._response_names}
        if self._path:
            # Written straight to a file: nobody adds the fields the master adds to its lines.
            fields = dict({"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                           "level": "info", "source": "access", "gen": self._generation,
                           "worker": self._worker, "pid": self._pid}, **fields)
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))

    def _format(self, entry: Entry) -> str:
        return self._object(entry) if self._json else self._text(entry)

    # -- the target ---------------------------------------------------------------------------
    def _open(self) -> Any:
        if not self._path:
            return sys.stdout
        try:
            return open(self._path, "a", encoding="utf-8", errors="replace")
        except OSError as exc:
            log.error("cannot open logging.access_log_file %s (%s); access lines go to stdout",
                      self._path, exc)
            return sys.stdout

    def _reopen(self) -> None:
        if not self._path:
            return  # stdout is a pipe owned by the master: nothing to reopen
        old = self._out
        self._out = self._open()
        if old is not sys.stdout and old is not self._out:
            try:
                old.close()
            except OSError:
                pass

    # -- the queue ----------------------------------------------------------------------------
    def put(self, entry: Entry) -> None:
        self._queue.put(entry)

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            lines = []
            reopen = False
            while entry is not None:
                if entry is _REOPEN:
                    reopen = True  # write what came before into the old file, then reopen
                    break
                try:
                    lines.append(self._format(entry))
                except Exception as exc:  # one bad entry must not end the log thread
                    lines.append("access log: cannot format an entry: %r" % (exc,))
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                if lines:
                    self._out.write("\n".join(lines) + "\n")
                self._out.flush()
            except (OSError, ValueError):
                pass
            if reopen:
                self._reopen()
            elif entry is None:
                return

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued (bounded) before the process exits."""
        self._queue.put(None)
        self._thread.join(timeout)

    def reopen(self) -> None:
        """SIGUSR1 or REOPEN_LOGS=1 (on the lifecycle's thread): the log thread reopens the
        file after writing what is queued, so no line is lost or torn."""
        self._queue.put(_REOPEN)


def make(cfg: Any) -> Optional[AccessLog]:
    if not cfg.access_log:
        return None
    return AccessLog(cfg.access_log_format, cfg.generation, cfg.worker, cfg.version,
                     cfg.log_format == "json", cfg.access_log_file)
