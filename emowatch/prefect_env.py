"""The Prefect settings emowatch gives its own defaults (the user's environment always wins).

Prefect reads its settings from the environment once, when ``prefect`` is first imported, so
these must be in place before that: the ``emowatch`` command applies them first thing
(``deployments.cli.main``), the tests in ``pytest_configure``; processes Prefect starts
(``emowatch serve``'s flow runs, the temporary server) inherit them.

Why the start-up allowance: without ``PREFECT_API_URL`` every flow command starts Prefect's
temporary server and waits for it to answer, 20 s by Prefect's default. Measured on a 2-core
machine (``python -c 'SubprocessASGIServer().start()'``): 12 s for the first start in a fresh
``PREFECT_HOME`` (it creates its database), 4 s warm, 11-12 s with four busy processes on the
two cores; CI on an idle machine still saw the 20 s run out once. A server that has not
answered in 180 s is broken, not slow.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

STARTUP_TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 180

DEFAULTS: dict[str, str] = {
    # keep runs quiet and local: no telemetry from the temporary server
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    STARTUP_TIMEOUT_VAR: str(DEFAULT_STARTUP_TIMEOUT_S),
}

_TIMEOUT_TEXT = "attempting to connect to ephemeral Prefect API server"


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Put :data:`DEFAULTS` into ``environ`` (default ``os.environ``) where nothing is set."""
    env = os.environ if environ is None else environ
    for k, v in DEFAULTS.items():
        env.setdefault(k, v)


def startup_timeout_s(environ: MutableMapping[str, str] | None = None) -> int:
    """The allowance in force: the environment's, else emowatch's default."""
    env = os.environ if environ is None else environ
    try:
        return int(float(env.get(STARTUP_TIMEOUT_VAR, DEFAULT_STARTUP_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_STARTUP_TIMEOUT_S


def explain_startup_timeout(message: str, environ: MutableMapping[str, str] | None = None) -> str:
    """``message`` with what to do appended when it is Prefect's temporary-server time-out."""
    if _TIMEOUT_TEXT not in message:
        return message
    first = message.split(" stdout:", 1)[0].rstrip()
    return (f"{first} It did not answer within {startup_timeout_s(environ)} s. On a busy "
            f"machine set {STARTUP_TIMEOUT_VAR} higher (seconds), or run one Prefect server "
            "(`prefect server start`) and point every command at it with "
            "PREFECT_API_URL=http://127.0.0.1:4200/api.")
