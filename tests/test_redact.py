"""emowatch.redact: one helper hides URL passwords and registered secrets everywhere."""

from __future__ import annotations

from emowatch.redact import redact_url


def test_redact_url_hides_passwords_only():
    assert redact_url("postgresql+psycopg://emo:s3cr%40t@db:5432/emowatch") == \
        "postgresql+psycopg://emo:***@db:5432/emowatch"
    assert redact_url("https://user:pw@mlflow.example.org/") == "https://user:***@mlflow.example.org/"
    assert redact_url("postgresql://emo@db/emowatch") == "postgresql://emo@db/emowatch"
    assert redact_url("sqlite:////tmp/x/emowatch.db") == "sqlite:////tmp/x/emowatch.db"
    assert redact_url(None) is None
