"""Ingestion: every format, every quarantine reason, modes, orientation, idempotence, crashes,
concurrent runs (processes) on SQLite and PostgreSQL, and the Prefect flow once."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import multiprocessing as mp
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image, ImageFile

from db.migrate import init_db
from db.models import ImageRow, IngestionBatch, QuarantinedFile, utcnow
from db.session import make_engine, session_scope
from emowatch.settings import Settings
from emowatch.sites import Site
from models.images import load_rgb
from tasks.ingest.inbox import scan_inbox
from tasks.ingest.pipeline import ingest_inbox
from tasks.ingest.storage import store_path_for

SUMMARY_KEYS = {"site", "ingested", "duplicates", "ignored", "quarantined", "batch_id", "seconds"}


# --- helpers -------------------------------------------------------------------------------------


def _picture(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    """A smooth random picture (compresses like a photo, differs per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, size=3)
    a = (
        base + 60 * np.sin(xx[..., None] / (3 + seed % 5) + yy[..., None] / 7 + np.arange(3))
    ) % 256
    return Image.fromarray(a.astype(np.uint8), "RGB")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _png_with_size(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims w x h (valid CRC): a decompression bomb, 70 bytes on disk."""
    png = bytearray(_encode(Image.new("L", (2, 2)), "PNG"))
    i = png.index(b"IHDR")
    png[i + 4 : i + 12] = struct.pack(">II", w, h)
    png[i + 17 : i + 21] = struct.pack(">I", zlib.crc32(bytes(png[i : i + 17])))
    return bytes(png)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def env(settings, tmp_path):
    """(settings, engine, inbox, site) on a migrated SQLite database in a temp home."""
    init_db(settings.db_url)
    eng = make_engine(settings.db_url)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    yield settings, eng, inbox, Site(name="site-a", inbox=inbox)
    eng.dispose()


def _count(eng, model, *where) -> int:
    with session_scope(eng) as s:
        return s.execute(sa.select(sa.func.count()).select_from(model).where(*where)).scalar_one()


def _images(eng) -> dict[str, ImageRow]:
    with session_scope(eng) as s:
        return {r.rel_path: r for r in s.execute(sa.select(ImageRow)).scalars()}


# --- accepted files ------------------------------------------------------------------------------


def test_accepts_every_format_and_stores_a_copy(env):
    settings, eng, inbox, site = env
    files = {
        "a.jpg": _encode(_picture(seed=1), "JPEG", quality=90),
        "b/B.JPEG": _encode(_picture(seed=2), "JPEG"),  # extension case does not matter
        "c.png": _encode(_picture(seed=3), "PNG"),
        "d.webp": _encode(_picture(seed=4), "WEBP"),
        "e.bmp": _encode(_picture(seed=5), "BMP"),
        "f.tif": _encode(_picture(seed=6), "TIFF"),
        "g.tiff": _encode(_picture(seed=7), "TIFF", compression="tiff_deflate"),
    }
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    gif = io.BytesIO()
    red.save(gif, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    files["h.gif"] = gif.getvalue()
    for rel, data in files.items():
        _write(inbox / rel, data)

    out = ingest_inbox(site, settings, eng, workers=2)
    assert set(out) == SUMMARY_KEYS
    assert (out["ingested"], out["duplicates"], out["ignored"], out["quarantined"]) == (8, 0, 0, [])
    rows = _images(eng)
    assert {r: rows[r].format for r in rows} == {
        "a.jpg": "JPEG", "b/B.JPEG": "JPEG", "c.png": "PNG", "d.webp": "WEBP",
        "e.bmp": "BMP", "f.tif": "TIFF", "g.tiff": "TIFF", "h.gif": "GIF",
    }  # fmt: skip
    for rel, data in files.items():
        r = rows[rel]
        assert r.sha256 == _sha(data) and r.size_bytes == len(data)
        assert Path(r.store_path) == store_path_for(settings.store_dir.resolve(), r.sha256)
        assert Path(r.store_path).read_bytes() == data
        assert r.batch_id == out["batch_id"] and r.status == "ok"
    assert (rows["a.jpg"].width, rows["a.jpg"].height, rows["a.jpg"].mode) == (48, 40, "RGB")
    first = np.asarray(load_rgb(rows["h.gif"].store_path))  # GIF: the first frame
    assert first.shape == (32, 32, 3) and tuple(first[5, 5]) == (255, 0, 0)
    with session_scope(eng) as s:
        b = s.get(IngestionBatch, out["batch_id"])
        assert (b.status, b.n_seen, b.n_ingested, b.n_quarantined) == ("done", 8, 8, 0)


def test_modes_are_converted_to_rgb(env):
    settings, eng, inbox, site = env
    grey16 = Image.fromarray(np.full((20, 24), 40000, np.uint16))  # I;16
    assert grey16.mode == "I;16"
    la = Image.new("LA", (20, 20), (10, 0))  # fully transparent
    pal = Image.new("P", (20, 20), 3)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 200] + [0] * 756)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    cmyk = Image.new("CMYK", (20, 20), (0, 0, 0, 0))  # no ink: white
    files = {
        "p.png": _encode(pal, "PNG"),
        "pt.png": _encode(pal_t, "PNG"),
        "la.png": _encode(la, "PNG"),
        "cmyk.jpg": _encode(cmyk, "JPEG"),
        "i16.png": _encode(grey16, "PNG"),
        "one.bmp": _encode(Image.new("1", (20, 20), 1), "BMP"),
        "rgba.webp": _encode(Image.new("RGBA", (20, 20), (0, 255, 0, 128)), "WEBP", lossless=True),
    }
    for rel, data in files.items():
        _write(inbox / rel, data)
    out = ingest_inbox(site, settings, eng, workers=1)
    assert out["ingested"] == 7 and out["quarantined"] == []
    rows = _images(eng)
    assert {k: rows[k].mode for k in rows} == {
        "p.png": "P", "pt.png": "P", "la.png": "LA", "cmyk.jpg": "CMYK",
        "i16.png": "I;16", "one.bmp": "1", "rgba.webp": "RGBA",
    }  # fmt: skip
    px = {k: tuple(np.asarray(load_rgb(r.store_path))[3, 3]) for k, r in rows.items()}
    assert all(load_rgb(r.store_path).mode == "RGB" for r in rows.values())
    assert px["p.png"] == (0, 0, 200)
    assert px["pt.png"] == (255, 255, 255)  # transparent palette entry: white background
    assert px["la.png"] == (255, 255, 255)
    assert min(px["cmyk.jpg"]) >= 250
    assert px["i16.png"] == (156, 156, 156)  # 40000 >> 8, not clipped to 255
    assert px["one.bmp"] == (255, 255, 255)
    assert px["rgba.webp"] == (127, 255, 127)  # half-transparent green over white


def test_exif_orientation_is_applied(env):
    settings, eng, inbox, site = env
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left red, right blue
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    _write(inbox / "rot.jpg", _encode(im, "JPEG", quality=95, exif=exif.tobytes()))
    out = ingest_inbox(site, settings, eng, workers=1)
    assert out["ingested"] == 1
    r = _images(eng)["rot.jpg"]
    assert (r.width, r.height) == (20, 40)
    assert r.meta == {"orientation": 6, "raw_size": [40, 20]}
    rgb = np.asarray(load_rgb(r.store_path)).astype(int)
    assert rgb.shape == (40, 20, 3)
    assert rgb[5, 10, 0] > 200 and rgb[5, 10, 2] < 60  # the left (red) side is now on top
    assert rgb[35, 10, 2] > 200 and rgb[35, 10, 0] < 60


# --- rejected files ------------------------------------------------------------------------------


def _bad_inbox(inbox: Path, outside: Path) -> dict[str, str]:
    """Every quarantine reason (and ignored entries); returns {path: expected reason}."""
    jpg = _encode(_picture(64, 64, seed=11), "JPEG", quality=90)
    png = _encode(_picture(64, 64, seed=12), "PNG")
    _write(inbox / "ok.jpg", jpg)
    os.symlink(inbox / "ok.jpg", inbox / "link-inside.jpg")  # followed: a duplicate of ok.jpg
    _write(inbox / "empty.jpg", b"")
    _write(inbox / "notes.jpg", b"this is a text file, not a photo\n" * 20)
    _write(inbox / "cut.jpg", jpg[: len(jpg) // 2])
    _write(inbox / "cut.webp", _encode(_picture(64, 64, seed=13), "WEBP")[:300])
    i = png.index(b"IDAT")
    bad_crc = bytearray(png)
    bad_crc[i + 12] ^= 0xFF  # a flipped byte in the pixel data; the CRC no longer matches
    _write(inbox / "crc.png", bytes(bad_crc))
    n = struct.unpack(">I", png[i - 4 : i])[0]
    bad_data = bytearray(bad_crc)  # same damage, CRC recomputed: the deflate stream is broken
    bad_data[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(bad_data[i : i + 4 + n])))
    _write(inbox / "deflate.png", bytes(bad_data))
    _write(inbox / "bombs/giant.png", _png_with_size(100_000, 100_000))  # beyond Pillow's own limit
    _write(inbox / "bombs/big.png", _png_with_size(7_000, 7_000))  # 49 Mpx > our 40 Mpx
    _write(
        inbox / "huge.png",
        _encode(
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)),
            "PNG",
        ),
    )
    _write(inbox / "tiny.png", _encode(Image.new("RGB", (1, 1)), "PNG"))
    _write(inbox / "thin.gif", _encode(Image.new("RGB", (200, 8)), "GIF"))
    _write(outside / "secret.jpg", _encode(_picture(seed=99), "JPEG"))
    os.symlink(outside / "secret.jpg", inbox / "escape.jpg")
    os.symlink(outside, inbox / "escape-dir")
    os.symlink(inbox / "gone.jpg", inbox / "dangling.jpg")
    os.mkfifo(inbox / "pipe.jpg")  # never opened for reading: it would block
    # ignored: 4 entries
    _write(inbox / ".hidden.jpg", jpg)
    _write(inbox / ".cache/x.jpg", jpg)
    _write(inbox / "readme.txt", b"hello")
    os.symlink(outside / "secret.jpg", inbox / "escape.txt")  # not an image name: ignored, unread
    return {
        "bombs/big.png": "too-large", "bombs/giant.png": "too-large", "crc.png": "corrupt",
        "cut.jpg": "truncated", "cut.webp": "truncated", "dangling.jpg": "empty",
        "deflate.png": "corrupt", "empty.jpg": "empty", "escape-dir": "outside-inbox",
        "escape.jpg": "outside-inbox", "huge.png": "too-large", "notes.jpg": "not-image",
        "pipe.jpg": "not-image", "thin.gif": "too-small", "tiny.png": "too-small",
    }  # fmt: skip


def test_every_quarantine_reason(env, tmp_path, monkeypatch):
    settings, eng, inbox, site = env
    settings = settings.model_copy(update={"max_file_bytes": 200_000})
    outside = tmp_path / "outside"
    expected = _bad_inbox(inbox, outside)
    assert (inbox / "huge.png").stat().st_size > 200_000

    decoded: list[tuple[int, int]] = []  # every image whose pixels Pillow decoded
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    out = ingest_inbox(site, settings, eng, workers=1)

    assert {d["path"]: d["reason"] for d in out["quarantined"]} == expected
    assert [d["path"] for d in out["quarantined"]] == sorted(expected)  # sorted, one per file
    assert (out["ingested"], out["duplicates"], out["ignored"]) == (1, 1, 4)
    assert max(w * h for w, h in decoded) <= settings.max_image_pixels  # bombs never decoded

    with session_scope(eng) as s:
        rows = {r.rel_path: r for r in s.execute(sa.select(QuarantinedFile)).scalars()}
    assert {k: r.reason for k, r in rows.items()} == expected
    assert "refused before decoding" in rows["bombs/big.png"].detail
    copied = {k for k, r in rows.items() if r.quarantine_path}
    # nothing is copied that was not read: links out, over-size files, pipes, dangling links
    assert copied == set(expected) - {
        "escape.jpg",
        "escape-dir",
        "huge.png",
        "pipe.jpg",
        "dangling.jpg",
    }
    for k in copied:
        q = Path(rows[k].quarantine_path)
        assert q.is_relative_to((settings.home / "quarantine" / "site-a").resolve())
        assert q.read_bytes() == (inbox / k).read_bytes()
        assert _sha(q.read_bytes()) == rows[k].sha256
    assert rows["escape.jpg"].sha256 == "" and rows["huge.png"].sha256 == ""
    secret = _sha((outside / "secret.jpg").read_bytes())
    assert secret not in {r.sha256 for r in _images(eng).values()}


def test_rerun_reports_again_without_new_rows_and_store_survives(env, tmp_path):
    settings, eng, inbox, site = env
    settings = settings.model_copy(update={"max_file_bytes": 200_000})
    expected = _bad_inbox(inbox, tmp_path / "outside")
    for k in range(3):
        _write(inbox / f"good/{k}.png", _encode(_picture(seed=20 + k), "PNG"))
    first = ingest_inbox(site, settings, eng, workers=2)
    assert first["ingested"] == 4
    n_q = _count(eng, QuarantinedFile)
    second = ingest_inbox(site, settings, eng, workers=2)
    assert (second["ingested"], second["duplicates"], second["ignored"]) == (0, 5, first["ignored"])
    assert second["quarantined"] == first["quarantined"]  # still in the inbox: reported again
    assert second["batch_id"] != first["batch_id"]
    assert _count(eng, ImageRow) == 4 and _count(eng, QuarantinedFile) == n_q == len(expected)
    assert _count(eng, IngestionBatch, IngestionBatch.status == "done") == 2

    # the inbox is emptied: the stored copies are all that is left, and they are enough
    rows = _images(eng)
    originals = {k: (inbox / k).read_bytes() for k in rows}
    for k in rows:
        (inbox / k).unlink()
    for k, r in rows.items():
        data = Path(r.store_path).read_bytes()
        assert data == originals[k] and _sha(data) == r.sha256
        assert load_rgb(r.store_path).size == (r.width, r.height)


def test_duplicates_within_one_batch(env):
    settings, eng, inbox, site = env
    data = _encode(_picture(seed=5), "PNG")
    for rel in ("a.png", "b.png", "sub/c.png"):
        _write(inbox / rel, data)
    bad = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    _write(inbox / "x1.png", bad)
    _write(inbox / "x2.png", bad)
    out = ingest_inbox(site, settings, eng, workers=2, chunk_files=2)  # spans chunks too
    assert (out["ingested"], out["duplicates"]) == (1, 2)
    assert _images(eng)["a.png"].sha256 == _sha(data)  # first path in name order
    assert [(d["path"], d["reason"]) for d in out["quarantined"]] == [
        ("x1.png", "corrupt"),
        ("x2.png", "corrupt"),
    ]
    assert _count(eng, QuarantinedFile) == 2


def test_missing_inbox_fails_the_batch(env, tmp_path):
    settings, eng, _, _ = env
    site = Site(name="site-b", inbox=tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):
        ingest_inbox(site, settings, eng)
    with session_scope(eng) as s:
        b = s.execute(sa.select(IngestionBatch)).scalar_one()
        assert b.status == "failed" and "does not exist" in b.error


def test_scan_rules(tmp_path):
    inbox = tmp_path / "in"
    _write(inbox / "a/b/c.JPG", b"x")
    _write(inbox / "a/.b/c.jpg", b"x")
    _write(inbox / "d.gif.txt", b"x")
    os.symlink(inbox / "a", inbox / "loop")  # a folder inside: not entered twice
    scan = scan_inbox(inbox)
    assert [c.rel_path for c in scan.candidates] == ["a/b/c.JPG"]
    assert scan.ignored == 3 and scan.findings == []


# --- crashes and concurrent runs (real processes) ---------------------------------------------


def _child_ingest(
    home: str, url: str, inbox: str, crash_after: int | None, barrier, results
) -> None:
    from db.session import make_engine as mk

    settings = Settings(home=Path(home), database_url=url)
    eng = mk(url)
    site = Site(name="site-a", inbox=Path(inbox))

    def on_chunk(i: int, counts: dict) -> None:
        if crash_after is not None and i + 1 >= crash_after:
            os._exit(3)  # a crash: no cleanup, no 'failed' status

    if barrier is not None:
        barrier.wait(timeout=600)
    out = ingest_inbox(site, settings, eng, workers=1, chunk_files=2, on_chunk=on_chunk)
    if results is not None:
        results.put(out)


def _fill(inbox: Path, n: int) -> list[bytes]:
    datas = [_encode(_picture(32, 32, seed=100 + k), "PNG") for k in range(n)]
    for k, d in enumerate(datas):
        _write(inbox / f"img{k:03d}.png", d)
    return datas


def test_crash_mid_batch_is_completed_by_the_next_run(env):
    settings, eng, inbox, site = env
    _fill(inbox, 10)
    ctx = mp.get_context("spawn")
    p = ctx.Process(
        target=_child_ingest, args=(str(settings.home), settings.db_url, str(inbox), 2, None, None)
    )
    p.start()
    p.join(120)
    assert p.exitcode == 3
    with session_scope(eng) as s:
        crashed = s.execute(sa.select(IngestionBatch)).scalar_one()
        assert crashed.status == "running" and crashed.n_ingested == 4
    assert _count(eng, ImageRow) == 4

    out = ingest_inbox(site, settings, eng, workers=1)
    assert (out["ingested"], out["duplicates"]) == (6, 4)
    assert _count(eng, ImageRow) == 10
    with session_scope(eng) as s:
        crashed = s.get(IngestionBatch, crashed.id)
        assert crashed.status == "interrupted" and str(out["batch_id"]) in crashed.error


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_two_processes_ingesting_at_once(backend, settings, tmp_path, request):
    url = settings.db_url if backend == "sqlite" else request.getfixturevalue("pg_schema_url")
    init_db(url)
    inbox = tmp_path / "inbox"
    datas = _fill(inbox, 30)
    _write(inbox / "broken.jpg", b"\xff\xd8\xff" + b"\x00" * 100)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(
            target=_child_ingest, args=(str(settings.home), url, str(inbox), None, barrier, results)
        )
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    outs = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]

    assert sum(o["ingested"] for o in outs) == 30  # every image once, by one of them
    for o in outs:
        assert o["ingested"] + o["duplicates"] == 30
        assert o["quarantined"] == [{"path": "broken.jpg", "reason": "corrupt"}]
    eng = make_engine(url)
    try:
        with session_scope(eng) as s:
            shas = s.execute(sa.select(ImageRow.sha256)).scalars().all()
            assert sorted(shas) == sorted(_sha(d) for d in datas)  # none lost, none twice
            assert (
                s.execute(sa.select(sa.func.count()).select_from(QuarantinedFile)).scalar_one() == 1
            )
            statuses = s.execute(sa.select(IngestionBatch.status)).scalars().all()
            assert statuses == ["done", "done"]
    finally:
        eng.dispose()
    for d in datas:
        assert store_path_for(settings.store_dir.resolve(), _sha(d)).read_bytes() == d


def test_losing_an_insert_race_counts_as_duplicate(env, monkeypatch):
    # what a concurrent run causes: the content was unknown when checked, but another process
    # inserted it before our commit -- ON CONFLICT DO NOTHING drops our row
    settings, eng, inbox, site = env
    _fill(inbox, 5)
    assert ingest_inbox(site, settings, eng, workers=1)["ingested"] == 5
    import tasks.ingest.pipeline as ti

    monkeypatch.setattr(ti.rows, "known_shas", lambda *a, **k: set())
    out = ingest_inbox(site, settings, eng, workers=1)
    assert (out["ingested"], out["duplicates"]) == (0, 5)
    assert _count(eng, ImageRow) == 5


def test_only_dead_batches_are_marked_interrupted(env):
    import socket

    settings, eng, inbox, site = env
    _fill(inbox, 1)
    ingest_inbox(site, settings, eng, workers=1)  # registers the site
    old = utcnow() - dt.timedelta(hours=1)
    with session_scope(eng) as s:
        sid = s.execute(sa.select(IngestionBatch.site_id)).scalars().first()
        live = IngestionBatch(
            site_id=sid, owner=f"{socket.gethostname()}:{os.getppid()}", heartbeat_at=utcnow()
        )
        remote_fresh = IngestionBatch(site_id=sid, owner="elsewhere:1", heartbeat_at=utcnow())
        remote_old = IngestionBatch(site_id=sid, owner="elsewhere:1", heartbeat_at=old)
        s.add_all([live, remote_fresh, remote_old])
    ingest_inbox(site, settings, eng, workers=1)
    with session_scope(eng) as s:
        status = {b.id: b.status for b in s.execute(sa.select(IngestionBatch)).scalars()}
    assert status[live.id] == "running"  # its process (our parent) is alive
    assert status[remote_fresh.id] == "running"  # another host, recent heartbeat
    assert status[remote_old.id] == "interrupted"


# --- the Prefect flow (once: the harness is slow to start) ---------------------------------------


def test_ingest_site_flow(prefect_harness, settings, tmp_path):
    from flows.ingest import ingest_site

    inbox = tmp_path / "flow-inbox"
    _fill(inbox, 3)
    _write(inbox / "empty.png", b"")
    sites = tmp_path / "sites.toml"
    sites.write_text(f'[sites.flow-site]\ninbox = "{inbox}"\n', encoding="utf-8")
    out = ingest_site("flow-site", settings=settings.model_copy(update={"sites_file": sites}))
    assert set(out) == SUMMARY_KEYS
    assert (out["site"], out["ingested"], out["quarantined"]) == (
        "flow-site",
        3,
        [{"path": "empty.png", "reason": "empty"}],
    )
    eng = make_engine(settings.db_url)
    assert _count(eng, ImageRow) == 3
    eng.dispose()
