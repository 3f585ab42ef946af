"""What 1, 10 and 100 sites cost with the warm check worker (``emowatch serve``'s default).

    EMOWATCH_DATA_DIR=../shared/data python -m bench.scale_warm [--sites 1,10,100] [--new 20]
        [--rounds 2] [--big 500] [--dask-sites 0] [--precision fp32] [--json] [--keep]

(``python -m bench.scale`` runs this too: the warm worker is ``emowatch serve``'s default.)

The setting is bench/scale.py's (its ``Bench``: two fresh PostgreSQL databases, a ``prefect
server`` started here, a source model trained with ``emowatch train`` on 40 photos per class,
unique re-encoded Emotion6 photos per site), but the sites are scheduled every minute and
``emowatch serve`` runs their checks in its warm worker (``deployments.worker``), each check a
``monitor_site`` flow run recorded by the server. Per level (N sites): a first tick (40 photos
per site to featurize), then ``--rounds`` minutes with ``--new`` new photos per site dropped
before each tick. Per steady check, from the flow run the server recorded: end to end from the
minute its schedule fired to the end of the run (p50, p95: a tick checks its due sites one
after the other, so the last site of a tick waits for the others), in the flow; the worker's
CPU seconds per check (serve and its children, psutil), what 100 sites checked hourly would
take of the 2 cores, checks per hour one worker can do, peak memory of serve + worker and of
the Prefect server, database rows and bytes per check. Then a site of ``--big`` cached photos
with 20 new ones per minute (issue 34's steady check), and ``--dask-sites`` sites with
``EMOWATCH_TASK_RUNNER=dask`` (the worker's one local Dask cluster). The source model is built
in ``--precision`` (fp32 by default: what most CPUs run; bf16 where native is a bonus).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
import zlib

import numpy as np

from bench.scale_base import FIRST, Bench, Memory, note, parse_args


def _cpu_seconds(pid: int) -> float:
    import psutil

    try:
        p = psutil.Process(pid)
        total = 0.0
        for q in [p, *p.children(recursive=True)]:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0.0


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes: the worker, serve's
    deployment runs, PostgreSQL, the Prefect server)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


class WarmBench(Bench):
    idle_busy_per_s: float | None = None

    def idle(self, names: list[str], seconds: float) -> float:
        """Busy CPU seconds per second of the machine with ``emowatch serve`` running for the
        sites ``names`` (all checked already) and no check due (its other deployments: the
        registry sync every 2 minutes, the worker's ticks): the fixed cost of serving."""
        self.write_sites(names, "0 0 1 1 *")  # checked since its last fire: never due
        self.start_serve([])
        try:
            time.sleep(30)  # start-up
            b0, t0 = _busy_seconds(), time.perf_counter()
            time.sleep(seconds)
            return (_busy_seconds() - b0) / (time.perf_counter() - t0)
        finally:
            self.stop_serve()

    def write_sites(self, names: list[str], schedule: str = "* * * * *") -> None:
        super().write_sites(names, schedule)  # every minute: the worker's ticks check them

    def _checks(self) -> int:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{self.db}") as c:
            try:
                return int(c.execute("SELECT count(*) FROM drift_checks").fetchone()[0])
            except psycopg.errors.UndefinedTable:
                return 0

    def _wait_checks(self, total: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while self._checks() < total:
            if self.serve is not None and self.serve.poll() is not None:
                raise SystemExit(f"emowatch serve exited: see {self.tmp}/serve.log")
            if time.time() > deadline:
                raise SystemExit(f"{total} checks not recorded in {timeout_s:.0f} s: see "
                                 f"{self.tmp}/serve.log")
            time.sleep(1)

    def _runs(self, since: dt.datetime) -> list:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterStartTime,
        )

        out: list = []
        with get_client(sync_client=True) as c:
            while True:
                page = c.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["monitor_site"])),
                    flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
                    limit=200, offset=len(out))
                out += page
                if len(page) < 200:
                    return out

    def _wait_runs(self, since: dt.datetime, total: int, timeout_s: float) -> list:
        """The completed monitor runs started since ``since``, once ``total`` of them are
        final and none is still running (or at the timeout)."""
        deadline = time.time() + timeout_s
        while True:
            runs = self._runs(since)
            final = [fr for fr in runs if fr.state and fr.state.is_final()]
            if (len(final) >= total and len(final) == len(runs)) or time.time() > deadline:
                return [fr for fr in final if fr.state.is_completed()]
            time.sleep(1)

    def level(self, n: int, label: str, new: int, rounds: int, first: int = FIRST,
              extra_env: dict[str, str] | None = None) -> dict:
        assert self.photos is not None
        names = [f"{label}{i:03d}" for i in range(n)]
        self.write_sites(names)
        base = self._checks()
        for i, s in enumerate(names):
            self.photos.drop(self.tmp / "inbox" / s, first, zlib.crc32(f"{label}{i}".encode()))
        started = dt.datetime.now(dt.UTC)
        self.start_serve([], extra_env)
        mem, srv_mem = Memory(self.serve.pid), Memory(self.server.pid)  # type: ignore[union-attr]
        try:
            self._wait_checks(base + n, 1800)  # the first tick: everything to featurize
            self._wait_runs(started, n, 600)
            note(self.t0, f"{label} x{n}: first tick done")
            rows0, size0 = self.db_size()
            cpu0 = _cpu_seconds(self.serve.pid)  # type: ignore[union-attr]
            busy0 = _busy_seconds()
            since = dt.datetime.now(dt.UTC)
            for r in range(rounds):
                for i, s in enumerate(names):
                    self.photos.drop(self.tmp / "inbox" / s, new,
                                     zlib.crc32(f"{label}{i}/{r}".encode()))
                self._wait_checks(base + n * (r + 2), 1800)
                note(self.t0, f"{label} x{n}: steady tick {r + 1} done")
            # a check is counted in the database before its flow run ends: wait for the runs
            runs = self._wait_runs(since, n * rounds, 600)
            cpu = _cpu_seconds(self.serve.pid) - cpu0  # type: ignore[union-attr]
            busy = _busy_seconds() - busy0
            rows1, size1 = self.db_size()
            self.task_seconds = {}
            self._task_times([fr.id for fr in runs])
        finally:
            self.stop_serve()
            peak, srv_peak = mem.stop(), srv_mem.stop()
        e2e, in_flow = [], []
        fired, prev_end = 0.0, None
        for start, end in sorted((fr.start_time.timestamp(), fr.end_time.timestamp())
                                 for fr in runs):
            # a tick checks its due sites one after the other: a run that starts more than
            # 2 s after the previous one ended begins the next tick, fired at its minute
            if prev_end is None or start - prev_end > 2:
                fired = start - start % 60
            prev_end = end
            e2e.append(end - fired)
            in_flow.append(end - start)
        checks = max(1, len(runs))
        cpu_per = cpu / (n * rounds)  # every steady check, counted in the database
        return {"sites": n, "checks": len(runs), "p50_s": statistics.median(e2e),
                "p95_s": float(np.percentile(e2e, 95)), "in_flow_p50_s": statistics.median(in_flow),
                "checks_per_hour": 3600 / max(statistics.mean(in_flow), 1e-9),
                "cpu_s_per_check": cpu_per,
                # the whole machine's busy CPU over the steady minutes, per check
                "machine_cpu_s_per_check": busy / (n * rounds),
                "cpu_share": n * cpu_per / (3600 * (os.cpu_count() or 2)),
                "rss_gib": peak / 2**30, "server_rss_gib": srv_peak / 2**30,
                "db_rows_per_check": (rows1 - rows0) / (n * rounds),
                "db_bytes_per_check": (size1 - size0) / (n * rounds),
                "tasks": {k: sum(v) / checks for k, v in self.task_seconds.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", nargs="+", default=["1,10,100"],
                    help="site counts, e.g. 1,10,100")
    ap.add_argument("--new", type=int, default=20, help="new photos per site per minute")
    ap.add_argument("--rounds", type=int, default=2, help="steady minutes per level")
    ap.add_argument("--big", type=int, default=500, help="cached photos of the big site (0: skip)")
    ap.add_argument("--big-rounds", type=int, default=4)
    ap.add_argument("--dask-sites", type=int, default=0,
                    help="a level of this many sites with EMOWATCH_TASK_RUNNER=dask (0: skip)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                    help="the source model's inference precision (EMOWATCH_INFERENCE_PRECISION)")
    ap.add_argument("--idle", type=float, default=120,
                    help="seconds of serve with no check due, for its fixed CPU cost (0: skip)")
    ap.add_argument("--json", action="store_true", help="one JSON row per level")
    args = parse_args(ap, argv)
    args.limit = 2  # Bench.start_serve's --limit (the other deployments)
    os.environ["EMOWATCH_INFERENCE_PRECISION"] = args.precision  # Bench's env copies it
    b = WarmBench(args)
    rows: list[dict] = []
    try:
        b.start_server()
        train_s = b.train()
        note(b.t0, f"trained in {train_s:.0f} s")
        for n in args.sites:
            rows.append({"level": "sites", **b.level(n, f"w{n}x", args.new, args.rounds)})
            note(b.t0, f"level done: {json.dumps(rows[-1])}")
        if args.big:
            rows.append({"level": f"{args.big} cached + {args.new} new", **b.level(
                1, "big", args.new, args.big_rounds, first=args.big)})
            note(b.t0, f"level done: {json.dumps(rows[-1])}")
        if args.dask_sites:
            rows.append({"level": "dask", **b.level(
                args.dask_sites, "d", args.new, args.rounds,
                extra_env={"EMOWATCH_TASK_RUNNER": "dask"})})
            note(b.t0, f"level done: {json.dumps(rows[-1])}")
        if args.idle:
            names = [f"w{n}x{i:03d}" for n in args.sites for i in range(n)]
            idle = b.idle(names, args.idle)
            note(b.t0, f"idle: the machine busy {idle:.3f} CPU s per s")
            cores = os.cpu_count() or 2
            for r in rows:  # 100 sites checked hourly, everything on the machine counted
                r["idle_cpu_share"] = idle / cores
                r["machine_cpu_share_100_hourly"] = (
                    100 * r["machine_cpu_s_per_check"] + 3600 * idle) / (3600 * cores)
    finally:
        b.close()
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print("\n## Checks by the warm worker through a running Prefect server (2 cores, PostgreSQL "
          f"for emowatch and Prefect; {args.new} new photos per site per minute; source model "
          f"in {args.precision})\n")
    print("| level | sites | steady checks | end to end p50 (s) | p95 (s) | in the flow p50 (s) "
          "| CPU s/check | 100 sites hourly: share of the cores | checks/hour (one worker) | "
          "serve + worker peak (GiB) | Prefect server peak (GiB) | DB rows/check | DB bytes/check |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        share100 = 100 * r["cpu_s_per_check"] / (3600 * (os.cpu_count() or 2))
        print(f"| {r['level']} | {r['sites']} | {r['checks']} | {r['p50_s']:.1f} | "
              f"{r['p95_s']:.1f} | {r['in_flow_p50_s']:.1f} | {r['cpu_s_per_check']:.2f} | "
              f"{100 * share100:.1f}% | {r['checks_per_hour']:.0f} | {r['rss_gib']:.2f} | "
              f"{r['server_rss_gib']:.2f} | {r['db_rows_per_check']:.0f} | "
              f"{r['db_bytes_per_check'] / 1024:.0f} KiB |")
    print(f"\nSource model trained for the bench in {train_s:.0f} s.")
    if args.idle:
        print("\n## 100 sites checked hourly: the whole machine (worker, serve's other "
              "deployment runs, PostgreSQL, the Prefect server)\n")
        print(f"serve with no check due keeps the machine busy {100 * rows[0]['idle_cpu_share']:.1f}% "
              f"of its cores ({args.idle:.0f} s measured).\n")
        print("| level | machine CPU s/check | 100 sites hourly + idle: share of the cores |")
        print("|---|---:|---:|")
        for r in rows:
            print(f"| {r['level']} x{r['sites']} | {r['machine_cpu_s_per_check']:.2f} | "
                  f"{100 * r['machine_cpu_share_100_hourly']:.1f}% |")
    r = next((x for x in rows if x["level"] not in ("sites", "dask")), rows[-1])
    print(f"\n## Where a steady check's time goes ({r['level']}: seconds per check, summed over "
          "its task runs)\n\n| task | seconds |\n|---|---:|")
    for k, v in sorted(r["tasks"].items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} |")
    print(f"| (in the flow, p50) | {r['in_flow_p50_s']:.2f} |")


if __name__ == "__main__":
    main()
