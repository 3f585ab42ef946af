"""tasks/context.py: the run context is built from the Settings it is given (not the
environment), migrates once, registers a site once, serves the source champion as a site's
version 1 on first use, and travels to other processes as its settings."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from emowatch.settings import Settings
from emowatch.sites import Site
from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for
from tasks.context import RunContext, Runtime, ServedModel
from tasks.registry.client import CHAMPION, SOURCE_MODEL, RegistryError


@pytest.fixture()
def rt(tmp_path, monkeypatch) -> Runtime:
    # The environment names another home: the context must use the object it is given.
    monkeypatch.setenv("EMOWATCH_HOME", str(tmp_path / "from-the-environment"))
    settings = Settings(home=tmp_path / "given", database_url=None, mlflow_tracking_uri=None,
                        sites_file=tmp_path / "sites.toml")
    return Runtime.open(settings)


def _register_source(rt: Runtime, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = NetConfig(backbone="tiny", img_size=64, pretrained=False, num_classes=3)
    ckpt = Checkpoint(EmotionNet(cfg).eval(), ["a", "b", "c"], preprocessing_for(cfg))
    ref = tmp_path / "ref.npz"
    np.savez(ref, features=np.zeros((2, 4), np.float32))
    rt.registry.log_and_register(ckpt, model_name=SOURCE_MODEL, reference_profile_path=ref,
                                 alias=CHAMPION)


def test_runtime_uses_the_settings_it_is_given(rt, tmp_path):
    assert rt.settings.db_url.endswith("given/emowatch.db")
    assert (tmp_path / "given" / "emowatch.db").is_file()  # migrated
    assert not (tmp_path / "from-the-environment").exists()
    assert rt.registry.tracking_uri == rt.settings.tracking_uri
    assert rt.engine is Runtime.open(rt.settings).engine  # one engine per URL and process


def test_site_context_registers_the_site_once(rt, tmp_path):
    sites = {"lab": Site(name="lab", inbox=tmp_path / "in")}
    a = rt.site_context("lab", sites=sites)
    b = rt.site_context("lab", sites=sites)
    assert isinstance(a, RunContext) and a.site_id == b.site_id and a.site.name == "lab"
    assert a.served is None
    with pytest.raises(RuntimeError, match="no served model"):
        _ = a.model
    from emowatch.sites import SitesFileError

    with pytest.raises(SitesFileError, match="unknown site 'nope'"):
        rt.site_context("nope", sites=sites)


def test_serving_copies_the_source_champion_once_and_records_it(rt, tmp_path):
    from db.models import ModelDeployment
    from db.session import session_scope

    ctx = rt.site_context("lab", sites={"lab": Site(name="lab", inbox=tmp_path)})
    with pytest.raises(RegistryError, match="train the source model first"):
        ctx.serving()
    _register_source(rt, tmp_path)
    served = ctx.serving()
    assert served.model == ServedModel("emowatch-lab", "1", CHAMPION)
    assert served.model.key == "emowatch-lab/1"
    assert ctx.serving().model.version == "1"  # the second call finds the champion
    with session_scope(rt.engine) as s:
        rows = s.scalars(select(ModelDeployment)).all()
        assert [(r.action, r.version, r.reason) for r in rows] == [
            ("initial", "1", f"started from {SOURCE_MODEL}/1")]


def test_contexts_travel_as_their_settings(rt, tmp_path):
    ctx = rt.site_context("lab", sites={"lab": Site(name="lab", inbox=tmp_path)})
    ctx = RunContext(ctx.settings, ctx.site, ctx.site_id, ServedModel("m", "2", "champion"))
    back = pickle.loads(pickle.dumps(ctx))
    assert (back.settings, back.site, back.site_id, back.served) == (
        ctx.settings, ctx.site, ctx.site_id, ctx.served)
    assert back.engine.url == ctx.engine.url
    assert pickle.loads(pickle.dumps(rt)).settings == rt.settings
