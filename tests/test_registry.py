"""tasks.registry.client against a real MLflow registry (SQLite store + local artifacts in a tmp dir)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for
from tasks.registry.client import (
    CHALLENGER,
    CHAMPION,
    SOURCE_MODEL,
    Registry,
    RegistryError,
    site_model_name,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]


def _checkpoint(seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    cfg = NetConfig(backbone="tiny", img_size=64, pretrained=False)
    net = EmotionNet(cfg)
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return Checkpoint(net.eval(), CLASSES, preprocessing_for(cfg), {"seed": seed, "lr": 1e-3})


def _png(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _torch_probs(ckpt: Checkpoint, pngs: list[bytes]) -> np.ndarray:
    prep = ckpt.preprocessing
    arr = np.stack([prep.to_array(Image.open(io.BytesIO(b))) for b in pngs])
    with torch.no_grad():
        return torch.softmax(ckpt.model(prep.normalize(arr)), dim=1).numpy()


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """A configured registry in a tmp home; MLflow's globals and env are restored afterwards."""
    import mlflow

    from emowatch.settings import Settings

    home = tmp_path_factory.mktemp("reg") / "home"
    saved_env = {k: os.environ.get(k) for k in
                 ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    saved_uris = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    cwd = os.getcwd()
    os.chdir(home.parent)  # anything written to ./mlruns would land here
    settings = Settings(home=home)
    registry = Registry.from_settings(settings)
    # what the tests read directly with MLflow (the registry sets these while it logs)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    yield registry, settings
    os.chdir(cwd)
    mlflow.set_tracking_uri(saved_uris[0])
    mlflow.set_registry_uri(saved_uris[1])
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def source_v1(reg, tmp_path_factory):
    registry, _ = reg
    d = tmp_path_factory.mktemp("src")
    ref = d / "ref.npz"
    np.savez(ref, features=np.arange(12, dtype=np.float32).reshape(3, 4))
    report = d / "report.html"
    report.write_text("<html>ok</html>")
    ckpt = _checkpoint(0)
    rv = registry.log_and_register(
        ckpt,
        model_name=SOURCE_MODEL,
        reference_profile_path=ref,
        metrics={"val_acc": 0.75, "gates": {"ess": float("nan")}},
        params={"train": {"lr": 1e-3, "epochs": 3}, "backbone": "tiny"},
        artifacts={"reports": report},
        tags={"emowatch.kind": "source", "emowatch.data": {"n": 10}},
        alias=CHAMPION,
        run_name="train-source",
    )
    return rv, ckpt


def test_register_then_load_by_alias_gives_same_predictions(reg, source_v1):
    from mlflow import MlflowClient

    registry, settings = reg
    rv, ckpt = source_v1
    assert (rv.name, rv.version) == (SOURCE_MODEL, "1")
    assert rv.model_uri == "models:/emowatch-source/1" and rv.model_id.startswith("m-")

    loaded, info = registry.load_checkpoint_by_alias(SOURCE_MODEL, CHAMPION)
    assert info.version == "1" and info.run_id == rv.run_id and info.model_id == rv.model_id
    assert info.aliases == ("champion",)
    assert info.tags["emowatch.kind"] == "source" and json.loads(info.tags["emowatch.data"]) == {"n": 10}
    assert loaded.classes == CLASSES and loaded.config == {"seed": 0, "lr": 1e-3}
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ckpt.model(x))

    ref = registry.load_reference_profile(SOURCE_MODEL, "1")
    np.testing.assert_array_equal(np.load(ref)["features"], np.arange(12).reshape(3, 4))

    # The run: flattened params, metrics (NaN kept), extra artifacts, all under artifact_root.
    client = MlflowClient()
    run = client.get_run(rv.run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["backbone"] == "tiny"
    assert run.data.metrics["val_acc"] == 0.75 and np.isnan(run.data.metrics["gates.ess"])
    assert run.data.tags["emowatch.kind"] == "source"
    assert [a.path for a in client.list_artifacts(rv.run_id, "reports")] == ["reports/report.html"]
    assert run.info.artifact_uri.startswith(settings.artifact_root.as_uri())
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location.startswith(settings.artifact_root.as_uri())
    assert not (Path.cwd() / "mlruns").exists()


def test_pyfunc_from_alias_uri_predicts_like_torch(reg, source_v1):
    import mlflow.pyfunc

    _, ckpt = source_v1
    rng = np.random.default_rng(0)
    pngs = [_png(rng, 80, 70), _png(rng, 64, 64), _png(rng, 30, 90)]  # mixed sizes
    model = mlflow.pyfunc.load_model("models:/emowatch-source@champion")
    out = model.predict(pd.DataFrame({"image": pngs}))
    assert list(out.columns) == CLASSES and out.shape == (3, 6)
    np.testing.assert_allclose(out.to_numpy(), _torch_probs(ckpt, pngs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(Exception, match="image"):
        model.predict(pd.DataFrame({"path": ["a.png"]}))


def test_pyfunc_loads_in_a_fresh_process(reg, source_v1):
    """The pickled class reference must resolve where emowatch was never imported before."""
    _, settings = reg
    _, ckpt = source_v1
    png = _png(np.random.default_rng(1), 50, 60)
    code = (
        "import io, sys, mlflow.pyfunc, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/emowatch-source@champion')\n"
        "b = sys.stdin.buffer.read()\n"
        "print(m.predict(pd.DataFrame({'image': [b]})).to_json(orient='values'))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri,
           "MLFLOW_REGISTRY_URI": settings.tracking_uri, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], input=png, capture_output=True,
                         env=env, timeout=600, check=False)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    got = np.array(json.loads(res.stdout.decode().strip().splitlines()[-1]))
    np.testing.assert_allclose(got, _torch_probs(ckpt, [png]), rtol=1e-5, atol=1e-6)


def test_aliases_move_and_version_tags(reg, source_v1, tmp_path):
    registry, _ = reg
    name = SOURCE_MODEL
    ref = tmp_path / "ref.npz"
    np.savez(ref, features=np.zeros((2, 4), np.float32))
    v2 = registry.log_and_register(_checkpoint(1), model_name=name, reference_profile_path=ref,
                                   alias=CHALLENGER, run_name="adapt")
    assert v2.version == "2"
    assert registry.get_alias_version(name, "champion") == "1"
    assert registry.get_alias_version(name, "challenger") == "2"

    registry.set_version_tags(name, "2", {"gate.verdict": "pass", "gate.details": {"acc_drop": 0.01}})
    registry.set_alias(name, CHAMPION, "2")
    assert registry.delete_alias(name, CHALLENGER) is True
    assert registry.delete_alias(name, CHALLENGER) is False
    assert registry.get_alias_version(name, "champion") == "2"
    assert registry.get_alias_version(name, "challenger") is None

    versions = registry.list_versions(name)
    assert [(v.version, v.aliases) for v in versions] == [("1", ()), ("2", ("champion",))]
    assert versions[1].tags["gate.verdict"] == "pass"
    assert json.loads(versions[1].tags["gate.details"]) == {"acc_drop": 0.01}

    ck2, info = registry.load_checkpoint_by_alias(name, "champion")
    assert info.version == "2" and ck2.config["seed"] == 1
    assert np.load(registry.load_reference_profile(name, "2"))["features"].shape == (2, 4)

    registry.set_alias(name, CHAMPION, "1")  # rollback
    assert registry.load_checkpoint_by_alias(name)[1].version == "1"
    with pytest.raises(RegistryError, match="no version 9"):
        registry.set_alias(name, CHAMPION, "9")
    with pytest.raises(RegistryError, match="no alias"):
        registry.load_checkpoint_by_alias(name, "nope")
    assert registry.get_alias_version("emowatch-nosuchmodel", "champion") is None
    assert registry.list_versions("emowatch-nosuchmodel") == []


def test_site_without_model_uses_source_then_gets_a_copy(reg, source_v1):
    import mlflow.pyfunc

    registry, _ = reg
    src_champion = registry.get_alias_version(SOURCE_MODEL, "champion")
    assert registry.resolve_site_model("lab") == ("emowatch-source", src_champion, "champion")

    src = registry.get_version(SOURCE_MODEL, src_champion)
    cp = registry.copy_to_site(SOURCE_MODEL, src_champion, site_model_name("lab"))
    assert (cp.name, cp.version) == ("emowatch-lab", "1")
    site_v = registry.get_version("emowatch-lab", "1")
    # Same logged model and run (lineage), none of the source's tags but where it came from
    # and the sha256 of the (shared) artifacts.
    assert site_v.model_id == src.model_id and site_v.run_id == src.run_id
    sha = {k: v for k, v in src.tags.items() if k.startswith("emowatch.sha256.")}
    assert len(sha) == 2
    assert site_v.tags == {"emowatch.copied_from": f"emowatch-source/{src_champion}", **sha}

    registry.set_alias("emowatch-lab", CHAMPION, cp.version)
    assert registry.resolve_site_model("lab") == ("emowatch-lab", "1", "champion")
    site_ck, _ = registry.load_checkpoint_by_alias("emowatch-lab")
    src_ck, _ = registry.load_by_version(SOURCE_MODEL, src_champion)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(site_ck.model(x), src_ck.model(x))
    png = _png(np.random.default_rng(2), 64, 64)
    out = mlflow.pyfunc.load_model("models:/emowatch-lab@champion").predict(
        pd.DataFrame({"image": [png]}))
    np.testing.assert_allclose(out.to_numpy(), _torch_probs(src_ck, [png]), rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="source"):
        site_model_name("source")


def test_bad_inputs_are_clear_errors(reg, tmp_path):
    registry, _ = reg
    ck = _checkpoint(3)
    with pytest.raises(ValueError, match="reference profile not found"):
        registry.log_and_register(ck, model_name="emowatch-x",
                                  reference_profile_path=tmp_path / "missing.npz")
    ref = tmp_path / "r.npz"
    np.savez(ref, a=np.zeros(1))
    with pytest.raises(ValueError, match="not a number"):
        registry.log_and_register(ck, model_name="emowatch-x", reference_profile_path=ref,
                                  metrics={"acc": "high"})
    ck.classes = CLASSES[:3]
    with pytest.raises(ValueError, match="class names"):
        registry.log_and_register(ck, model_name="emowatch-x", reference_profile_path=ref)
    assert registry.list_versions("emowatch-x") == []


def _with_profile(registry, tmp_path, name: str):
    """A tiny version of ``name`` registered with a reference profile."""
    from models.profile import ReferenceProfile

    ref = tmp_path / "profile.npz"
    ReferenceProfile(np.zeros((4, 3), np.float32), np.full((4, 6), 1 / 6, np.float32),
                     CLASSES).to_npz(ref)
    return registry.log_and_register(_checkpoint(3), model_name=name,
                                     reference_profile_path=ref, run_name=f"{name}-test")


def test_a_cached_model_is_refused_once_its_file_changes_on_disk(reg, tmp_path):
    """Issue 34: a long-lived worker serves a model from memory, but never one whose file was
    changed after it was cached: the change is seen, the file verified again and refused."""
    registry, _ = reg
    rv = _with_profile(registry, tmp_path, "emowatch-cached")
    first = registry.load_model(rv.name, rv.version)
    assert registry.load_model(rv.name, rv.version)[0] is first[0]  # served from memory
    path = registry.artifact_folder(rv.name, rv.version) / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights file changed after the model was cached
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="refusing to load"):
        registry.load_model(rv.name, rv.version)
    with pytest.raises(RegistryError, match="refusing to load"):  # and not cached meanwhile
        registry.load_model(rv.name, rv.version)


def test_site_copies_of_one_model_share_it_in_memory_and_are_each_verified(reg, tmp_path):
    """Issue 34: 100 sites start from copies of one source version (copy_to_site): the worker
    holds one model for all of them, and still refuses a copy whose local file changed."""
    registry, _ = reg
    src = _with_profile(registry, tmp_path, "emowatch-shared-src")
    a = registry.copy_to_site(src.name, src.version, "emowatch-shared-a")
    b = registry.copy_to_site(src.name, src.version, "emowatch-shared-b")
    first = registry.load_model(a.name, a.version)
    assert registry.load_model(b.name, b.version)[0] is first[0]  # one model in memory
    path = registry.artifact_folder(b.name, b.version) / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="refusing to load"):
        registry.load_model(b.name, b.version)  # its own copy changed: refused
    assert registry.load_model(a.name, a.version)[0] is first[0]  # the other copy is intact
