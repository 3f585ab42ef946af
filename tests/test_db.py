"""Database: migrations on SQLite and PostgreSQL, schema = models, sessions, queries, locks."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from db import migrate
from db.features import from_blob, get_feature, get_features, put_features, to_blob
from db.inbox import recent_images
from db.locks import acquire_lock, lock_holder, release_lock
from db.migrate import init_db
from db.models import (
    Alert,
    Base,
    DriftCheck,
    ImageRow,
    IngestionBatch,
    SiteLock,
    SiteRow,
    utcnow,
)
from db.session import make_engine, session_scope
from db.sites import get_site_row, upsert_site
from db.status import status_counts
from emowatch.sites import Site

REPO = Path(__file__).resolve().parents[1]
TABLES = set(Base.metadata.tables)


def _tables(url: str) -> set[str]:
    eng = make_engine(url)
    try:
        return set(sa.inspect(eng).get_table_names())
    finally:
        eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A migrated database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        url = request.getfixturevalue("pg_schema_url")
    init_db(url)
    return url


@pytest.fixture()
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def _site(name: str = "site-a", inbox: str = "/tmp/inbox-a") -> Site:
    return Site(name=name, inbox=Path(inbox))


# --- migrations -------------------------------------------------------------------------------


def _roundtrip(url: str) -> None:
    assert migrate.current(url) is None
    assert migrate.upgrade(url) == migrate.head()
    assert TABLES <= _tables(url)
    assert migrate.schema_diff(url) == []
    assert migrate.downgrade(url, "base") == "base"
    assert _tables(url) - {"alembic_version"} == set()
    assert migrate.current(url) is None
    assert migrate.upgrade(url) == migrate.head()
    assert TABLES <= _tables(url)
    assert init_db(url) == migrate.head()  # already at head: a no-op


def test_migrations_roundtrip_sqlite(tmp_path, monkeypatch):
    # run from an unrelated folder: the migrations are found from the package, not the CWD
    monkeypatch.chdir(tmp_path)
    _roundtrip(f"sqlite:///{tmp_path / 'x.db'}")


@pytest.mark.postgres
def test_migrations_roundtrip_postgres(pg_schema_url, pg_url):
    _roundtrip(pg_schema_url)
    schema = pg_schema_url.rsplit("%3D", 1)[1]
    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        where = (
            c.execute(
                sa.text(
                    "select table_schema from information_schema.tables where table_name = 'images'"
                )
            )
            .scalars()
            .all()
        )
        version_in_schema = c.execute(
            sa.text(
                "select count(*) from information_schema.tables "
                "where table_name = 'alembic_version' and table_schema = :s"
            ),
            {"s": schema},
        ).scalar_one()
    eng.dispose()
    assert schema in where
    assert version_in_schema == 1


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'step.sqlite'}"
    return request.getfixturevalue("pg_schema_url")


def test_the_estimate_migration_keeps_existing_checks(empty_url):
    """0002 -> 0003 adds drift_checks.estimate/impact (existing rows: NULL) and back."""
    url = empty_url
    assert migrate.upgrade(url, "0002") == "0002"
    eng = make_engine(url)
    with eng.begin() as c:
        c.execute(sa.text("insert into sites (id, name, inbox, config, created_at, updated_at) "
                          "values (1, 'a', '/in', '{}', :t, :t)"), {"t": utcnow()})
        c.execute(sa.text(
            "insert into drift_checks (id, site_id, model_name, model_version, decision, "
            "threshold, method, n_ref, n_cur, image_ids, details, created_at, updated_at) "
            "values (7, 1, 'm', '1', 'drift', 0.05, 'mmd', 10, 10, '[]', '{}', :t, :t)"),
            {"t": utcnow()})
    assert migrate.upgrade(url) == migrate.head()
    with session_scope(eng) as s:
        row = s.get(DriftCheck, 7)
        assert (row.decision, row.estimate, row.impact) == ("drift", None, None)
        row.estimate, row.impact = {"accuracy": 0.4, "verifiable": True}, "harmful"
    with session_scope(eng) as s:
        assert s.get(DriftCheck, 7).estimate["accuracy"] == 0.4
    eng.dispose()
    assert migrate.downgrade(url, "0002") == "0002"
    eng = make_engine(url)
    cols = {c["name"] for c in sa.inspect(eng).get_columns("drift_checks")}
    assert "estimate" not in cols and "impact" not in cols
    with eng.connect() as c:
        assert c.execute(sa.text("select decision from drift_checks where id = 7")).scalar() == "drift"
    eng.dispose()


def test_schema_diff_detects_a_difference(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    init_db(url)
    eng = make_engine(url)
    with eng.begin() as c:
        c.exec_driver_sql("DROP INDEX ix_images_sha256")
    eng.dispose()
    diff = migrate.schema_diff(url)
    assert any("ix_images_sha256" in repr(d) for d in diff)


@pytest.mark.postgres
def test_concurrent_init_db_postgres_takes_turns(pg_schema_url):
    # two processes migrating one empty schema at once: the advisory lock makes them take turns
    code = "import sys; from db.migrate import init_db; print(init_db(sys.argv[1]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, pg_schema_url],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert migrate.current(pg_schema_url) == migrate.head()


# --- engine and session -------------------------------------------------------------------------


def test_sqlite_engine_pragmas(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    with eng.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    eng.dispose()


def test_make_engine_rejects_other_databases():
    with pytest.raises(ValueError, match="SQLite .* or PostgreSQL"):
        make_engine("mysql://u@h/db")


def test_in_memory_sqlite_is_one_database():
    eng = make_engine("sqlite://")
    init_db(eng)
    with session_scope(eng) as s:
        upsert_site(s, _site())
    with session_scope(eng) as s:
        assert get_site_row(s, "site-a") is not None


def test_session_scope_commits_and_rolls_back(engine):
    with session_scope(engine) as s:
        upsert_site(s, _site("kept"))
    with pytest.raises(RuntimeError):
        with session_scope(engine) as s:
            upsert_site(s, _site("dropped"))
            raise RuntimeError("boom")
    with session_scope(engine) as s:
        assert get_site_row(s, "kept") is not None
        assert get_site_row(s, "dropped") is None


def test_foreign_keys_enforced(engine):
    with pytest.raises(sa.exc.IntegrityError):
        with session_scope(engine) as s:
            s.add(IngestionBatch(site_id=12345, owner="x"))


def test_datetimes_are_aware_utc(engine):
    local = dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with session_scope(engine) as s:
        sid = upsert_site(s, _site()).id
        s.add(IngestionBatch(site_id=sid, owner="x", started_at=local))
    with session_scope(engine) as s:
        b = s.execute(sa.select(IngestionBatch)).scalar_one()
        assert b.started_at == local
        assert b.started_at.utcoffset() == dt.timedelta(0)
        assert b.created_at.tzinfo is not None


def test_importing_db_has_no_side_effects(tmp_path):
    code = ("import db.models, db.session, db.migrate, db.sites, db.inbox, db.features, "
            "db.locks, db.status, db.outbox, tasks.ingest.pipeline, flows.ingest")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=600)
    assert list(tmp_path.iterdir()) == []


# --- queries ------------------------------------------------------------------------------------


def test_upsert_site_inserts_then_updates(engine):
    with session_scope(engine) as s:
        a = upsert_site(s, _site(inbox="/one"))
    with session_scope(engine) as s:
        b = upsert_site(s, Site(name="site-a", inbox=Path("/two"), policy="auto"))
        assert b.id == a.id
        assert b.inbox == "/two"
        assert b.config["policy"] == "auto"
        assert s.execute(sa.select(sa.func.count()).select_from(SiteRow)).scalar_one() == 1
    with session_scope(engine) as s:
        assert get_site_row(s, "site-a").inbox == "/two"
        assert get_site_row(s, "nope") is None


def test_recent_images_newest_first_ties_by_id(engine):
    t = utcnow()
    with session_scope(engine) as s:
        sid = upsert_site(s, _site()).id
        other = upsert_site(s, _site("site-b")).id
        for i, (site_id, ago) in enumerate([(sid, 10), (sid, 0), (sid, 0), (sid, 5), (other, -5)]):
            s.add(
                ImageRow(
                    site_id=site_id,
                    sha256=f"{i:064x}",
                    rel_path=f"{i}.jpg",
                    store_path="/x",
                    size_bytes=1,
                    format="JPEG",
                    width=32,
                    height=32,
                    mode="RGB",
                    ingested_at=t - dt.timedelta(seconds=ago),
                )
            )
    with session_scope(engine) as s:
        got = [r.rel_path for r in recent_images(s, sid, 3)]
        assert got == ["2.jpg", "1.jpg", "3.jpg"]  # same time: higher id first
        assert [r.rel_path for r in recent_images(s, sid, 10)][-1] == "0.jpg"
        assert recent_images(s, sid, 0) == []
        with pytest.raises(ValueError):
            recent_images(s, sid, -1)


def test_locks(engine):
    assert acquire_lock(engine, "adapt:site-a", "worker-1", ttl_s=60)
    assert not acquire_lock(engine, "adapt:site-a", "worker-2", ttl_s=60)
    assert acquire_lock(engine, "adapt:site-a", "worker-1", ttl_s=60)  # re-entrant refresh
    assert acquire_lock(engine, "adapt:site-b", "worker-2", ttl_s=60)  # other name: independent
    with session_scope(engine) as s:
        assert lock_holder(s, "adapt:site-a") == "worker-1"
    assert not release_lock(engine, "adapt:site-a", "worker-2")  # not theirs
    assert release_lock(engine, "adapt:site-a", "worker-1")
    assert not release_lock(engine, "adapt:site-a", "worker-1")
    assert acquire_lock(engine, "adapt:site-a", "worker-2", ttl_s=60)
    # expired: anyone may take it over
    with session_scope(engine) as s:
        s.execute(sa.update(SiteLock).values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    with session_scope(engine) as s:
        assert lock_holder(s, "adapt:site-a") is None
    assert acquire_lock(engine, "adapt:site-a", "worker-3", ttl_s=60)
    with session_scope(engine) as s:
        assert acquire_lock(s, "adapt:site-c", "worker-3", ttl_s=1) is True  # via a session
    with session_scope(engine) as s:
        assert lock_holder(s, "adapt:site-c") == "worker-3"
    with pytest.raises(ValueError):
        acquire_lock(engine, "x", "y", ttl_s=0)


def test_lock_race_has_one_winner(engine):
    n = 8
    barrier = threading.Barrier(n)
    wins: list[str] = []

    def contend(i: int) -> None:
        barrier.wait()
        if acquire_lock(engine, "race", f"w{i}", ttl_s=60):
            wins.append(f"w{i}")

    ts = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(wins) == 1


def test_feature_cache_roundtrip(engine):
    rng = np.random.default_rng(0)
    f = rng.normal(size=256)  # float64 in: stored as float32
    p = np.full(6, 1 / 6, np.float32)
    with session_scope(engine) as s:
        assert (
            put_features(s, "m/1", [("a" * 64, f, p, {"brightness": 0.5}), ("b" * 64, f[:3], p)])
            == 2
        )
        assert put_features(s, "m/1", [("a" * 64, f * 0, p)]) == 0  # existing entries are kept
        assert put_features(s, "m/2", [("a" * 64, f * 2, p)]) == 1
    with session_scope(engine) as s:
        got = get_features(s, ["a" * 64, "b" * 64, "c" * 64], "m/1")
        assert set(got) == {"a" * 64, "b" * 64}
        a = got["a" * 64]
        assert a.features.dtype == np.float32 and a.features.shape == (256,)
        np.testing.assert_array_equal(a.features, f.astype(np.float32))
        np.testing.assert_array_equal(a.probs, p)
        assert a.quality == {"brightness": 0.5}
        np.testing.assert_array_equal(
            get_feature(s, "a" * 64, "m/2").features, (f * 2).astype(np.float32)
        )
        assert get_feature(s, "c" * 64, "m/1") is None
    with pytest.raises(ValueError, match="1-D"):
        to_blob(np.zeros((2, 2)))
    with pytest.raises(ValueError):
        from_blob(b"abc")


def test_status_counts(engine):
    with session_scope(engine) as s:
        sid = upsert_site(s, _site()).id
        upsert_site(s, _site("site-b"))
        s.add(
            ImageRow(
                site_id=sid,
                sha256="1" * 64,
                rel_path="a.jpg",
                store_path="/x",
                size_bytes=1,
                format="JPEG",
                width=32,
                height=32,
                mode="RGB",
            )
        )
        s.add(IngestionBatch(site_id=sid, owner="x", status="done"))
        s.add(
            DriftCheck(
                site_id=sid,
                model_name="m",
                model_version="1",
                decision="no_drift",
                threshold=0.05,
                method="mmd",
                n_ref=10,
                n_cur=10,
            )
        )
        s.add(Alert(site_id=sid, kind="drift", subject="s", body="b"))
    with session_scope(engine) as s:
        c = status_counts(s)
    a = c["sites"]["site-a"]
    assert (a["images"], a["batches"], a["drift_checks"], a["alerts_pending"]) == (1, 1, 1, 1)
    assert a["last_batch_status"] == "done" and a["last_drift"] == "no_drift"
    assert dt.datetime.fromisoformat(a["last_ingest_at"]).tzinfo is not None
    assert c["sites"]["site-b"]["images"] == 0 and c["sites"]["site-b"]["last_ingest_at"] is None
    assert (
        c["totals"]["sites"] == 2
        and c["totals"]["images"] == 1
        and c["totals"]["alerts_pending"] == 1
    )
