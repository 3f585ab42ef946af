"""What the many-sites benchmarks share (bench/scale_warm.py, bench/scale_deployments.py):
fresh PostgreSQL databases, a ``prefect server``, ``emowatch serve``, a source model trained with
``emowatch train`` on 40 Emotion6 photos per class (1 epoch, no crops, 8 estimator shifts: the
checks' cost does not depend on its accuracy), and photos for every site: Emotion6 photos
re-encoded with a per-site crop, so no two sites share an image (and a feature cache hit).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
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


def site_counts(values: list[str]) -> list[int]:
    """``--sites 1,10,100`` or ``--sites 1 10 100`` -> [1, 10, 100]."""
    try:
        out = [int(v) for x in values for v in x.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--sites takes counts like 1,10,100: {e}") from e
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("--sites takes positive counts like 1,10,100")
    return out


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``ap``'s arguments plus ``--keep``; ``--sites`` as counts; EMOWATCH_DATA_DIR required."""
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    try:
        args.sites = site_counts(args.sites)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if not os.environ.get("EMOWATCH_DATA_DIR"):
        raise SystemExit("set EMOWATCH_DATA_DIR to the folder with emotion6/")
    return args

