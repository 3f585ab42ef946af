"""Prefect's temporary server on a busy machine: the allowance, the error, a flow command that
completes while both cores are saturated."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_defaults_fill_only_what_the_user_left_unset():
    from emowatch.prefect_env import DEFAULT_STARTUP_TIMEOUT_S, STARTUP_TIMEOUT_VAR, apply_defaults

    env: dict[str, str] = {"DO_NOT_TRACK": "0"}
    apply_defaults(env)
    assert env[STARTUP_TIMEOUT_VAR] == str(DEFAULT_STARTUP_TIMEOUT_S)
    assert env["DO_NOT_TRACK"] == "0"  # the user's value stays
    env = {STARTUP_TIMEOUT_VAR: "600"}
    apply_defaults(env)
    assert env[STARTUP_TIMEOUT_VAR] == "600"


def test_the_timeout_error_says_what_to_set():
    from emowatch.prefect_env import STARTUP_TIMEOUT_VAR, explain_startup_timeout

    raw = ("Timed out while attempting to connect to ephemeral Prefect API server. "
           "stdout: lots of server output")
    msg = explain_startup_timeout(raw, {STARTUP_TIMEOUT_VAR: "45"})
    assert "within 45 s" in msg and STARTUP_TIMEOUT_VAR in msg and "PREFECT_API_URL" in msg
    assert "lots of server output" not in msg
    assert explain_startup_timeout("unknown site 'x'") == "unknown site 'x'"


def test_cli_applies_the_allowance_before_prefect_loads(tmp_path):
    """`emowatch` in a fresh process: the value Prefect itself reads is emowatch's default,
    or the user's."""
    from emowatch.prefect_env import DEFAULT_STARTUP_TIMEOUT_S, STARTUP_TIMEOUT_VAR

    code = ("import sys; sys.argv = ['emowatch', '--help']\n"
            "from deployments.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as S\n"
            "print('VALUE', S.value())\n")
    env = {k: v for k, v in os.environ.items() if k != STARTUP_TIMEOUT_VAR}
    for given, want in ((None, DEFAULT_STARTUP_TIMEOUT_S), ("77", 77)):
        if given is not None:
            env[STARTUP_TIMEOUT_VAR] = given
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                             capture_output=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"VALUE {want}" in out.stdout


@contextlib.contextmanager
def saturated() -> Iterator[list[subprocess.Popen]]:
    """Twice as many processes as cores that keep them busy for the ``with`` block; they must
    still run at its end (the machine was busy the whole time), and are killed after."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(2 * (os.cpu_count() or 2))]
    try:
        assert [p.poll() for p in burners] == [None] * len(burners)  # they are running
        yield burners
        assert all(p.poll() is None for p in burners)  # still running at the end: it was busy
    finally:
        for p in burners:
            p.kill()
            p.wait()


def test_a_flow_command_completes_while_both_cores_are_saturated(tmp_path):
    """`emowatch ingest` (a Prefect flow) with no Prefect server configured starts the
    temporary server in a fresh PREFECT_HOME (its slowest start: it creates its database)
    while twice as many busy processes as cores run beside it. It must complete."""
    from PIL import Image

    inbox = tmp_path / "in"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(inbox / f"{i}.png")
    sites = tmp_path / "sites.toml"
    sites.write_text('[sites.busy]\ninbox = "in"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    env.update(EMOWATCH_HOME=str(tmp_path / "home"), EMOWATCH_SITES_FILE=str(sites),
               PREFECT_HOME=str(tmp_path / "prefect"))
    with saturated():
        r = subprocess.run([sys.executable, "-m", "deployments.cli", "ingest", "busy", "--json"],
                           cwd=REPO, env=env, text=True, capture_output=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["ingested"] == 6 and out["quarantined"] == []


def test_a_server_that_cannot_start_in_time_gives_the_hint(tmp_path):
    """With an allowance shorter than any start, the command fails (exit 1) with the hint,
    not with Prefect's bare message."""
    seconds = "1"  # no start is that fast: the import alone takes ~3 s
    (tmp_path / "in").mkdir()
    sites = tmp_path / "sites.toml"
    sites.write_text('[sites.slow]\ninbox = "in"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(EMOWATCH_HOME=str(tmp_path / "home"), EMOWATCH_SITES_FILE=str(sites),
               PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=seconds)
    r = subprocess.run([sys.executable, "-m", "deployments.cli", "ingest", "slow", "--json"],
                       cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    err = json.loads(r.stdout)["error"]
    assert f"within {seconds} s" in err and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in err
