"""What every flow starts with: its runtime, and the task runner the settings ask for.

Prefect's thread pool by default, Dask when ``EMOWATCH_TASK_RUNNER=dask``.
"""

from __future__ import annotations

from typing import Any

from emowatch.settings import Settings
from tasks.context import Runtime

# 2 threads: on a 2-core machine more would only contend with torch's own threads.
THREADS = 2
# A local Dask cluster when no address is set: 2 single-threaded worker processes.
LOCAL_CLUSTER = {"n_workers": 2, "threads_per_worker": 1, "processes": True,
                 "dashboard_address": None}


def open_runtime(settings: Settings | None) -> Runtime:
    """The flow's runtime: from the settings it was given, or -- started by a deployment, with
    no settings -- from ``Settings()`` read at this start."""
    return Runtime.open(settings if settings is not None else Settings())


def optional_int(x: Any) -> int | None:
    """An int parameter as an event trigger renders it ("12", "None", "") -> 12 / None."""
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def default_runner() -> Any:
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=THREADS)


def task_runner(settings: Settings) -> Any:
    """The runner the settings ask for.

    ``task_runner = "dask"`` with ``dask_address = "tcp://scheduler:8786"`` runs featurization
    chunks on an existing Dask cluster; without an address, a local cluster of 2 worker
    processes is started for the flow run and closed after it.
    """
    if settings.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        return DaskTaskRunner(cluster_kwargs=dict(LOCAL_CLUSTER))  # a copy: never shared
    return default_runner()


def configured(flow_obj: Any, settings: Settings) -> Any:
    """``flow_obj`` with the task runner of the settings (flows are declared with threads)."""
    if settings.task_runner == "thread":
        return flow_obj
    return flow_obj.with_options(task_runner=task_runner(settings))
