"""One redaction helper for everything a person or a log may read.

``redact(text)`` hides the password of every URL in ``text`` (``scheme://user:pw@host`` ->
``scheme://user:***@host``) and any secret value registered with :func:`register_secret`
(the SMTP password, a token in a URL query). Errors, log lines and JSON fields that can hold a
URL or a setting go through it before they leave the process.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

# ``scheme://user:password@host`` (SQLAlchemy and http URLs alike); the password may hold any
# character but '@', '/' and whitespace.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]+(?P<tail>@)")
# ``?password=...``, ``&token=...`` and the like in URLs and connection strings
_QUERY_SECRET = re.compile(r"(?P<head>[?&;\s](?:password|passwd|pwd|token|secret|api[_-]?key)=)"
                           r"[^&;\s]+", re.IGNORECASE)
MASK = "***"
_SECRETS: set[str] = set()
_LOCK = threading.Lock()
_FACTORY_INSTALLED = False


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


def redact_tree(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every string redacted;
    other values are left as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(v) for v in value]
    return value


def _redact_record(record: logging.LogRecord) -> None:
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001 -- a bad format string is the handler's to report
        return
    clean = redact(msg)
    if clean != msg:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        # handlers format the traceback from exc_text when it is set: set it, redacted
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))


def install_log_redaction() -> None:
    """Redact every log line of this process from now on: a log-record factory hides URL
    passwords and registered secrets in each record's message before any handler (stderr,
    Prefect's API log handler) sees it. Idempotent; called at the start of a command or a flow
    run (never at import)."""
    global _FACTORY_INSTALLED
    with _LOCK:
        if _FACTORY_INSTALLED:
            return
        _FACTORY_INSTALLED = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)


def register_url_password(url: str | None) -> None:
    """Register the password of ``url`` (and its percent-decoded form) as a secret."""
    from urllib.parse import unquote, urlsplit

    if not url:
        return
    try:
        pw = urlsplit(url).password
    except ValueError:
        return
    if pw:
        register_secret(pw)
        register_secret(unquote(pw))


def redact_url(url: str | None) -> str | None:
    """``url`` with any password hidden (None stays None)."""
    return None if url is None else redact(url)


__all__ = ["MASK", "install_log_redaction", "redact", "redact_tree",
           "redact_url", "register_secret", "register_url_password"]
