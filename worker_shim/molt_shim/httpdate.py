"""The Date header, formatted without email.utils (which costs a worker's start-up time)."""
from __future__ import annotations

import time


def http_date(when: float) -> str:
    """RFC 9110 IMF-fixdate, e.g. 'Sun, 06 Nov 1994 08:49:37 GMT' (locale-independent)."""
    t = time.gmtime(when)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[t.tm_wday], t.tm_mday,
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
         "Dec")[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
