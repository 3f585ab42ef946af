"""What 1, 10 and 100 sites cost: monitor checks through a running Prefect server.

    EMOWATCH_DATA_DIR=../shared/data python -m bench.scale [--sites 1 10 100] [--new 10]
        [--rounds 2] [--limit 2] [--dask-sites 10] [--keep]

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
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

PG = "postgresql://postgres@127.0.0.1:5432/postgres"
PHOTOS_PER_CLASS_SOURCE = 40
FIRST = 40


def _pg(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(sql)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def note(t0: float, what: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)


class Photos:
    """Unique JPEGs for every site: Emotion6 photos with a per-site crop, re-encoded."""

    def __init__(self, data: Path, skip: set[Path]) -> None:
        self.pool = [p for p in sorted((data / "emotion6" / "images").rglob("*.jpg"))
                     if p not in skip]
        if not self.pool:
            raise SystemExit(f"no Emotion6 photos under {data}/emotion6/images")
        self.count = 0

    def drop(self, folder: Path, n: int, site_seed: int) -> None:
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([site_seed, self.count])
        for _ in range(n):
            src = self.pool[self.count % len(self.pool)]
            self.count += 1
            with Image.open(src) as im:
                im = im.convert("RGB")
                w, h = im.size
                dx, dy = (int(v) for v in rng.integers(1, 9, 2))
                im.crop((dx, dy, w - (9 - dx), h - (9 - dy))).save(
                    folder / f"p{self.count:06d}.jpg", quality=92)


class Memory:
    """Peak resident memory of a process and its children, sampled every 0.5 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                p = psutil.Process(self.pid)
                procs = [p, *p.children(recursive=True)]
                rss = 0
                for q in procs:
                    try:
                        rss += q.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self._stop.wait(0.5)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.tmp = Path(tempfile.mkdtemp(prefix="emowatch-scale-"))
        tag = f"{os.getpid()}"
        self.db, self.pdb = f"emowatch_scale_{tag}", f"prefect_scale_{tag}"
        self.port = _free_port()
        self.env = {
            **os.environ,
            "EMOWATCH_HOME": str(self.tmp / "home"),
            "EMOWATCH_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db}",
            "EMOWATCH_SITES_FILE": str(self.tmp / "sites.toml"),
            "PREFECT_HOME": str(self.tmp / "prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL":
                f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.pdb}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PYTHONWARNINGS": "ignore",
        }
        for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED"):
            os.environ[k] = self.env[k]  # this process talks to the same server
        self.server: subprocess.Popen | None = None
        self.serve: subprocess.Popen | None = None
        self.exe = str(Path(sys.executable).with_name("emowatch"))
        self.photos: Photos | None = None
        self.task_seconds: dict[str, list[float]] = {}

    # --- processes ------------------------------------------------------------------------
    def start_server(self) -> None:
        _pg(f"CREATE DATABASE {self.db}")
        _pg(f"CREATE DATABASE {self.pdb}")
        log = open(self.tmp / "prefect-server.log", "w")  # noqa: SIM115 - closed with the process
        self.server = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
             "127.0.0.1", "--port", str(self.port)], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        import urllib.request

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.env['PREFECT_API_URL']}/health", timeout=2):
                    note(self.t0, f"prefect server up on port {self.port}")
                    return
            except OSError:
                time.sleep(1)
        raise SystemExit(f"prefect server did not start: see {self.tmp}/prefect-server.log")

    def start_serve(self, names: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.tmp / "serve.log", "a")  # noqa: SIM115
        self.serve = subprocess.Popen([self.exe, "serve", "--limit", str(self.args.limit)],
                                      env={**self.env, **(extra_env or {})}, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_deployments(names)

    def stop_serve(self) -> None:
        if self.serve is not None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.serve.pid, signal.SIGKILL)
            self.serve = None

    def close(self) -> None:
        self.stop_serve()
        if self.server is not None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
        for db in (self.db, self.pdb):
            try:
                _pg(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            except Exception as e:  # noqa: BLE001 - report, keep cleaning up
                print(f"could not drop database {db}: {e}", file=sys.stderr)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"kept {self.tmp}", file=sys.stderr)

    def cli(self, *argv: str) -> float:
        t = time.perf_counter()
        r = subprocess.run([self.exe, *argv], env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"emowatch {' '.join(argv)} failed ({r.returncode}):\n"
                             f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        return time.perf_counter() - t

    # --- setup ----------------------------------------------------------------------------
    def train(self) -> float:
        data = Path(os.environ["EMOWATCH_DATA_DIR"])
        src = self.tmp / "source"
        used: set[Path] = set()
        for cls in sorted((data / "emotion6" / "images").iterdir()):
            if not cls.is_dir():
                continue
            (src / cls.name).mkdir(parents=True)
            for p in sorted(cls.glob("*.jpg"))[:PHOTOS_PER_CLASS_SOURCE]:
                (src / cls.name / p.name).symlink_to(p)
                used.add(p)
        self.photos = Photos(data, used)
        return self.cli("train", "--data", str(src), "--epochs", "1", "--crops", "0",
                        "--estimator-specs", "8")

    def write_sites(self, names: list[str], schedule: str = "0 0 1 1 *") -> None:
        """The sites file (``schedule``: every site's cron; by default once a year: the rounds
        trigger the checks)."""
        lines = []
        for n in names:
            lines += [f"[sites.{n}]", f'inbox = "inbox/{n}"', f'schedule = "{schedule}"', "",
                      f"[sites.{n}.adapt]", "auto = false", ""]
        (self.tmp / "sites.toml").write_text("\n".join(lines), encoding="utf-8")

    def _wait_deployments(self, names: list[str]) -> None:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        deadline = time.time() + 300
        with get_client(sync_client=True) as c:
            while time.time() < deadline:
                if self.serve is not None and self.serve.poll() is not None:
                    raise SystemExit(f"emowatch serve exited: see {self.tmp}/serve.log")
                try:
                    for n in names:
                        c.read_deployment_by_name(f"monitor_site/monitor-{n}")
                except ObjectNotFound:
                    time.sleep(1)
                    continue
                time.sleep(2)  # the runner starts polling after registering
                return
        raise SystemExit(f"emowatch serve did not register the sites: see {self.tmp}/serve.log")

    # --- one round ------------------------------------------------------------------------
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

    def _task_times(self, ids: list) -> None:
        """Seconds per task name over these flow runs (where the time in a flow goes)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs: list = []
        with get_client(sync_client=True) as c:
            while True:  # the API returns at most 200 per call
                page = c.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200,
                    offset=len(runs))
                runs += page
                if len(page) < 200:
                    break
        for tr in runs:
            if tr.start_time and tr.end_time:
                name = tr.name.rsplit("-", 1)[0]
                self.task_seconds.setdefault(name, []).append(
                    (tr.end_time - tr.start_time).total_seconds())

    def db_size(self) -> tuple[int, int]:
        import psycopg

        with psycopg.connect(PG.rsplit("/", 1)[0] + f"/{self.db}") as c:
            tables = [r[0] for r in c.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            rows = sum(c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables)
            size = c.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        return int(rows), int(size)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--new", type=int, default=10, help="new photos per site per round")
    ap.add_argument("--rounds", type=int, default=2, help="steady rounds per level")
    ap.add_argument("--limit", type=int, default=2, help="emowatch serve --limit")
    ap.add_argument("--dask-sites", type=int, default=10, help="0: skip the dask level")
    ap.add_argument("--evidently-drift-sites", type=int, default=10,
                    help="a level with EMOWATCH_EVIDENTLY_REPORTS=drift (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if not os.environ.get("EMOWATCH_DATA_DIR"):
        raise SystemExit("set EMOWATCH_DATA_DIR to the folder with emotion6/")
    b = Bench(args)
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
