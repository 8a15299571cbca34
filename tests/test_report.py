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
    assert list(data) == ["harness_version", "inputs", "environment", "checks", "summary"]
    assert data["harness_version"] == "9.9.9"
    assert set(data["environment"]) == {"torch", "transformers", "peft"}
    for check in data["checks"]:
        assert list(check) == ["id", "status", "message", "details"]
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
