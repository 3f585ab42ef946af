"""`emowatch serve`: deployments and schedules built from a sites file; the Dask runner path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner


def _sites(tmp_path):
    f = tmp_path / "sites.toml"
    f.write_text(
        '[sites.store-12]\ninbox = "in/a"\nschedule = "0 * * * *"\n\n'
        '[sites.kiosk-3]\ninbox = "in/b"\nschedule = "*/30 * * * *"\npolicy = "auto"\n',
        encoding="utf-8",
    )
    return f


def test_serve_builds_one_scheduled_monitor_per_site_and_the_drift_trigger(tmp_path):
    from deployments.serve import DRIFT_EVENT, build_deployments, describe
    from emowatch.sites import load_sites

    deps = describe(build_deployments(load_sites(_sites(tmp_path))))["deployments"]
    by_name = {d["name"]: d for d in deps}
    assert set(by_name) == {"monitor-store-12", "monitor-kiosk-3", "readapt", "train-source",
                            "promote", "sync-registry"}
    assert by_name["sync-registry"]["schedules"] == ["every 120 s"]
    assert by_name["sync-registry"]["flow"] == "sync-registry"
    assert by_name["monitor-store-12"]["schedules"] == ["0 * * * *"]
    assert by_name["monitor-kiosk-3"]["schedules"] == ["*/30 * * * *"]
    assert by_name["monitor-kiosk-3"]["parameters"] == {"site": "kiosk-3"}
    assert by_name["monitor-store-12"]["flow"] == "monitor_site"
    [trig] = by_name["readapt"]["triggers"]
    assert trig["expect"] == [DRIFT_EVENT]
    assert trig["parameters"]["site"] == "{{ event.payload.site }}"
    assert by_name["readapt"]["schedules"] == [] and by_name["train-source"]["schedules"] == []
    # with the warm worker (emowatch serve's default) the worker runs the scheduled checks:
    # the monitor deployments stay, unscheduled, for "check now"
    sites = load_sites(_sites(tmp_path))
    warm = describe(build_deployments(sites, scheduled_checks=False), sites, warm=True)
    by_name = {d["name"]: d for d in warm["deployments"]}
    assert by_name["monitor-store-12"]["schedules"] == [] and set(by_name) == set(
        d["name"] for d in deps)
    assert by_name["sync-registry"]["schedules"] == ["every 120 s"]
    assert warm["checks"] == {"by": "warm worker", "schedules": {"store-12": "0 * * * *",
                                                                  "kiosk-3": "*/30 * * * *"}}


def test_the_supervisor_starts_the_worker_again_when_it_exits(tmp_path):
    import sys
    import time

    from deployments.serve import Supervisor

    marker = tmp_path / "starts"
    # a worker that records its start and exits at once (as after max_checks, or a crash)
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    sup = Supervisor(cmd, backoff_s=0.2, grace_s=5)
    sup.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(marker.read_text() if marker.exists() else "") < 3:
        time.sleep(0.1)
    sup.stop()
    assert len(marker.read_text()) >= 3 and sup.starts >= 3
    # a worker that runs until stopped is terminated by stop()
    sup = Supervisor([sys.executable, "-c", "import time; time.sleep(600)"], grace_s=5)
    sup.start()
    while sup.proc is None:
        time.sleep(0.05)
    t0 = time.monotonic()
    sup.stop()
    assert sup.proc.poll() is not None and time.monotonic() - t0 < 10


def test_serve_dry_run_cli(tmp_path, monkeypatch):
    from deployments.cli import app

    monkeypatch.setenv("EMOWATCH_SITES_FILE", str(_sites(tmp_path)))
    r = CliRunner().invoke(app, ["serve", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    names = [d["name"] for d in out["deployments"]]
    assert "monitor-store-12" in names and "readapt" in names
    assert out["checks"]["by"] == "warm worker"


def test_drift_event_renders_the_readapt_parameters():
    """The trigger's templates, rendered against an event like the one monitor_site emits,
    give readapt_site its parameters (the same Jinja rendering Prefect's automations use)."""
    from prefect.server.utilities.user_templates import render_user_template_sync

    from deployments.serve import drift_trigger

    trig = drift_trigger()
    event = {"payload": {"site": "kiosk-3", "check_id": 12}, "resource": {"prefect.resource.id": "emowatch.site.kiosk-3"}}
    rendered = {k: render_user_template_sync(v, {"event": event}) for k, v in trig.parameters.items()}
    assert rendered == {"site": "kiosk-3", "drift_check_id": "12"}
    from flows.runner import optional_int

    assert optional_int(rendered["drift_check_id"]) == 12 and optional_int("None") is None


def test_task_runner_switch(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from emowatch.settings import Settings
    from flows.runner import configured, task_runner

    assert isinstance(task_runner(Settings(task_runner="thread")), ThreadPoolTaskRunner)
    assert isinstance(task_runner(Settings(task_runner="dask")), DaskTaskRunner)
    r = task_runner(Settings(task_runner="dask", dask_address="tcp://10.0.0.1:8786"))
    assert isinstance(r, DaskTaskRunner) and r.address == "tcp://10.0.0.1:8786"
    from flows.monitor import monitor_site

    assert configured(monitor_site, Settings(task_runner="thread")) is monitor_site
    assert isinstance(configured(monitor_site, Settings(task_runner="dask")).task_runner, DaskTaskRunner)


def test_featurization_chunks_run_on_a_local_dask_cluster(prefect_harness, settings, tmp_path):
    """The featurize tasks run in Dask worker processes and fill the shared feature cache."""
    import numpy as np
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from emowatch.sites import Site
    from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for
    from models.profile import ReferenceProfile
    from tasks.context import RunContext, Runtime, ServedModel
    from tasks.featurize import featurize_images

    rt = Runtime.open(settings)
    cfg = NetConfig(backbone="tiny", img_size=64, num_classes=3)
    ckpt = Checkpoint(EmotionNet(cfg).eval(), ["a", "b", "c"], preprocessing_for(cfg))
    prof = tmp_path / "p.npz"
    ReferenceProfile.from_arrays(np.zeros((2, 256)), np.full((2, 3), 1 / 3), ["a", "b", "c"]).to_npz(prof)
    reg = rt.registry.log_and_register(ckpt, model_name="emowatch-dasktest",
                                       reference_profile_path=prof)
    ctx = RunContext(rt.settings, Site(name="dasktest", inbox=tmp_path), site_id=0,
                     served=ServedModel(reg.name, reg.version, "champion"))
    from PIL import Image

    items = []
    rng = np.random.default_rng(0)
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(p)
        items.append((f"{i:064x}", str(p)))

    @flow(task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1,
                                                      "processes": True, "dashboard_address": None}))
    def run():
        return featurize_images(ctx, items, chunk_size=2)

    fs = run()
    assert len(fs) == 6 and fs.z.shape == (6, 256) and fs.probs.shape == (6, 3)
    assert np.allclose(fs.probs.sum(1), 1, atol=1e-5)
    assert np.all(np.isfinite(fs.quality["brightness"]))


@pytest.mark.parametrize("api", ["prefect-server", "prefect-server-starting", "temporary-server"])
def test_serve_stops_on_sigterm_to_its_process_group(prefect_harness, tmp_path, api):
    """A service manager stops `emowatch serve` with SIGTERM (to every process of the
    service): it shuts down and exits 0; with a Prefect server its schedules are paused, also
    when the signal comes while the runner is still starting ("prefect-server-starting": sent as
    soon as the deployments exist; Prefect's runner then exits without pausing). (With Prefect's
    temporary server, a child that died with the same signal, it used to hang.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    (tmp_path / "in").mkdir()
    sites = tmp_path / "sites.toml"
    site = "early" if api.endswith("starting") else "lab"  # a deployment no other case paused
    sites.write_text(f'[sites.{site}]\ninbox = "in"\nschedule = "*/30 * * * *"\n')
    env = {**os.environ, "EMOWATCH_HOME": str(tmp_path / "home"),
           "EMOWATCH_SITES_FILE": str(sites), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_LOGGING_LEVEL": "DEBUG"}  # "Starting runner..." says its handler is in
    if api == "temporary-server":
        env.pop("PREFECT_API_URL")
        env["PREFECT_HOME"] = str(tmp_path / "prefect")
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve"], env=env,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        # Wait on the event, not the clock: the runner has installed its SIGTERM handler once
        # it logs "Starting runner..." (the temporary server alone may take minutes to start
        # on a busy machine: emowatch.prefect_env).
        event = b"prefect deployment run" if api.endswith("starting") else b"Starting runner"
        deadline = time.time() + 900
        while time.time() < deadline and event not in log.read_bytes():
            assert p.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert b"prefect deployment run" in log.read_bytes(), log.read_text()[-3000:]
        assert event in log.read_bytes(), log.read_text()[-3000:]
        os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    if event == b"Starting runner":  # the runner's own handler (before it, emowatch's)
        assert "SIGTERM received" in text
    # With a Prefect server every schedule ends paused, whether the runner had finished starting
    # (it pauses them itself) or not (serve_all does); the temporary server is gone: no attempt.
    if api.startswith("prefect-server"):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            deps = client.read_deployments()
        ours = {d.name: d.paused for d in deps
                if d.name in {f"monitor-{site}", "readapt", "sync-registry", "train-source", "promote"}}
        assert len(ours) == 5 and all(ours.values()), ours
    else:
        assert "paused" not in text.lower(), text[-3000:]


def test_serving_the_flows_does_not_import_torch():
    """`emowatch serve` imports every flow it deploys; torch (~250 MB resident) is imported by
    the runs and the warm worker that use it, not by the process that only serves them."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from flows.monitor import monitor_site\nfrom flows.promote import promote\n"
            "from flows.readapt import readapt_site\nfrom flows.sync import sync_registry\n"
            "from flows.train import train_source\nimport deployments.serve\n"
            "print(sorted(m for m in ('torch', 'mlflow', 'evidently') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"
