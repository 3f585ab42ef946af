"""The fault table: every hostile input and fault the test suite tries, what happened this
time, and what is guaranteed.

    python -m bench.faults            # runs the cases (about 3 minutes on 2 cores)
    python -m bench.faults --markdown # the table for the README

It runs the fault cases of ``tests/`` with pytest (the same code, not a copy), reads the
outcome and the figures the tests record (``record_property``) from a JUnit XML report and
prints one row per case. A case that fails prints BROKEN with the first line of its failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.common import REPO

# (test id, area, what was tried, what is guaranteed)
CASES: list[tuple[str, str, str, str]] = [
    ("tests/test_faults.py::test_a_corrupt_file_with_a_250_byte_name_is_corrupt_and_the_batch_goes_on",
     "inbox", "corrupt file with a 250-byte name among good ones",
     "quarantined as corrupt; the good files ingested"),
    ("tests/test_faults.py::test_a_valid_photo_with_a_non_utf8_name_is_ingested_and_json_stays_valid",
     "inbox", "valid photo whose name is not UTF-8",
     "ingested; name shown escaped, bytes kept; JSON valid"),
    ("tests/test_faults.py::test_an_unreadable_file_affects_that_file_alone",
     "inbox", "file that raises OSError when read", "that file alone is affected"),
    ("tests/test_faults.py::test_a_folder_swapped_for_a_link_after_the_scan_is_not_followed",
     "inbox", "folder swapped for a symlink after the scan",
     "nothing outside the inbox is read (device/inode check)"),
    ("tests/test_faults.py::test_temp_files_of_a_killed_run_are_removed_at_start",
     "inbox", "temp files left by a killed run", "removed at the next start"),
    ("tests/test_faults.py::test_kill_9_mid_ingest_loses_nothing_and_leaves_no_temp_files",
     "inbox", "kill -9 mid-ingest (240 images)", "next run: every image once, no temp file"),
    ("tests/test_ingest.py::test_every_quarantine_reason",
     "inbox", "empty, truncated, corrupt, too large, bomb, bad extension, ...",
     "each quarantined with its reason"),
    ("tests/test_ingest.py::test_crash_mid_batch_is_completed_by_the_next_run",
     "inbox", "crash mid-batch", "the next run completes it"),
    ("tests/test_ingest.py::test_two_processes_ingesting_at_once",
     "inbox", "two processes ingesting one inbox", "every image once"),
    ("tests/test_images.py::test_pixel_limit_is_checked_before_decoding",
     "inbox", "decompression bomb (header claims huge size)", "refused before decoding"),
    ("tests/test_faults.py::test_a_planted_checkpoint_never_runs_code",
     "model files", "pickle with os.system in place of a checkpoint",
     "refused (weights_only, sha256): no code runs"),
    ("tests/test_faults.py::test_a_tampered_local_copy_is_refused_on_every_load",
     "model files", "cached checkpoint edited", "refused on every load (sha256)"),
    ("tests/test_faults.py::test_predict_on_a_planted_version_fails_cleanly",
     "model files", "`emowatch predict` on a planted version", "exit 1, clear error, no code runs"),
    ("tests/test_promote.py::test_a_version_that_is_not_the_challenger_and_has_no_record_needs_force",
     "promotion", "approve a non-challenger with only a `verdict=pass` tag",
     "refused; only --force --reason, recorded as forced"),
    ("tests/test_promote.py::test_edited_tags_do_not_outvote_the_gate_record",
     "promotion", "MLflow tags edited from fail to pass", "refused: the database record decides"),
    ("tests/test_promote.py::test_a_rejected_version_put_back_as_challenger_needs_force",
     "promotion", "rejected version put back as challenger in MLflow", "needs --force --reason"),
    ("tests/test_promote.py::test_by_must_name_an_approver_unless_the_setting_allows_any",
     "promotion", "--by a name that is not an approver", "refused unless allowed by a setting"),
    ("tests/test_promote.py::test_expected_champion_guards_an_approval_against_a_race",
     "promotion", "approve/rollback after someone else moved the champion", "refused"),
    ("tests/test_promote.py::test_concurrent_approve_and_rollback_keep_history_and_registry_in_step",
     "promotion", "8 concurrent approve/rollback", "history and MLflow agree afterwards"),
    ("tests/test_promote.py::test_kill_9_mid_promotion_is_reconciled_by_the_next_one",
     "promotion", "kill -9 after the alias moved, before the history row",
     "lock taken over; alias restored ('restore' row)"),
    ("tests/test_promote.py::test_a_move_outside_emowatch_is_put_back_before_any_promotion",
     "promotion", "champion moved in the MLflow UI", "served model stays the recorded one; put back"),
    ("tests/test_promote.py::test_doctor_finds_and_repairs_what_has_a_safe_fix",
     "promotion", "`emowatch doctor` on planted inconsistencies", "each named; safe ones repaired"),
    ("tests/test_flows.py::test_auto_site_asks_a_person_when_the_audit_says_worse",
     "promotion", "auto site, gates pass, audit says worse", "no promotion attempted; approval e-mail"),
    ("tests/test_faults.py::test_status_and_approve_never_print_the_tracking_password",
     "secrets", "tracking URI with a password, server down", "`status`/`approve` show ***"),
    ("tests/test_faults.py::test_log_lines_and_tracebacks_are_redacted",
     "secrets", "URLs and the SMTP password in log lines and tracebacks", "redacted"),
    ("tests/test_notify.py::test_no_password_over_a_plain_connection_unless_allowed",
     "secrets", "SMTP login without STARTTLS/SSL", "refused unless allowed by a setting"),
    ("tests/test_faults.py::test_a_6_hour_smtp_outage_with_50_sites_loses_no_alert",
     "alerts", "SMTP down 6 h, 50 sites alerting hourly", "every alert delivered once"),
    ("tests/test_faults.py::test_outbox_cli_requeues_and_send_exits_1_while_undelivered",
     "alerts", "`outbox --send` while down; `--requeue`", "exit 1 while undelivered; requeue works"),
    ("tests/test_notify.py::test_retried_until_the_window_then_undelivered_until_requeued",
     "alerts", "server down past the retry window", "undelivered (never silently dropped)"),
    ("tests/test_faults.py::test_two_processes_migrating_a_fresh_sqlite_home_at_once",
     "other", "8 processes migrating a fresh SQLite home", "all at head, no error"),
    ("tests/test_faults.py::test_predict_refuses_a_fifo_and_a_100_mpx_image_without_hanging",
     "other", "`predict` on a FIFO and a 108-Mpx header", "per-image errors, no hang"),
    ("tests/test_faults.py::test_explain_into_a_folder_writes_folder_slash_stem_png",
     "other", "`explain -o DIR`", "writes DIR/<image>.png"),
    ("tests/test_serve.py::test_serve_stops_on_sigterm_to_its_process_group",
     "other", "SIGTERM to `emowatch serve`'s process group", "exits 0 (schedules paused with a server)"),
]


def run_cases(ids: list[str], xml: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={xml}", "-o", "junit_family=xunit1", *ids], cwd=REPO,
                   check=False, stdout=sys.stderr)  # pytest's own report: stderr
    return time.perf_counter() - t0


def outcomes(xml: Path) -> dict[str, dict[str, object]]:
    """test id (file::name, parametrised cases merged) -> passed, seconds, failure, properties."""
    out: dict[str, dict[str, object]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        name = case.get("name", "").split("[")[0]
        key = f"{file}::{name}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        e = out.setdefault(key, {"passed": True, "seconds": 0.0, "failure": None, "props": {}})
        e["seconds"] = float(e["seconds"]) + float(case.get("time", 0))
        if bad is not None or case.find("skipped") is not None:
            e["passed"] = False
            msg = (bad.get("message") if bad is not None else "skipped") or "failed"
            e["failure"] = msg.splitlines()[0][:90]
        for p in case.iter("property"):
            e["props"][p.get("name")] = p.get("value")  # type: ignore[index]
    return out


def table(results: dict[str, dict[str, object]], markdown: bool) -> str:
    rows = []
    for test_id, area, tried, guarantee in CASES:
        r = results.get(test_id)
        if r is None:
            happened = "NOT RUN"
        elif r["passed"]:
            props = ", ".join(f"{k}={v}" for k, v in r["props"].items())  # type: ignore[union-attr]
            happened = "held" + (f" ({props})" if props else "")
        else:
            happened = f"BROKEN: {r['failure']}"
        rows.append((area, tried, happened, guarantee))
    head = ("area", "fault tried", "what happened", "guaranteed")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    w = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{n}}}" for n in w)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * n for n in w))]
                     + [fmt.format(*r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "faults.xml"
        seconds = run_cases([c[0] for c in CASES], xml)
        results = outcomes(xml)
    print(table(results, args.markdown))
    broken = [c[0] for c in CASES if not results.get(c[0], {}).get("passed")]
    held = len(CASES) - len(broken)
    print(f"\n{held}/{len(CASES)} faults held ({seconds:.0f} s)"
          + (f"; BROKEN or not run: {len(broken)}" if broken else ""))
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
