"""One redaction helper for everything a person or a log may read.

``redact(text)`` hides the password of every URL in ``text`` (``scheme://user:pw@host`` ->
``scheme://user:***@host``) and any secret value registered with :func:`register_secret`
(the SMTP password, a token in a URL query). Errors, log lines and JSON fields that can hold a
URL or a setting go through it before they leave the process.
"""

from __future__ import annotations

import re
import threading

# ``scheme://user:password@host`` (SQLAlchemy and http URLs alike); the password may hold any
# character but '@', '/' and whitespace.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]+(?P<tail>@)")
# ``?password=...``, ``&token=...`` and the like in URLs and connection strings
_QUERY_SECRET = re.compile(r"(?P<head>[?&;\s](?:password|passwd|pwd|token|secret|api[_-]?key)=)"
                           r"[^&;\s]+", re.IGNORECASE)
MASK = "***"
_SECRETS: set[str] = set()
_LOCK = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears from now on (values under 4 characters are too
    likely to occur by chance and are masked only inside URLs)."""
    if value and len(value) >= 4:
        with _LOCK:
            _SECRETS.add(value)


def redact(text: object) -> str:
    """``text`` as a string with URL passwords and registered secrets replaced by ***."""
    s = str(text)
    s = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", s)
    s = _QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}", s)
    with _LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for v in secrets:
        s = s.replace(v, MASK)
    return s


def redact_url(url: str | None) -> str | None:
    """``url`` with any password hidden (None stays None)."""
    return None if url is None else redact(url)


__all__ = ["MASK", "redact", "redact_url", "register_secret"]
