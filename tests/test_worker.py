"""The warm check worker (deployments.worker, issue 34): which sites are due, one check per
fire time, the lock that keeps two workers off one site, a failed check due again."""

from __future__ import annotations

import datetime as dt

import pytest

from deployments.worker import Worker, due_sites, last_fire

UTC = dt.UTC


def t(h: int, m: int, s: int = 0) -> dt.datetime:
    return dt.datetime(2026, 12, 7, h, m, s, tzinfo=UTC)


def test_last_fire_is_the_newest_cron_time_not_after_now():
    assert last_fire("0 * * * *", t(12, 34, 30)) == t(12, 0)
    assert last_fire("*/5 * * * *", t(12, 34, 59)) == t(12, 30)
    assert last_fire("*/5 * * * *", t(12, 35)) == t(12, 35)  # the minute it fires
    assert last_fire("30 6 * * *", t(6, 29)) == t(6, 30) - dt.timedelta(days=1)


def test_a_site_is_due_when_its_schedule_fired_after_its_last_check():
    crons = {"lobby": "0 * * * *", "night": "*/5 * * * *", "new": "0 0 * * *"}
    last = {"lobby": t(12, 0, 4), "night": t(12, 26), "new": None}
    # lobby was checked for 12:00; night's 12:30 fire has no check yet; new was never checked
    assert due_sites(crons, last, t(12, 34)) == ["new", "night"]
    assert due_sites(crons, {**last, "night": t(12, 30, 2), "new": t(0, 0, 9)}, t(12, 34)) == []
    assert due_sites(crons, last, t(13, 0, 1)) == ["lobby", "new", "night"]


@pytest.fixture
def world(tmp_path):
    from db import sites as db_sites
    from db.session import session_scope
    from emowatch.settings import Settings
    from emowatch.sites import Site
    from tasks.context import Runtime

    settings = Settings(home=tmp_path / "home")
    rt = Runtime.open(settings)
    with session_scope(rt.engine) as s:
        for name in ("a", "b"):
            db_sites.upsert_site(s, Site(name=name, inbox=str(tmp_path / name)))
    return settings, rt


def _record(rt, site: str, when: dt.datetime) -> None:
    from db import checks, sites
    from db.session import session_scope

    with session_scope(rt.engine) as s:
        sid = sites.require_site_row(s, site).id
        cid = checks.add_check(s, site_id=sid, model_name="m", model_version="1",
                               decision="no_drift", threshold=0.05, method="mmd", n_ref=1, n_cur=1)
        checks.update_check(s, cid, created_at=when)


def test_a_tick_checks_each_due_site_once_and_a_failed_check_is_due_again(world):
    settings, rt = world
    ran: list[str] = []
    pages: list[list[str]] = []

    def check(site: str) -> dict:
        ran.append(site)
        if site == "b" and ran.count("b") == 1:
            raise RuntimeError("the worker died in the middle of b's check")
        _record(rt, site, t(12, 0, 5))
        return {"decision": "no_drift"}

    w = Worker(settings, {"a": "* * * * *", "b": "* * * * *"}, check=check, tick_hook=pages.append)
    out = w.tick(t(12, 0, 1))
    assert ran == ["a", "b"] and out[0]["decision"] == "no_drift" and "error" in out[1]
    assert pages == [["a", "b"]]  # the status page once per tick, not once per check
    out = w.tick(t(12, 0, 20))  # a's check is recorded for 12:00; b's failed: due again
    assert ran == ["a", "b", "b"] and [d["site"] for d in out] == ["b"]
    assert w.tick(t(12, 0, 40)) == [] and len(pages) == 2
    assert w.checks_done == 3
    assert [d["site"] for d in w.tick(t(12, 1, 0))] == ["a", "b"]  # the next fire time


def test_a_site_another_worker_is_checking_is_left_alone(world):
    from db import locks

    settings, rt = world
    ran: list[str] = []
    w = Worker(settings, {"a": "* * * * *"}, check=ran.append, tick_hook=lambda _s: None)
    other = w.owner + ":other-worker"  # a live holder: this very process
    assert locks.acquire_lock(rt.engine, "check:a", other, 60)
    assert w.tick(t(12, 0, 1)) == [{"site": "a", "skipped": "another worker is checking it"}]
    assert ran == []
    locks.release_lock(rt.engine, "check:a", other)
    w.tick(t(12, 0, 2))
    assert ran == ["a"]


def test_a_site_checked_by_another_worker_meanwhile_is_not_checked_again(world, monkeypatch):
    """Two workers read "due" at once; the first checks and records, then releases its lock;
    the second gets the lock after that and must see the record, not check again."""
    settings, rt = world
    ran: list[str] = []
    w = Worker(settings, {"a": "0 * * * *"}, check=ran.append, tick_hook=lambda _s: None)
    stale = w.last_checks()  # what the second worker read before the first one recorded
    _record(rt, "a", t(12, 0, 5))
    reads = iter([stale])
    real = w.last_checks
    monkeypatch.setattr(w, "last_checks", lambda: next(reads, None) or real())
    assert w.tick(t(12, 0, 6)) == [] and ran == []


def test_the_worker_asks_for_a_restart_after_its_checks_or_memory(world):
    settings, _ = world
    w = Worker(settings, {}, check=lambda s: None, tick_hook=lambda s: None, max_checks=2)
    assert w.should_restart() is None
    w.checks_done = 2
    assert "2 checks" in w.should_restart()
    w = Worker(settings, {}, check=lambda s: None, tick_hook=lambda s: None, max_rss_gib=1e-6)
    assert "resident memory" in w.should_restart()
