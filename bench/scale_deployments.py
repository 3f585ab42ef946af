"""What 1, 10 and 100 sites cost: monitor checks through a running Prefect server.

    EMOWATCH_DATA_DIR=../shared/data python -m bench.scale --worker deployments
        [--sites 1,10,100] [--new 10] [--rounds 2] [--limit 2] [--dask-sites 10] [--keep]

(``check_worker = "deployments"``: one ``monitor-<site>`` deployment run, a process, per check.)

Everything runs in a temporary folder and is removed at the end (``--keep`` keeps it): two fresh
PostgreSQL databases on 127.0.0.1:5432 (emowatch's and the Prefect server's, dropped at the
end), a ``prefect server`` (started here, stopped at the end), a source model trained with
``emowatch train`` on 40 Emotion6 photos per class (1 epoch, no crops, 8 estimator shifts:
the checks' cost does not depend on its accuracy), and ``emowatch serve --limit L`` for the
sites (restarted per level). Every site's photos are Emotion6 photos re-encoded with a
per-site crop, so no two sites share an image (and a feature cache hit).

Per level (N sites): a first round (40 photos per site, all to featurize), then ``--rounds``
rounds of ``--new`` new photos per site; each round triggers every site's ``monitor-<site>``
deployment at once (``run_deployment``; the served runner polls every second) and waits for
all. Reported per level, steady rounds only: per-check latency from the run's creation to its
end (p50/p95), the part before the flow starts (Prefect's scheduling and the run's process
start: its overhead per run), checks per hour on this machine, database rows and bytes per
check, peak memory of ``serve`` with its runs and of the Prefect server. Then the same with
``EMOWATCH_TASK_RUNNER=dask`` (a local cluster per run) for ``--dask-sites`` sites, with
``EMOWATCH_EVIDENTLY_REPORTS=drift`` for ``--evidently-drift-sites`` sites, and a site
of 500 photos, all cached, checked three times: end-to-end through the server, and the CLI
(``emowatch monitor``) in one process against the same server.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import numpy as np

from bench.scale_base import FIRST, Bench, Memory, note, parse_args


class DeploymentBench(Bench):
    def round(self, names: list[str]) -> tuple[list[dict], float]:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        t = time.perf_counter()
        ids = [run_deployment(name=f"monitor_site/monitor-{n}", timeout=0).id for n in names]
        done: dict = {}
        with get_client(sync_client=True) as c:
            while len(done) < len(ids):
                time.sleep(1)
                for i in ids:
                    if i in done:
                        continue
                    fr = c.read_flow_run(i)
                    if fr.state is not None and fr.state.is_final():
                        done[i] = fr
        wall = time.perf_counter() - t
        self._task_times(list(done))
        out = []
        for fr in done.values():
            if not fr.state.is_completed():
                raise SystemExit(f"flow run {fr.name} ended {fr.state.type.value}: "
                                 f"see {self.tmp}/serve.log")
            out.append({"e2e": (fr.end_time - fr.created).total_seconds(),
                        "before_start": (fr.start_time - fr.created).total_seconds(),
                        "in_flow": (fr.end_time - fr.start_time).total_seconds()})
        return out, wall


    def level(self, n: int, label: str, extra_env: dict[str, str] | None = None,
              rounds: int | None = None) -> dict:
        assert self.photos is not None
        names = [f"{label}{i:03d}" for i in range(n)]
        self.write_sites(names)
        self.start_serve(names, extra_env)
        mem = Memory(self.serve.pid)  # type: ignore[union-attr]
        srv_mem = Memory(self.server.pid)  # type: ignore[union-attr]
        try:
            for i, s in enumerate(names):
                self.photos.drop(self.tmp / "inbox" / s, FIRST, zlib.crc32(f'{label}{i}'.encode()))
            first, first_wall = self.round(names)
            note(self.t0, f"{label} x{n}: first round {first_wall:.1f} s")
            steady: list[dict] = []
            wall = 0.0
            rows0, size0 = self.db_size()
            self.task_seconds = {}  # steady rounds only
            for r in range(self.args.rounds if rounds is None else rounds):
                for i, s in enumerate(names):
                    self.photos.drop(self.tmp / "inbox" / s, self.args.new,
                                     zlib.crc32(f'{label}{i}/{r}'.encode()))
                res, w = self.round(names)
                steady += res
                wall += w
                note(self.t0, f"{label} x{n}: round {r + 1} {w:.1f} s")
            rows1, size1 = self.db_size()
        finally:
            self.stop_serve()
            peak, srv_peak = mem.stop(), srv_mem.stop()
        e2e = sorted(x["e2e"] for x in steady)
        return {
            "sites": n, "first_p50": statistics.median(x["e2e"] for x in first),
            "first_wall": first_wall, "p50": statistics.median(e2e),
            "p95": float(np.percentile(e2e, 95)),
            "before_start": statistics.median(x["before_start"] for x in steady),
            "in_flow": statistics.median(x["in_flow"] for x in steady),
            "per_hour": 3600 * len(steady) / wall, "rows": (rows1 - rows0) / len(steady),
            "bytes": (size1 - size0) / len(steady), "serve_gb": peak / 2**30,
            "server_gb": srv_peak / 2**30, "checks": len(steady),
            "tasks": {k: sum(v) / len(steady) for k, v in self.task_seconds.items()},
        }

    def cached500(self) -> dict:
        assert self.photos is not None
        self.write_sites(["big"])
        self.photos.drop(self.tmp / "inbox" / "big", 500, 9)
        self.start_serve(["big"])
        try:
            first, _ = self.round(["big"])
            runs = [self.round(["big"])[0][0] for _ in range(3)]
        finally:
            self.stop_serve()
        cli = [self.cli("monitor", "big", "--json") for _ in range(2)]
        return {"first": first[0]["e2e"], "e2e": statistics.median(r["e2e"] for r in runs),
                "before_start": statistics.median(r["before_start"] for r in runs),
                "in_flow": statistics.median(r["in_flow"] for r in runs),
                "cli": statistics.median(cli)}



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", nargs="+", default=["1,10,100"], help="site counts, e.g. 1,10,100")
    ap.add_argument("--new", type=int, default=10, help="new photos per site per round")
    ap.add_argument("--rounds", type=int, default=2, help="steady rounds per level")
    ap.add_argument("--limit", type=int, default=2, help="emowatch serve --limit")
    ap.add_argument("--dask-sites", type=int, default=10, help="0: skip the dask level")
    ap.add_argument("--evidently-drift-sites", type=int, default=10,
                    help="a level with EMOWATCH_EVIDENTLY_REPORTS=drift (0: skip)")
    args = parse_args(ap, argv)
    b = DeploymentBench(args)
    levels: list[tuple[str, dict]] = []
    try:
        b.start_server()
        train_s = b.train()
        note(b.t0, f"trained in {train_s:.0f} s")
        for n in args.sites:
            levels.append(("thread", b.level(n, "s")))
            note(b.t0, f"level done: {levels[-1]}")  # survives a run stopped later
        if args.dask_sites:
            levels.append(("dask", b.level(args.dask_sites, "d",
                                           {"EMOWATCH_TASK_RUNNER": "dask"}, rounds=1)))
            note(b.t0, f"level done: {levels[-1]}")
        if args.evidently_drift_sites:
            levels.append(("thread, Evidently on drift only", b.level(
                args.evidently_drift_sites, "e", {"EMOWATCH_EVIDENTLY_REPORTS": "drift"},
                rounds=1)))
            note(b.t0, f"level done: {levels[-1]}")
        big = b.cached500()
    finally:
        b.close()
    print(f"\n## Monitor checks through a running Prefect server (2 cores, `emowatch serve "
          f"--limit {args.limit}`, PostgreSQL for emowatch and Prefect; {args.new} new photos "
          f"per site per round, {args.rounds} steady round(s) per level)\n")
    print("| sites | runner | first check p50 (s, 40 photos) | first round (s) | check p50 (s) "
          "| check p95 (s) | before the flow starts p50 (s) | in the flow p50 (s) | checks/hour "
          "| DB rows/check | DB bytes/check | serve + runs peak (GiB) | Prefect server peak "
          "(GiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for runner, r in levels:
        print(f"| {r['sites']} | {runner} | {r['first_p50']:.1f} | {r['first_wall']:.0f} | "
              f"{r['p50']:.1f} | {r['p95']:.1f} | {r['before_start']:.1f} | {r['in_flow']:.1f} | "
              f"{r['per_hour']:.0f} | {r['rows']:.0f} | {r['bytes'] / 1024:.0f} KiB | "
              f"{r['serve_gb']:.2f} | {r['server_gb']:.2f} |")
    print(f"\nSource model trained for the bench in {train_s:.0f} s.")
    for runner, r in levels:
        if runner == "thread" and r["sites"] == max(args.sites):
            print(f"\n## Where a steady check's time goes ({r['sites']} sites, thread runner; "
                  "seconds per check, summed over its task runs; tasks overlap little)\n")
            print("| task | seconds per check |\n|---|---:|")
            for k, v in sorted(r["tasks"].items(), key=lambda kv: -kv[1]):
                print(f"| {k} | {v:.2f} |")
            print(f"| (in the flow, p50) | {r['in_flow']:.2f} |")
            print(f"| (before the flow starts, p50) | {r['before_start']:.2f} |")
    print("\n## A site of 500 photos, all cached, checked through the running server\n")
    print("| first check (500 to featurize) (s) | cached check end to end p50 (s) | before the "
          "flow starts (s) | in the flow (s) | `emowatch monitor` CLI, same server (s) |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {big['first']:.1f} | {big['e2e']:.1f} | {big['before_start']:.1f} | "
          f"{big['in_flow']:.1f} | {big['cli']:.1f} |")


if __name__ == "__main__":
    main()
