"""Shared fixtures. Keep this file small: fixtures for one area live in that area's test file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Quiet, local, deterministic runs: no telemetry from Prefect's temporary server or MLflow;
    # the temporary server's start-up allowance of the emowatch command (before Prefect loads).
    from emowatch.prefect_env import apply_defaults

    apply_defaults()
    for k, v in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("PREFECT_TASKS_DEFAULT_NO_CACHE", "true")):
        os.environ.setdefault(k, v)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data sets (ckplus48/, emotion6/). Fails when CI says they are required."""
    raw = os.environ.get("EMOWATCH_DATA_DIR") or str(REPO.parent / "shared" / "data")
    p = Path(raw)
    ok = (p / "ckplus48").is_dir() and (p / "emotion6" / "images").is_dir()
    if not ok:
        msg = f"real data not found at {p} (set EMOWATCH_DATA_DIR)"
        if _flag("EMOWATCH_REQUIRE_DATA") or _flag("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of a reachable PostgreSQL; fails when CI says it is required."""
    url = os.environ.get("EMOWATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        import sqlalchemy as sa

        eng = sa.create_engine(url)
        with eng.connect() as c:
            c.execute(sa.text("select 1"))
        eng.dispose()
    except Exception as e:  # noqa: BLE001
        msg = f"PostgreSQL not reachable at {url}: {e}"
        if _flag("EMOWATCH_REQUIRE_PG") or _flag("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return url


@pytest.fixture()
def pg_schema_url(pg_url: str):
    """A fresh, empty PostgreSQL schema for one test (dropped afterwards)."""
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_url else "?"
    yield f"{pg_url}{sep}options=-csearch_path%3D{schema}"
    with eng.begin() as c:
        c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    eng.dispose()


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    """Settings pointing all state into a temp dir (the environment says the same, for the
    code under test that starts from ``Settings()``, like the CLI)."""
    from emowatch.settings import Settings

    monkeypatch.setenv("EMOWATCH_HOME", str(tmp_path / "home"))
    for k in ("EMOWATCH_DATABASE_URL", "EMOWATCH_MLFLOW_TRACKING_URI", "EMOWATCH_SMTP_HOST"):
        monkeypatch.delenv(k, raising=False)
    s = Settings()
    s.ensure_dirs()
    return s


@pytest.fixture()
def runtime(settings):
    """A Runtime (migrated SQLite database, MLflow registry) in the temp home."""
    from tasks.context import Runtime

    return Runtime.open(settings)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API + database for the tests that run a flow (~10-15 s to start,
    once per session; allowed as long as the emowatch command allows its temporary server)."""
    from prefect.testing.utilities import prefect_test_harness

    from emowatch.prefect_env import startup_timeout_s

    with prefect_test_harness(server_startup_timeout=startup_timeout_s()):
        yield
