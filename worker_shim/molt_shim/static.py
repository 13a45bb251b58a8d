"""Static files (`static:`): the rules, in one place for Python.

The native engine has the same rules in C++ (worker_shim/native/static_files.cpp), and both
engines run one table of cases (tests/shim/test_static.py). It takes its MIME table and its
resolved mounts from this module, so the table exists once.

What a request under a mount's prefix gets (matched against the request path as sent, before
`root_path` is stripped; the longest prefix wins; the app never sees it):

* GET and HEAD only; anything else is 405 with `Allow: GET, HEAD`.
* The rest of the path is percent-decoded. It is refused with 404 (never 403: a client learns
  nothing about what exists outside) when it is empty, holds a NUL, has an empty, `.` or `..`
  segment, or when the file's realpath is not inside the mount's directory (a symlink that
  leads out of it). Directories and anything that is not a regular file are 404 too.
* A precompressed sibling (`name.br`, then `name.gz`) is sent instead when the client's
  Accept-Encoding allows it, with `Content-Encoding`; when a sibling exists the response says
  `Vary: Accept-Encoding` whichever representation was chosen.
* `ETag: "<mtime hex>-<size hex>"` (plus `-br`/`-gz` for a sibling) and `Last-Modified` of the
  representation sent. `If-None-Match` (weak comparison, `*`) decides alone when present;
  otherwise `If-Modified-Since` (IMF-fixdate only; other forms are ignored). A match is 304.
* `Range: bytes=a-b | a- | -n`, one range only (several ranges, or a malformed one, get the
  whole file: RFC 9110 allows ignoring Range). `If-Range` with a strong ETag or the exact date
  must match, or the whole file is sent. Past the end (or any range of an empty file) is 416
  with `Content-Range: bytes */size`.
"""
from __future__ import annotations

import calendar
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from .engines import EngineUnavailable
from .httpdate import http_date

# Extension (lower case, without the dot) -> Content-Type. Text types carry their charset.
MIME_TYPES: Dict[str, str] = {
    "html": "text/html; charset=utf-8", "htm": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8",
    "mjs": "text/javascript; charset=utf-8", "json": "application/json",
    "map": "application/json", "txt": "text/plain; charset=utf-8",
    "csv": "text/csv; charset=utf-8", "xml": "application/xml", "md": "text/markdown; charset=utf-8",
    "svg": "image/svg+xml", "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
    "gif": "image/gif", "webp": "image/webp", "avif": "image/avif", "ico": "image/x-icon",
    "bmp": "image/bmp", "woff": "font/woff", "woff2": "font/woff2", "ttf": "font/ttf",
    "otf": "font/otf", "eot": "application/vnd.ms-fontobject", "pdf": "application/pdf",
    "zip": "application/zip", "gz": "application/gzip", "tar": "application/x-tar",
    "wasm": "application/wasm", "mp4": "video/mp4", "webm": "video/webm", "mp3": "audio/mpeg",
    "ogg": "audio/ogg", "wav": "audio/wav", "webmanifest": "application/manifest+json",
    "manifest": "text/cache-manifest", "ics": "text/calendar; charset=utf-8",
}
DEFAULT_TYPE = "application/octet-stream"
# Precompressed siblings in the order they are preferred: (suffix, Content-Encoding, ETag tag).
ENCODINGS = ((b".br", "br", "br"), (b".gz", "gzip", "gz"))
REASONS = {200: "OK", 206: "Partial Content", 304: "Not Modified", 404: "Not Found",
           405: "Method Not Allowed", 416: "Range Not Satisfiable"}


class StaticConfigError(EngineUnavailable):
    """A `static:` entry this worker cannot serve (its directory is missing): the boot fails
    with this text, so a release without its static directory never goes live."""


@dataclass(frozen=True)
class Mount:
    prefix: str  # starts and ends with '/'
    root: bytes  # realpath of the directory


def mounts(entries: Sequence[Dict[str, Any]], chdir: str) -> List[Mount]:
    """The worker's mounts, longest prefix first; a relative dir is relative to the release
    directory (so each generation serves its own release's files)."""
    out = []
    for entry in entries:
        prefix, directory = str(entry["prefix"]), str(entry["dir"])
        full = os.path.realpath(os.path.join(chdir or os.getcwd(), directory))
        if not os.path.isdir(full):
            raise StaticConfigError("static: %s -> %s: not a directory" % (prefix, full))
        out.append(Mount(prefix, os.fsencode(full)))
    out.sort(key=lambda m: len(m.prefix), reverse=True)
    return out


@dataclass
class Plan:
    """What to answer: a status, its header lines (framing headers excluded), and the file
    bytes [offset, offset+length) of `fd`, or `body` for the statuses without a file."""

    status: int
    headers: List[Tuple[str, str]] = field(default_factory=list)
    fd: int = -1
    offset: int = 0
    length: int = 0
    body: bytes = b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def match(all_mounts: Sequence[Mount], url: bytes) -> Optional[Mount]:
    """The mount serving this request target, if any (origin-form targets only)."""
    if url[:1] != b"/":
        return None
    path = url.split(b"?", 1)[0]
    for mount in all_mounts:
        if path.startswith(mount.prefix.encode("latin-1")):
            return mount
    return None


def _error(status: int, extra: Optional[List[Tuple[str, str]]] = None) -> Plan:
    body = ("%d %s\n" % (status, REASONS[status])).encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    return Plan(status, headers + (extra or []), body=body)


def _inside(root: bytes, path: bytes) -> Optional[bytes]:
    try:
        real = os.path.realpath(path)
    except (OSError, RecursionError):  # a symlink loop deeper than the stack: not found
        return None
    return real if real.startswith(root + b"/") else None


def _open_regular(path: bytes) -> Optional[Tuple[int, os.stat_result]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def accepts(header: str, coding: str) -> bool:
    """Whether Accept-Encoding allows `coding` (a q of all zero digits means no)."""
    qs: Dict[str, bool] = {}
    for part in header.split(","):
        name, _, params = part.partition(";")
        ok = True
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip(" \t").lower() == "q":
                ok = any(c in "123456789" for c in value)
        qs[name.strip(" \t").lower()] = ok
    if coding in qs:
        return qs[coding]
    if coding == "gzip" and "x-gzip" in qs:
        return qs["x-gzip"]
    return qs.get("*", False)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_http_date(text: str) -> Optional[int]:
    """IMF-fixdate ('Sun, 06 Nov 1994 08:49:37 GMT') as a Unix time; None for anything else."""
    t = text.strip(" \t")
    if (len(t) != 29 or t[3:5] != ", " or t[7] != " " or t[11] != " " or t[16] != " "
            or t[19] != ":" or t[22] != ":" or t[25:] != " GMT" or t[8:11] not in _MONTHS):
        return None
    digits = (t[5:7], t[12:16], t[17:19], t[20:22], t[23:25])
    if not all(d.isdigit() and d.isascii() for d in digits):
        return None
    day, year, hour, minute, second = (int(d) for d in digits)
    if not (1 <= day <= 31 and year >= 1970 and hour < 24 and minute < 60 and second < 61):
        return None
    return calendar.timegm((year, _MONTHS.index(t[8:11]) + 1, day, hour, minute, second, 0, 0, 0))


def _etag_matches(header: str, etag: str) -> bool:
    for candidate in header.split(","):
        candidate = candidate.strip(" \t")
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def _range(header: str, size: int) -> Optional[Tuple[int, int]]:
    """(first, last) of a satisfiable single range; (-1, -1) when unsatisfiable; None when
    the header is to be ignored (malformed, or several ranges)."""
    unit, _, spec = header.partition("=")
    spec = spec.strip(" \t")
    if unit.strip(" \t").lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.partition("-")
    first_text, last_text = first_text.strip(" \t"), last_text.strip(" \t")
    if not dash or any(not (t.isdigit() and t.isascii() and len(t) <= 18)
                       for t in (first_text, last_text) if t):
        return None
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return (-1, -1)
        return (max(0, size - suffix), size - 1)
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None
    if first >= size:
        return (-1, -1)
    return (first, min(last, size - 1))


def plan(mount: Mount, method: str, url: bytes, header: Callable[[str], Optional[str]]) -> Plan:
    """The answer to one request under `mount`; `header(NAME)` reads a request header by its
    CGI name (HTTP_IF_NONE_MATCH), None when absent. The caller closes the plan's fd."""
    if method not in ("GET", "HEAD"):
        return _error(405, [("Allow", "GET, HEAD")])
    path = url.split(b"?", 1)[0].split(b"#", 1)[0]
    rel = unquote_to_bytes(path[len(mount.prefix):])
    if not rel or b"\0" in rel or any(seg in (b"", b".", b"..") for seg in rel.split(b"/")):
        return _error(404)
    real = _inside(mount.root, mount.root + b"/" + rel)
    opened = _open_regular(real) if real is not None else None
    if opened is None:
        return _error(404)
    fd, st = opened
    name = rel.rsplit(b"/", 1)[-1]
    ext = name.rsplit(b".", 1)[-1].lower().decode("latin-1") if b"." in name else ""
    headers = [("Content-Type", MIME_TYPES.get(ext, DEFAULT_TYPE))]
    accept = header("HTTP_ACCEPT_ENCODING") or ""
    tag = ""
    has_variants = False
    for suffix, coding, etag_tag in ENCODINGS:
        sibling = _inside(mount.root, real + suffix)
        if sibling is None:
            continue
        if tag or not accepts(accept, coding):
            has_variants = has_variants or os.path.isfile(sibling)
            continue
        other = _open_regular(sibling)
        if other is not None:
            os.close(fd)
            fd, st = other
            tag = etag_tag
            has_variants = True
            headers.append(("Content-Encoding", coding))
    result = Plan(200, fd=fd)
    if has_variants:
        headers.append(("Vary", "Accept-Encoding"))
    # Whole seconds as the native engine reads them (st_mtim.tv_sec: the float would round
    # up at .999999999), and a time before 1970 as its 64-bit hex: the same ETag from both.
    mtime = st.st_mtime_ns // 1_000_000_000
    etag = '"%x-%x%s"' % (mtime & 0xFFFF_FFFF_FFFF_FFFF, st.st_size, "-" + tag if tag else "")
    validators = [("ETag", etag), ("Last-Modified", http_date(mtime))]
    inm = header("HTTP_IF_NONE_MATCH")
    ims = header("HTTP_IF_MODIFIED_SINCE")
    since = parse_http_date(ims) if inm is None and ims is not None else None
    if (inm is not None and _etag_matches(inm, etag)) or (since is not None and mtime <= since):
        result.close()
        kept = [h for h in headers if h[0] == "Vary"]
        return Plan(304, kept + validators)
    size = st.st_size
    span: Optional[Tuple[int, int]] = None
    range_header = header("HTTP_RANGE")
    if range_header is not None:
        if_range = header("HTTP_IF_RANGE")
        if if_range is not None:
            if_range = if_range.strip(" \t")
            fresh = (if_range == etag if if_range.startswith(('"', "W/"))
                     else parse_http_date(if_range) == mtime)
            if not fresh:
                range_header = None
    if range_header is not None:
        span = _range(range_header, size)
    if span == (-1, -1):
        result.close()
        # Its size is the chosen variant's: the Vary says which one (docs/static.md).
        vary = [h for h in headers if h[0] == "Vary"]
        return _error(416, vary + [("Content-Range", "bytes */%d" % size)])
    if span is not None:
        result.status = 206
        result.offset, result.length = span[0], span[1] - span[0] + 1
        headers.append(("Content-Range", "bytes %d-%d/%d" % (span[0], span[1], size)))
    else:
        result.length = size
    headers.insert(1, ("Content-Length", str(result.length)))
    result.headers = headers + validators + [("Accept-Ranges", "bytes")]
    return result
