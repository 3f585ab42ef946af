"""Ingestion throughput: a real inbox into a temporary home, twice (the second run finds only
duplicates), on SQLite and/or PostgreSQL, for a few thread counts. Prints a markdown table.

    python -m bench.ingest [--inbox ../shared/data/emotion6/images] [--backend both]
                           [--workers 1,2] [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]

The inbox is only read; copies go to a temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

from bench.common import REPO

DEFAULT_INBOX = REPO.parent / "shared" / "data" / "emotion6" / "images"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_schema(pg_url: str) -> tuple[str, str]:
    import sqlalchemy as sa

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    eng.dispose()
    sep = "&" if "?" in pg_url else "?"
    return schema, f"{pg_url}{sep}options=-csearch_path%3D{schema}"


def _drop_schema(pg_url: str, schema: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    eng.dispose()


def run(inbox: Path, backend: str, workers: int, pg_url: str) -> list[dict]:
    from db.session import init_db, make_engine
    from emowatch.settings import Settings
    from emowatch.sites import Site
    from tasks.ingest.pipeline import ingest_inbox

    tmp = Path(tempfile.mkdtemp(prefix="emowatch-bench-"))
    schema = None
    try:
        if backend == "postgres":
            schema, url = _pg_schema(pg_url)
        else:
            url = f"sqlite:///{tmp / 'emowatch.db'}"
        settings = Settings(home=tmp / "home", database_url=url)
        settings.ensure_dirs()
        init_db(url)
        eng = make_engine(url)
        site = Site(name="bench", inbox=inbox)
        rows = []
        for label in ("first", "second"):
            out = ingest_inbox(site, settings, eng, workers=workers)
            n = out["ingested"] + out["duplicates"] + len(out["quarantined"])
            rows.append(
                {
                    "backend": backend,
                    "workers": workers,
                    "run": label,
                    "files": n,
                    "ingested": out["ingested"],
                    "duplicates": out["duplicates"],
                    "quarantined": len(out["quarantined"]),
                    "seconds": out["seconds"],
                    "per_s": n / out["seconds"] if out["seconds"] > 0 else float("inf"),
                }
            )
        eng.dispose()
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if schema is not None:
            _drop_schema(pg_url, schema)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--inbox", type=Path, default=DEFAULT_INBOX)
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--workers", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--pg-url", default=DEFAULT_PG)
    args = ap.parse_args(argv)
    if not args.inbox.is_dir():
        ap.error(f"inbox {args.inbox} not found (pass --inbox)")
    logging.basicConfig(level=logging.WARNING)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    rows = []
    for b in backends:
        for w in (int(x) for x in args.workers.split(",")):
            rows.extend(run(args.inbox.resolve(), b, w, args.pg_url))
    print(f"Ingestion of {args.inbox} (first run: all new; second run: all duplicates)\n")
    print(
        "| backend | workers | run | files | ingested | duplicates | quarantined | seconds | files/s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['workers']} | {r['run']} | {r['files']} | {r['ingested']} | "
            f"{r['duplicates']} | {r['quarantined']} | {r['seconds']:.2f} | {r['per_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
