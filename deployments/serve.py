"""`emowatch serve`: Prefect deployments built from the sites file.

* one ``monitor-<site>`` deployment per site, on the site's cron schedule;
* ``readapt`` triggered by the ``emowatch.drift.detected`` event (the site comes from the event
  payload), only for sites whose ``adapt.auto`` is true (the monitor flow decides to emit);
* ``sync-registry`` every ``SYNC_INTERVAL_S`` seconds: decisions made in the MLflow UI
  (``tasks.promote.sync``);
* ``train-source`` and ``promote`` on demand (``prefect deployment run ...``).

Schedules need a real Prefect server (``prefect server start``; ``PREFECT_API_URL`` pointing at
it): the ephemeral API that plain flow runs use does not run schedules or automations.
For work pools and several workers see ``deployments/prefect.yaml``.
"""

from __future__ import annotations

from typing import Any

from emowatch.sites import Site

DRIFT_EVENT = "emowatch.drift.detected"
SITE_RESOURCE_PREFIX = "emowatch.site."
# An approval made in the MLflow UI is applied (or its alias put back) within this time.
SYNC_INTERVAL_S = 120


def drift_trigger():
    """The trigger that starts ``readapt_site`` for the site named in the drift event."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="readapt-on-drift",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": f"{SITE_RESOURCE_PREFIX}*"},
        for_each={"prefect.resource.id"},
        parameters={"site": "{{ event.payload.site }}", "drift_check_id": "{{ event.payload.check_id }}"},
    )


def build_deployments(sites: dict[str, Site], scheduled_checks: bool = True) -> list[Any]:
    """RunnerDeployments for every site (nothing is sent to a server here).
    ``scheduled_checks`` False: the monitor deployments carry no schedule (the warm worker,
    ``deployments.worker``, runs the scheduled checks; a deployment run is "check now")."""
    from flows.monitor import monitor_site
    from flows.promote import promote
    from flows.readapt import readapt_site
    from flows.sync import sync_registry
    from flows.train import train_source

    deps = [
        monitor_site.to_deployment(
            name=f"monitor-{s.name}",
            cron=s.schedule if scheduled_checks else None,
            parameters={"site": s.name},
            tags=["emowatch", "monitor", f"site:{s.name}"],
            description=f"Ingest and drift-test site {s.name} ({s.inbox}).",
        )
        for s in sites.values()
    ]
    deps.append(
        readapt_site.to_deployment(
            name="readapt",
            triggers=[drift_trigger()],
            tags=["emowatch", "adapt"],
            description="Unsupervised re-adaptation of a drifted site; registers a challenger.",
        )
    )
    deps.append(sync_registry.to_deployment(
        name="sync-registry", interval=SYNC_INTERVAL_S, tags=["emowatch", "sync"],
        description="Apply (or refuse and put back) decisions made in the MLflow UI."))
    deps.append(train_source.to_deployment(name="train-source", tags=["emowatch", "train"]))
    deps.append(promote.to_deployment(name="promote", tags=["emowatch", "promote"]))
    return deps


def describe(deps: list[Any], sites: dict[str, Site] | None = None,
             warm: bool = False) -> dict[str, Any]:
    out = []
    for d in deps:
        schedules = []
        for s in d.schedules or []:
            sch = getattr(s, "schedule", s)
            every = getattr(sch, "interval", None)
            schedules.append(getattr(sch, "cron", None)
                             or (f"every {every.total_seconds():g} s" if every else str(sch)))
        triggers = [
            {"expect": sorted(t.expect), "match": dict(t.match), "parameters": t.parameters}
            for t in (d.triggers or [])
        ]
        out.append({
            "name": d.name,
            "flow": d.flow_name,
            "schedules": schedules,
            "triggers": triggers,
            "parameters": d.parameters,
            "tags": d.tags,
        })
    res: dict[str, Any] = {"deployments": out}
    if sites is not None:
        res["checks"] = ({"by": "warm worker", "schedules": {n: s.schedule for n, s in sites.items()}}
                         if warm else {"by": "deployments"})
    return res


def serve_all(deps: list[Any], limit: int | None = None, worker: list[str] | None = None) -> None:
    """Serve the deployments, at most ``limit`` flow runs at once (None: no limit; 100 sites
    on one cron minute would start 100 processes), until SIGINT or SIGTERM (what a service manager sends to stop a
    service; systemd sends it to every process of the service at once); both shut the runner
    down and return.

    With a Prefect server (``PREFECT_API_URL``) the schedules are paused on the way out, so no
    runs pile up while nobody serves them. Without one, Prefect's temporary server is a child
    of this process and stops with it: pausing would wait for an API that is already gone (the
    process hung there), so nothing is paused.

    ``worker``: the command of the warm check worker (``deployments.worker``), started beside
    the runner and started again whenever it exits (a restart it asked for, or a crash: the
    check it died in is due again at its next tick); stopped with the runner."""
    import signal

    from prefect import serve
    from prefect.exceptions import TerminationSignal
    from prefect.settings import PREFECT_API_URL

    def stop(signum: int, _frame: Any) -> None:
        raise TerminationSignal(signal=signum)

    # Prefect's runner installs its own SIGTERM handler once started; this one covers startup.
    pause = bool(PREFECT_API_URL.value())
    previous = signal.signal(signal.SIGTERM, stop)
    supervisor = Supervisor(worker) if worker else None
    try:
        if supervisor:
            supervisor.start()
        serve(*deps, pause_on_shutdown=pause, limit=limit)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if supervisor:
            supervisor.stop()
        if pause:
            # The runner pauses only when it had fully started: a SIGTERM between its
            # "Starting runner" and the end of its start-up exits at once (sys.exit in its
            # handler) and left the schedules running with nobody serving them.
            pause_schedules(deps)


class Supervisor:
    """Keeps one worker process running: starts ``cmd`` and starts it again when it exits
    (after ``backoff_s`` when it exited within ``backoff_s`` of its start: a worker that cannot
    start does not spin). ``stop``: SIGTERM, then SIGKILL after ``grace_s``."""

    def __init__(self, cmd: list[str], backoff_s: float = 5.0, grace_s: float = 60.0) -> None:
        import threading

        self.cmd, self.backoff_s, self.grace_s = cmd, backoff_s, grace_s
        self.proc: Any = None
        self.starts = 0
        self._stop = threading.Event()
        # held while a worker is started and while stop() reads which one runs: a restart
        # racing the shutdown cannot leave a new worker behind
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="emowatch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        import subprocess
        import time

        from prefect.logging import get_logger

        log = get_logger("emowatch.serve")
        while True:
            with self._lock:
                if self._stop.is_set():
                    break
                t0 = time.monotonic()
                self.proc = subprocess.Popen(self.cmd)
                self.starts += 1
            code = self.proc.wait()
            if self._stop.is_set():
                break
            log.info("the check worker exited (code %s); starting it again", code)
            if time.monotonic() - t0 < self.backoff_s:
                self._stop.wait(self.backoff_s)

    def stop(self) -> None:
        import subprocess

        with self._lock:
            self._stop.set()
            p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._thread.join(timeout=5)


def worker_command() -> list[str]:
    """The warm worker's command line (this interpreter)."""
    import sys

    return [sys.executable, "-m", "deployments.worker"]


def pause_schedules(deps: list[Any]) -> list[str]:
    """Pause every deployment of ``deps`` that exists on the server and is not paused yet
    (idempotent; one that was never created is skipped). Returns the names it paused."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.logging import get_logger

    paused = []
    with get_client(sync_client=True) as client:
        for d in deps:
            name = f"{d.flow_name}/{d.name}"
            try:
                found = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if not found.paused:
                client.pause_deployment(found.id)
                paused.append(name)
    if paused:
        get_logger("emowatch.serve").info("Paused the schedules of %s", ", ".join(paused))
    return paused
