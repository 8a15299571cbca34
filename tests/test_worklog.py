"""Durations attributed to the work each check caused (issue 23, item 5).

Before: a check's time was its wall clock, so the check that first needed the base model carried its load, the
fp32 reference and the first loading path (the report's time column put all loading on key-coverage; in JUnit all
seconds landed on one test case). Now each check's time is its own compute, and the shared work is timed once,
named with the checks that used it, in the text, JSON and JUnit reports and in the plugin's pytest durations.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from harness import worklog
from harness.report import CheckResult, Report
from harness.worklog import Work, WorkLog

pytest_plugins = ["pytester"]
LOAD_S = 0.4  # a model load made slow on purpose: far above any check's own compute in these tests


def test_shared_work_is_timed_once_and_named_with_every_check_that_used_it():
    log = WorkLog()
    with worklog.recording(log):
        with log.check("key-coverage") as first:
            with worklog.shared("base.load", "loading the base model"):
                time.sleep(LOAD_S)
        with log.check("effect") as second:
            worklog.used("base.load")
    entry = log.work["base.load"]
    assert entry.seconds >= LOAD_S and entry.runs == 1 and entry.checks == ["key-coverage", "effect"]
    assert entry.caused_by == "key-coverage"
    assert first.own_s < LOAD_S / 2 and second.own_s < LOAD_S / 2  # the load is nobody's own time


def test_nested_shared_work_is_its_own_entry_and_never_counted_twice():
    log = WorkLog()
    with worklog.recording(log), log.check("merge-equivalence") as timing:
        with worklog.shared("dynamic.run", "the fp32 reference"):
            with worklog.shared("base.load", "loading the base model"):
                time.sleep(LOAD_S)
            time.sleep(LOAD_S / 2)
    outer, inner = log.work["dynamic.run"], log.work["base.load"]
    assert inner.seconds >= LOAD_S and LOAD_S / 2 <= outer.seconds < LOAD_S  # the outer one excludes the load
    assert timing.own_s < LOAD_S / 4 and inner.checks == outer.checks == ["merge-equivalence"]
    with worklog.recording(log), log.check("path-agreement"):
        worklog.used("dynamic.run")  # reusing the run reuses the load inside it
    assert inner.checks == outer.checks == ["merge-equivalence", "path-agreement"] and inner.runs == 1


def test_without_a_log_shared_and_used_do_nothing():
    with worklog.shared("base.load", "loading the base model"):
        pass
    worklog.used("base.load")  # no log open (library use): no error, nothing recorded


def test_work_done_before_any_check_names_no_check():
    log = WorkLog()
    with worklog.recording(log), log.shared("adapter.read", "reading the adapter"):
        pass
    assert log.work["adapter.read"].checks == [] and log.work["adapter.read"].caused_by is None


def _timed_report() -> Report:
    return Report(inputs={"adapter": "/x/a"}, environment={}, started_at="2026-12-07T18:00:00Z", duration_s=10.0,
                  checks=[CheckResult("key-coverage", "pass", "ok", duration_s=0.2),
                          CheckResult("effect", "pass", "ok", duration_s=0.3)],
                  work=[Work("base.load", "loading the base model (float32, cpu)", 6.0, 1, ["key-coverage", "effect"]),
                        Work("adapter.read", "reading the adapter", 0.01, 1, [])])


def test_reports_show_the_shared_work_beside_each_checks_own_time(tmp_path):
    report = _timed_report()
    text = report.render()
    assert "   6.0s  loading the base model (float32, cpu): caused by key-coverage; also used by effect" in text
    assert "   3.5s  other: start-up, imports and clean-up" in text  # 10 - 0.2 - 0.3 - 6.0 - 0.01, rounded
    assert "1 smaller piece(s) of shared work" in text
    data = json.loads(report.to_json())
    assert data["work"][0] == {"key": "base.load", "name": "loading the base model (float32, cpu)", "seconds": 6.0,
                               "runs": 1, "checks": ["key-coverage", "effect"]}
    assert Report.from_dict(data).to_dict() == data
    suite = ET.parse(report.to_junit(tmp_path / "r.xml")).getroot().find("testsuite")
    times = {case.get("name"): case.get("time") for case in suite.iter("testcase")}
    assert times == {"key-coverage": "0.200", "effect": "0.300"} and suite.get("time") == "10.000"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["work.0"] == ("loading the base model (float32, cpu): 6.000 s, caused by key-coverage; "
                               "also used by effect")
    assert props["work.other"] == "start-up, imports and clean-up: 3.490 s"


def test_the_plugin_gives_a_checks_shared_work_to_its_setup_and_its_own_time_to_its_call():
    from harness.pytest_plugin import _attribute

    report = _timed_report()

    def phase(check_id: str, when: str) -> float:
        item = SimpleNamespace(run=SimpleNamespace(_report=report), check_id=check_id, user_properties=[])
        test_report = SimpleNamespace(when=when, duration=99.0)
        _attribute(item, test_report)
        return test_report.duration, item.user_properties

    assert phase("key-coverage", "call")[0] == 0.2 and phase("effect", "call")[0] == 0.3
    setup, properties = phase("key-coverage", "setup")  # the load it caused, and the run's start-up (first check)
    assert setup == pytest.approx(6.0 + 0.01 + 3.49)
    assert properties == [("plora_shared_work", "loading the base model (float32, cpu): 6.000 s (also used by effect)")]
    assert phase("effect", "setup") == (0.0, [])


def test_a_check_that_triggers_the_base_load_gets_it_as_shared_work_not_as_its_own_time(default_bundle,
                                                                                      monkeypatch):
    """The engine as the CLI runs it (in this process): the base load, made slow, is shared work caused by the
    first dynamic check and used by the others; that check's own time stays far below the load."""
    from harness.checks.measure import dynamic_run
    from harness.engine.plan import Plan
    from harness.engine.recorder import Recorder
    from harness.engine.run import execute

    real_load = dynamic_run.load_base

    def slow_load(*args, **kwargs):
        time.sleep(LOAD_S)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(dynamic_run, "load_base", slow_load)
    plan = Plan(adapters=(str(default_bundle.adapter_dir),), base_model=str(default_bundle.base_dir),
                trust_remote_code=True, only=("key-coverage", "effect", "merge-equivalence"))
    recorder = Recorder(plan)
    execute(plan, recorder.handle)
    report = recorder.finish().reports[0]
    work = {w.key: w for w in report.work}
    load = work["base.load"]
    assert load.seconds >= LOAD_S and load.runs == 1
    assert load.caused_by == "key-coverage" and report["key-coverage"].duration_s < LOAD_S
    assert set(work["dynamic.run"].checks) == {"key-coverage", "effect", "merge-equivalence"}
    assert work["paths.chain"].checks[0] in ("key-coverage", "merge-equivalence") and work["paths.chain"].seconds > 0
    assert work["adapter.read"].checks == [] and "base.inspect" in work
    assert sum(r.duration_s for r in report.checks) + sum(w.seconds for w in report.work) <= report.duration_s + 0.01
    assert "loading the base model (float32, cpu): caused by key-coverage; also used by" in report.render()


def test_under_pytest_the_loading_is_the_setup_of_the_check_that_caused_it(pytester, default_bundle, tmp_path):
    """The plugin end to end: JUnit's time of the item that caused the load holds it (as a fixture's setup would),
    with the shared work named in its properties; a check that only reused it is not charged for it."""
    junit, report = tmp_path / "junit.xml", tmp_path / "report.json"
    result = pytester.runpytest(f"--plora-adapter={default_bundle.adapter_dir}",
                                f"--plora-base-model={default_bundle.base_dir}", "--plora-trust-remote-code",
                                "--plora-only=key-coverage", "--plora-only=effect", f"--plora-report={report}",
                                f"--junitxml={junit}", "-p", "no:cacheprovider", "--rootdir", str(pytester.path))
    result.assert_outcomes(passed=2)
    engine = Report.from_dict(json.loads(report.read_text()))
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    caused = engine.caused_s("key-coverage")
    assert caused > 0 and {w.key for w in engine.work if w.caused_by == "key-coverage"} >= {"base.load", "dynamic.run"}
    assert float(cases["key-coverage"].get("time")) >= caused
    assert float(cases["effect"].get("time")) < caused  # its own compute: the load it reused is not its time
    props = {p.get("name"): p.get("value") for p in cases["key-coverage"].iter("property")}
    shared = props["plora_shared_work"]
    assert "loading the base model" in shared and "(also used by effect)" in shared
    assert not list(cases["effect"].iter("property"))
