"""emowatch/sites.py: the sites file, its validation and its error messages."""

from pathlib import Path

import pytest

from emowatch.sites import SitesFileError, load_sites, parse_sites

EXAMPLE = Path(__file__).resolve().parents[1] / "deployments" / "sites.example.toml"


def test_example_sites_file_is_valid():
    sites = load_sites(EXAMPLE)
    assert set(sites) == {"store-12", "kiosk-3"}
    s = sites["store-12"]
    assert s.policy == "manual" and s.drift.alpha == 0.05 and s.drift.min_samples == 30
    assert s.drift.window == 500 and s.approvers == ["ml-team@example.com"]
    assert sites["kiosk-3"].policy == "auto" and sites["kiosk-3"].audit is None
    assert s.model_name == "emowatch-store-12"


def test_relative_paths_resolve_against_the_file(tmp_path):
    f = tmp_path / "sites.toml"
    f.write_text('[sites.a]\ninbox = "in/a"\naudit = "aud"\n')
    s = load_sites(f)["a"]
    assert s.inbox == tmp_path / "in" / "a" and s.audit == tmp_path / "aud"


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('[sites.a]\ninbox = "x"\nschedule = "every hour"\n', ["sites.toml:3", "schedule", "cron"]),
        ('[sites.a]\ninbox = "x"\n\n[sites.a.drift]\nalpha = 2\n', ["sites.toml:5", "drift.alpha", "0.5"]),
        ('[sites.a]\ninbox = "x"\n[sites.a.drift]\nmin_samples = 50\nwindow = 40\n', ["drift", "window"]),
        ('[sites.Bad]\ninbox = "x"\n', ["sites.toml:1", "site names"]),
        ('[sites.a]\ninbox = "x"\npolcy = "auto"\n', ["sites.toml:3", "polcy", "Extra inputs"]),
        ('[sites.a]\ninbox = "x"\npolicy = "sometimes"\n', ["sites.toml:3", "policy", "manual"]),
        ('[sites.a]\ninbox = "x"\napprovers = ["bob"]\n', ["sites.toml:3", "e-mail"]),
        ('[sites.a]\nschedule = "0 * * * *"\n', ["sites.toml:1", "inbox", "required"]),
        ('[sites.a]\ninbox = "x"\n[sites.a.adapt]\nsite_bn_weight = 1.5\n', ["sites.toml:4", "site_bn_weight"]),
        ("[sites.a\n", ["not valid TOML"]),
        ('site = 1\n', ["sites.toml:1", "unknown top-level key"]),
    ],
)
def test_invalid_sites_files_say_line_field_and_why(text, expect):
    with pytest.raises(SitesFileError) as e:
        parse_sites(text, source="sites.toml")
    for part in expect:
        assert part in str(e.value), str(e.value)


def test_missing_sites_file(tmp_path):
    with pytest.raises(SitesFileError, match="not found"):
        load_sites(tmp_path / "nope.toml")
