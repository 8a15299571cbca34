"""The report model: summary, exit code, JSON shape, plain-text rendering, JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.report import CheckResult, Report


def _report() -> Report:
    return Report(
        inputs={"adapter": "/x/adapter", "base_model": None},
        environment={"torch": "2.13", "transformers": "5.24", "peft": "0.21.2"},
        checks=[
            CheckResult("config-valid", "pass", "LoRA config: r=8", {"r": 8}),
            CheckResult("finite", "fail", "2 tensor(s) contain NaN/Inf", {"count": 2, "path": Path("/x"),
                                                                         "value": float("nan")}, fix="retrain"),
            CheckResult("noop", "warn", "1 of 10 lora_B tensors are zero", {"zero": 1}, fix="check gradients"),
            CheckResult("unsafe-pickle", "skip", "no .bin file"),
        ],
        harness_version="9.9.9",
    )


def test_summary_exit_code_and_lookup():
    report = _report()
    assert report.summary == {"passed": 1, "failed": 1, "warned": 1, "skipped": 1}
    assert report.exit_code == 1
    assert report.get("noop").status == "warn" and report.get("nope") is None
    assert report["finite"].fix == "retrain"
    with pytest.raises(KeyError):
        report["nope"]
    report.checks = [c for c in report.checks if c.status != "fail"]
    assert report.exit_code == 0  # warnings allowed


def test_check_result_validates_status_and_keeps_one_line():
    with pytest.raises(ValueError):
        CheckResult("x", "ok", "m")
    assert CheckResult("x", "pass", "two\nlines  here").message == "two lines here"


def test_json_has_exactly_the_documented_shape():
    data = json.loads(_report().to_json())
    assert list(data) == ["harness_version", "exit_code", "demo", "started_at", "duration_s", "inputs", "environment",
                          "notes", "not_checked", "code", "checks", "work", "summary"]
    assert data["harness_version"] == "9.9.9" and data["exit_code"] == 1
    assert set(data["environment"]) == {"torch", "transformers", "peft"}
    for check in data["checks"]:
        assert list(check) == ["id", "status", "message", "duration_s", "details"]
    finite = next(c for c in data["checks"] if c["id"] == "finite")
    assert finite["details"] == {"count": 2, "path": "/x", "value": "nan", "fix": "retrain"}
    assert data["summary"] == {"passed": 1, "failed": 1, "warned": 1, "skipped": 1}


def test_default_environment_and_version():
    report = Report()
    assert set(report.environment) == {"torch", "transformers", "peft"}
    assert all(report.environment.values())
    from harness import __version__

    assert report.harness_version == __version__
    assert report.exit_code == 0 and report.summary["passed"] == 0


def test_render_table_then_details_with_fixes():
    text = _report().render()
    lines = text.splitlines()
    table = [line for line in lines if line.split(" ")[0] in ("config-valid", "finite", "noop", "unsafe-pickle")]
    assert [line.split()[1] for line in table] == ["PASS", "FAIL", "WARN", "SKIP"]
    details = text[text.index("Details"):]
    assert "[FAIL] finite" in details and "fix: retrain" in details
    assert "[WARN] noop" in details and "fix: check gradients" in details
    assert "config-valid" not in details and "unsafe-pickle" not in details
    assert lines[-1] == "1 passed, 1 failed, 1 warnings, 1 skipped"


def test_junit_one_testcase_per_check(tmp_path):
    path = _report().to_junit(tmp_path / "r.xml")
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "1" and suite.get("skipped") == "1"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert list(cases) == ["config-valid", "finite", "noop", "unsafe-pickle"]
    failure = cases["finite"].find("failure")
    assert failure.get("message") == "2 tensor(s) contain NaN/Inf" and "retrain" in failure.text
    assert cases["unsafe-pickle"].find("skipped") is not None
    assert cases["config-valid"].find("failure") is None and cases["noop"].find("failure") is None


HOSTILE_NAME = "base_model.model.x\x1b[2J\x1b[31mred\x07\x00\u202etxt.lora_A.weight"


def _hostile_report() -> Report:
    return Report(inputs={"adapter": "/x/\x1b]0;title\x07"},
                  checks=[CheckResult("key-grammar", "fail", f"1 key(s) are not LoRA tensors (e.g. {HOSTILE_NAME})",
                                      {"examples": [HOSTILE_NAME, "y" * 10_000_000]}, fix="remove them"),
                          CheckResult("shapes", "pass", "z" * 5000, duration_s=0.25)],
                  notes=[f"note about {HOSTILE_NAME}"])


def test_terminal_output_escapes_control_characters_and_cuts_long_text():
    text = _hostile_report().render()
    assert not any(c in text for c in "\x1b\x07\x00\u202e")
    assert "\\x1b[2J" in text and "\\x07" in text and "\\u202e" in text
    assert max(len(line) for line in text.splitlines()) < 1000  # a 10 MB name does not make a 10 MB line
    assert "more characters" in text


def test_json_keeps_names_whole_and_junit_is_valid_xml(tmp_path):
    report = _hostile_report()
    data = json.loads(report.to_json())
    assert data["checks"][0]["details"]["examples"][0] == HOSTILE_NAME  # full name, escaped by JSON itself
    root = ET.parse(report.to_junit(tmp_path / "r.xml")).getroot()  # parses: no raw control characters
    case = next(c for c in root.iter("testcase") if c.get("name") == "key-grammar")
    assert "\\x1b" in case.find("failure").get("message")
    assert next(c for c in root.iter("testcase") if c.get("name") == "shapes").get("time") == "0.250"


def test_run_report_has_one_exit_code_and_a_section_per_adapter(tmp_path):
    from harness.report import RunReport

    good = Report(inputs={"adapter": "/a"}, checks=[CheckResult("finite", "pass", "ok")])
    run = RunReport(reports=[good, _report()])
    assert run.exit_code == 1 and run.summary["failed"] == 1 and run.summary["passed"] == 2
    data = json.loads(run.to_json())
    assert list(data) == ["harness_version", "exit_code", "demo", "started_at", "duration_s", "environment", "notes",
                          "reports", "summary"]
    assert [r["inputs"]["adapter"] for r in data["reports"]] == ["/a", "/x/adapter"]
    text = run.render()
    assert "== adapter 1 of 2: /a ==" in text and "1 of 2 adapters failed" in text
    suites = ET.parse(run.to_junit(tmp_path / "r.xml")).getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == ["plora-harness::/a", "plora-harness::/x/adapter"]


def test_details_leave_out_empty_fields_on_the_terminal_and_keep_them_in_the_json():
    """Before: a merged-matches failure printed a dozen empty fields (missing: [], unexpected: [], ...)."""
    result = CheckResult("merged-matches", "fail", "1 weight differs", {"missing": [], "unexpected": [], "ties": {},
                                                                         "note": "", "worst": None, "wrong": ["w.0"]},
                         fix="re-merge")
    report = Report(inputs={"adapter": "/a"}, checks=[result])
    details = report.render().split("Details", 1)[1]
    assert "wrong: " in details and "w.0" in details
    for empty in ("missing:", "unexpected:", "ties:", "note:", "worst:"):
        assert empty not in details
    assert json.loads(report.to_json())["checks"][0]["details"]["missing"] == []


def test_every_report_has_its_start_time_and_total_duration(tmp_path):
    """Before: no total time and no timestamp anywhere; JUnit's suite time was the sum of the check times."""
    from harness.report import RunReport

    report = _report()
    report.started_at, report.duration_s = "2026-12-07T18:00:00Z", 17.25
    assert "run: started 2026-12-07T18:00:00Z, took 17.2 s" in report.render()
    data = json.loads(report.to_json())
    assert data["started_at"] == "2026-12-07T18:00:00Z" and data["duration_s"] == 17.25
    suite = ET.parse(report.to_junit(tmp_path / "r.xml")).getroot().find("testsuite")
    assert suite.get("timestamp") == "2026-12-07T18:00:00" and suite.get("time") == "17.250"
    assert Report.from_dict(data).to_dict() == data
    run = RunReport(reports=[report], started_at="2026-12-07T18:00:00Z", duration_s=20.0)
    assert run.render().endswith("run: started 2026-12-07T18:00:00Z, took 20.0 s")
    assert json.loads(run.to_json())["duration_s"] == 20.0


def test_a_fresh_report_is_stamped_now():
    import re

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", Report().started_at)


def test_the_report_time_includes_the_engine_start_up(default_bundle, monkeypatch):
    """The first adapter's time counts from the start of the run (the child's start-up and imports included),
    so a single adapter's "took" is the run's, not only the part after the engine started."""
    import harness.engine.recorder as recorder_module
    from harness.engine import events as ev
    from harness.engine.plan import Plan
    from harness.engine.recorder import Recorder

    clock = [100.0]  # a clock the test moves: no sleeps, so a loaded machine cannot change the figures
    monkeypatch.setattr(recorder_module.time, "monotonic", lambda: clock[0])
    plan = Plan(adapters=(str(default_bundle.adapter_dir), str(default_bundle.adapter_dir)))
    recorder = Recorder(plan)
    clock[0] += 0.3  # the engine process starting
    for index in (0, 1):
        recorder.handle(ev.Start(index, []))
        clock[0] += 0.1
        recorder.handle(ev.Notes(index, []))
    recorder.handle(ev.Done())
    run = recorder.finish()
    first, second = (r.duration_s for r in run.reports)
    assert (first, second, run.duration_s) == (0.4, 0.1, 0.5)
