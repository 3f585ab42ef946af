"""The warm check worker: every site's scheduled monitor check in one long-lived process.

``emowatch serve`` starts it (``python -m deployments.worker``) beside the Prefect runner that
serves the other deployments, and starts it again when it exits. Each minute it ticks:

* **due** sites: a site is due when its cron schedule has fired since its last recorded check
  (``db.checks``), so a check that died with the worker (no record) is due again at the next
  tick, and one that was recorded is never run twice for the same fire time;
* each due site is checked in this process (``flows.monitor.monitor_site``, a Prefect flow run
  with its logs and state in the UI) under the database lock ``check:<site>``: two workers
  never check one site at once;
* the libraries, the database engine, the registry client and the models (``Registry.load_model``
  cache, refused when a file changed on disk) stay loaded between checks; the registry sync
  (its own deployment, every 2 minutes) and the status page (once per tick) leave the check's
  hot path.

Supervision: the worker exits with :data:`RESTART` after ``max_checks`` checks or when its
resident memory passes ``max_rss_gib``; the supervisor (``serve``) starts a fresh one.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from emowatch.processes import owner

log = logging.getLogger("emowatch.worker")

RESTART = 3  # exit code: "start me again" (after max_checks or above the memory limit)
LOCK_TTL_S = 3600.0  # a check lock outlives any check; a dead holder is taken over at once


def last_fire(cron: str, now: dt.datetime) -> dt.datetime:
    """The most recent time at or before ``now`` (aware, UTC) at which ``cron`` fired."""
    from cronsim import CronSim

    now = now.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    return next(iter(CronSim(cron, now.replace(tzinfo=None), reverse=True))).replace(
        tzinfo=dt.UTC)


def due_sites(schedules: Mapping[str, str], last_checks: Mapping[str, dt.datetime | None],
              now: dt.datetime) -> list[str]:
    """Sites (name -> cron) whose schedule fired after their last recorded check (or that
    were never checked), in name order."""
    out = []
    for name in sorted(schedules):
        last = last_checks.get(name)
        if last is None or last.astimezone(dt.UTC) < last_fire(schedules[name], now):
            out.append(name)
    return out


def rss_gib() -> float:
    """This process's resident memory in GiB (0 where /proc is not available)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return 0.0


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``): a check's
    images and frames are freed at its end, but glibc keeps the pages, and the worker's
    resident memory -- what its restart limit and the operator see -- only grows."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass
class Worker:
    """One warm worker (module docstring). ``check``: runs one site's check (default: the
    monitor flow in this process); ``tick_hook``: after every tick that checked something
    (default: the status page)."""

    settings: Any
    schedules: dict[str, str]
    check: Callable[[str], Any] | None = None
    tick_hook: Callable[[list[str]], Any] | None = None
    max_checks: int | None = None
    max_rss_gib: float | None = None
    checks_done: int = 0
    owner: str = field(default_factory=owner)

    def __post_init__(self) -> None:
        from tasks.context import Runtime

        self.cluster: Any = None
        if self.settings.task_runner == "dask" and not self.settings.dask_address:
            self.settings = self._local_cluster(self.settings)
        self.runtime = Runtime.open(self.settings)  # migrates the database once
        self.engine = self.runtime.engine
        if self.check is None:
            self.check = self._monitor
        if self.tick_hook is None:
            self.tick_hook = self._status_page

    # --- one tick -------------------------------------------------------------------------------
    def last_checks(self) -> dict[str, dt.datetime | None]:
        from db import checks
        from db.session import session_scope

        with session_scope(self.engine) as s:
            return checks.last_check_times(s, list(self.schedules))

    def tick(self, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Check every due site once; returns what happened per site."""
        from db import locks

        now = now or dt.datetime.now(dt.UTC)
        done = []
        for name in due_sites(self.schedules, self.last_checks(), now):
            lock = f"check:{name}"
            if not locks.acquire_lock(self.engine, lock, self.owner, LOCK_TTL_S):
                done.append({"site": name, "skipped": "another worker is checking it"})
                continue
            if name not in due_sites({name: self.schedules[name]}, self.last_checks(), now):
                # another worker checked it between our reading and our lock
                locks.release_lock(self.engine, lock, self.owner)
                continue
            t0 = time.perf_counter()
            try:
                out = self.check(name)
                done.append({"site": name, "seconds": round(time.perf_counter() - t0, 2),
                             "decision": (out or {}).get("decision")})
            except Exception as e:  # noqa: BLE001 -- one site failing never stops the others
                log.exception("check of %s failed", name)
                done.append({"site": name, "error": f"{type(e).__name__}: {e}"})
            finally:
                locks.release_lock(self.engine, lock, self.owner)
                self.checks_done += 1
        if done:
            self.tick_hook([d["site"] for d in done])
            release_free_memory()
        return done

    def should_restart(self) -> str | None:
        if self.max_checks is not None and self.checks_done >= self.max_checks:
            return f"{self.checks_done} checks done (limit {self.max_checks})"
        rss = rss_gib()
        if self.max_rss_gib is not None and rss > self.max_rss_gib:
            return f"resident memory {rss:.2f} GiB (limit {self.max_rss_gib:g})"
        return None

    def run(self, stop: threading.Event, tick_s: float = 60.0) -> str:
        """Tick at every ``tick_s`` boundary until ``stop`` is set (returns "stopped") or a
        restart is due (returns why)."""
        while not stop.is_set():
            self.tick()
            why = self.should_restart()
            if why:
                return why
            stop.wait(tick_s - time.time() % tick_s)
        return "stopped"

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def _local_cluster(self, settings: Any) -> Any:
        """``task_runner = "dask"`` without an address: one local cluster (2 worker processes)
        for the worker's life, not one started and torn down per check."""
        from distributed import LocalCluster

        from flows.runner import LOCAL_CLUSTER

        self.cluster = LocalCluster(**LOCAL_CLUSTER)
        return settings.model_copy(update={"dask_address": self.cluster.scheduler_address})

    # --- the defaults ---------------------------------------------------------------------------
    def _monitor(self, site: str) -> dict[str, Any]:
        from flows.monitor import monitor_site
        from flows.runner import configured

        return configured(monitor_site, self.settings)(
            site=site, settings=self.settings, sync_registry=False, status_page=False)

    def _status_page(self, _sites: Iterable[str]) -> None:
        from tasks.reports.pages import write_status_page

        try:
            write_status_page(self.runtime)
        except Exception:  # noqa: BLE001 -- a page is never worth a check
            log.exception("could not write the status page")


def main(argv: list[str] | None = None) -> int:
    """``python -m deployments.worker``: the sites file's monitor checks until SIGTERM;
    exit code :data:`RESTART` when a restart is due."""
    import argparse
    import signal

    from emowatch.settings import Settings
    from emowatch.sites import load_sites

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-checks", type=int, default=None)
    ap.add_argument("--max-rss-gib", type=float, default=None)
    ap.add_argument("--tick-s", type=float, default=60.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    sites = load_sites(settings.sites_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    w = Worker(settings, {n: s.schedule for n, s in sites.items()},
               max_checks=args.max_checks if args.max_checks is not None else settings.worker_max_checks,
               max_rss_gib=args.max_rss_gib if args.max_rss_gib is not None else settings.worker_max_rss_gib)
    try:
        why = w.run(stop, args.tick_s)
    finally:
        w.close()
    log.info("worker %s: %s", w.owner, why)
    return 0 if why == "stopped" else RESTART


if __name__ == "__main__":
    sys.exit(main())
