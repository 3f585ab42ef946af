"""Which process holds something: owner strings ``"<host>:<pid>[:<more>]"`` and whether that
process still runs (locks, ingestion batches and temp files of a killed process are taken over
at once on the same host, after a time-out elsewhere)."""

from __future__ import annotations

import os
import socket


def owner(suffix: str = "") -> str:
    """This process as an owner string."""
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


def alive(pid: int) -> bool:
    """Does process ``pid`` of this host run (a process we may not signal does)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_is_dead(owner_str: str | None) -> bool:
    """True only when ``owner_str`` names another process of THIS host that no longer runs
    (an owner on another host is never judged dead from here)."""
    host, _, rest = (owner_str or "").partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not alive(int(pid))


__all__ = ["alive", "owner", "owner_is_dead"]
