"""What 1, 10 and 100 sites cost: monitor checks through a running Prefect server.

    EMOWATCH_DATA_DIR=../shared/data python -m bench.scale [--sites 1,10,100] [--json] ...
    EMOWATCH_DATA_DIR=../shared/data python -m bench.scale --worker deployments ...

``--worker warm`` (the default, as in ``emowatch serve``): bench/scale_warm.py, every check in the
warm worker. ``--worker deployments``: bench/scale_deployments.py, one ``monitor-<site>``
deployment run (a process) per check. ``--help`` after the choice lists its flags.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--worker", choices=["warm", "deployments"], default="warm")
    known, rest = pre.parse_known_args(argv)
    if known.worker == "warm":
        from bench.scale_warm import main as run
    else:
        from bench.scale_deployments import main as run
    run(rest)


if __name__ == "__main__":
    main()
