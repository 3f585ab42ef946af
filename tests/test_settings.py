"""emowatch/settings.py: the one Settings object (no side effects; passwords hidden in JSON)."""

import json

from emowatch.settings import Settings


def test_settings_have_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith(".emowatch/emowatch.db")
    assert s.tracking_uri.endswith("mlflow.db")
    assert not (tmp_path / ".emowatch").exists()  # computing paths creates nothing
    s.ensure_dirs()
    assert (tmp_path / ".emowatch" / "outbox").is_dir()


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("EMOWATCH_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("EMOWATCH_SMTP_PORT", "2525")
    s = Settings()
    assert s.db_url == "postgresql+psycopg://u@h/db" and s.smtp_port == 2525


def test_json_hides_passwords_but_the_object_keeps_them():
    from pydantic import SecretStr

    s = Settings(database_url="postgresql+psycopg://emo:s3cret@db:5432/e",
                 mlflow_tracking_uri="https://u:t0ken@mlflow.example.org",
                 smtp_password=SecretStr("hunter22"))
    dumped = json.dumps(s.model_dump(mode="json"))
    assert "s3cret" not in dumped and "t0ken" not in dumped and "hunter22" not in dumped
    assert "emo:***@db" in dumped
    assert s.db_url.endswith("emo:s3cret@db:5432/e")  # the object itself is untouched
