"""Data and sites for ``emowatch demo`` (real photos when EMOWATCH_DATA_DIR has them, else
generated faces). Everything goes under the demo's work folder (git-ignored runtime state):
the training folder links to the data set's files (nothing is copied), site inboxes get new
files as the site's camera would have taken them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# (site name, camera condition, severity, policy). One site looks like the training domain;
# two have cameras the model never saw. night-cam may promote by itself, the others need a
# person.
DEMO_SITES = (
    ("lobby", None, 0, "manual"),
    ("night-cam", "night", 2, "auto"),
    ("blur-cam", "blur", 2, "manual"),
)
# Photos per site inbox and labelled audit photos per site (real data: 1,320 Emotion6 photos,
# ~60% train the source model, the rest are split between the sites).
SITE_IMAGES = 120
AUDIT_IMAGES = 40
SOURCE_FRAC = 0.6
MARKER = ".emowatch-demo"


@dataclass
class DemoData:
    kind: str  # "real" or "generated"
    source_dir: Path
    sites_file: Path
    sites: list[dict[str, Any]] = field(default_factory=list)
    backbone: str = "efficientnet-lite0"
    img_size: int | None = None
    classes: list[str] = field(default_factory=list)


def _write(img: Image.Image | np.ndarray, path: Path, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.convert("RGB").save(path, quality=quality)
    else:
        im.save(path)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        return
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # file systems without symlinks: copy (still git-ignored runtime state)
        shutil.copy2(src, dst)


def _site_block(name: str, inbox: Path, audit: Path, policy: str, base: Path,
                portfolio: bool) -> str:
    rel = lambda p: os.path.relpath(p, base)  # noqa: E731
    return (
        f"[sites.{name}]\n"
        f'inbox = "{rel(inbox)}"\n'
        f'schedule = "*/15 * * * *"\n'
        f'approvers = ["{name}-owner@localhost"]\n'
        f'policy = "{policy}"\n'
        f'audit = "{rel(audit)}"\n\n'
        f"[sites.{name}.drift]\nalpha = 0.05\nmin_samples = 30\nwindow = 500\n\n"
        + (f"[sites.{name}.adapt]\nmethod = \"portfolio\"\n\n" if portfolio else
           f"[sites.{name}.adapt]\nmethod = \"mmd\"\ntime_budget_s = 600\ntrain_backbone = false\n\n")
    )


def prepare_demo(workdir: Path, data_dir: Path | None, seed: int = 0,
                 site_images: int = SITE_IMAGES, audit_images: int = AUDIT_IMAGES) -> DemoData:
    """Build the training folder, three site inboxes with audit sets, and a sites file."""
    from models.sim.conditions import apply_condition

    workdir = Path(workdir).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise ValueError(f"{workdir} exists and was not made by `emowatch demo`: choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by emowatch demo; deleted and rebuilt by the next demo run\n")
    rng = np.random.default_rng(seed)
    real = data_dir is not None and (Path(data_dir) / "emotion6" / "images").is_dir()
    if real:
        data = _real_split(Path(data_dir) / "emotion6" / "images", workdir / "source", rng)
        pool, classes = data["pool"], data["classes"]
        kind, backbone, img_size = "real", "efficientnet-lite0", None
    else:
        pool, classes = _generated(workdir / "source", rng)
        kind, backbone, img_size = "generated", "tiny", 64
    order = rng.permutation(len(pool))
    per_site = site_images + audit_images
    if len(pool) < per_site * len(DEMO_SITES):
        per_site = len(pool) // len(DEMO_SITES)
        site_images = int(per_site * site_images / (site_images + audit_images))
    sites, blocks = [], []
    for k, (name, cond, sev, policy) in enumerate(DEMO_SITES):
        chunk = [pool[i] for i in order[k * per_site:(k + 1) * per_site]]
        inbox, audit = workdir / "inboxes" / name, workdir / "audit" / name
        for j, (img_src, label) in enumerate(chunk):
            img = img_src() if callable(img_src) else Image.open(img_src).convert("RGB")
            if cond:
                img = apply_condition(img, cond, sev, rng)
            # Same file format as the training images (a lobby camera saving PNG where training
            # saw JPEG would be a real, detectable change of its own).
            ext = ".jpg" if kind == "real" else ".png"
            dst = (inbox / f"{name}-{j:04d}{ext}") if j < site_images else (audit / label / f"{j:04d}{ext}")
            _write(img, dst)
        sites.append({"name": name, "condition": cond or "none", "severity": sev, "policy": policy,
                      "inbox": str(inbox), "audit": str(audit), "n_images": min(site_images, len(chunk))})
        # Real photos: the re-adaptation portfolio (a site's default). The tiny CNN of the
        # generated-data demo has no pre-trained layers and its generated faces are not what
        # the portfolio's benchmark measured: it keeps the cached mmd the demo was built with.
        blocks.append(_site_block(name, inbox, audit, policy, workdir, portfolio=backbone != "tiny"))
    sites_file = workdir / "sites.toml"
    sites_file.write_text("# written by `emowatch demo`\n\n" + "".join(blocks), encoding="utf-8")
    return DemoData(kind, workdir / "source", sites_file, sites, backbone, img_size, classes)


def _real_split(images: Path, source: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Link SOURCE_FRAC of each class into the training folder; the rest is the sites' pool."""
    classes = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    pool: list[tuple[Any, str]] = []
    for c in classes:
        files = sorted(p for p in (images / c).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        idx = rng.permutation(len(files))
        n_src = int(round(SOURCE_FRAC * len(files)))
        for i in idx[:n_src]:
            _link(files[i], source / c / files[i].name)
        pool += [(files[i], c) for i in idx[n_src:]]
    return {"pool": pool, "classes": classes}


def _generated(source: Path, rng: np.random.Generator) -> tuple[list[tuple[Any, str]], list[str]]:
    """Generated faces (no data set needed): 600 to train, the rest for the sites."""
    from models.sim.synthetic import make_faces

    f = make_faces(1200, size=64, seed=int(rng.integers(1 << 30)))
    for i in range(600):
        _write(f.images[i], source / f.classes[f.labels[i]] / f"face-{i:04d}.png")
    pool = [((lambda a=f.images[i]: Image.fromarray(a)), f.classes[f.labels[i]]) for i in range(600, 1200)]
    return pool, list(f.classes)
