"""The ``plora-harness`` command and the pytest plugin: exit codes, outputs, one item per check id."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from fixtures.mutations import MUTATIONS
from fixtures.runs import planned_check_ids
from harness.cli import main

pytest_plugins = ["pytester"]


def test_good_adapter_exits_0_with_a_table(default_bundle, capsys, tmp_path):
    code = main(["check", "--adapter", str(default_bundle.adapter_dir), "--quiet",
                 "--json", str(tmp_path / "r.json"), "--junit", str(tmp_path / "r.xml")])
    out = capsys.readouterr().out
    assert code == 0
    assert "check" in out and "status" in out and "empty-tensors     PASS" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) == {"harness_version", "exit_code", "demo", "started_at", "duration_s", "inputs", "environment",
                         "notes", "not_checked", "code", "checks", "work", "summary"}
    assert data["demo"] is False and data["started_at"].endswith("Z") and data["duration_s"] > 0
    assert data["exit_code"] == 0 and data["code"] == []
    assert data["not_checked"] and "no --base-model" in data["not_checked"][0]
    assert set(data["environment"]) >= {"torch", "transformers", "peft"}
    assert [c["id"] for c in data["checks"]] == planned_check_ids(base_model=False, merged=False)
    assert all(set(c) == {"id", "status", "message", "duration_s", "details"} for c in data["checks"])
    assert all(c["duration_s"] >= 0 for c in data["checks"])
    assert [w["key"] for w in data["work"]][:1] == ["adapter.read"] and data["work"][0]["checks"] == []
    assert data["summary"]["failed"] == 0
    cases = list(ET.parse(tmp_path / "r.xml").getroot().iter("testcase"))
    assert {case.get("name") for case in cases} == {c["id"] for c in data["checks"]}
    assert all(float(case.get("time")) >= 0 for case in cases)


def test_broken_adapter_exits_1_naming_the_check(default_bundle, capsys, tmp_path):
    broken = MUTATIONS["empty-tensors"].apply(default_bundle.adapter_dir, tmp_path / "broken")
    code = main(["check", "--adapter", str(broken), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert "empty-tensors     FAIL" in out
    assert "GatheredParameters" in out and "_zero3_consolidated_16bit_state_dict" in out


@pytest.mark.parametrize("args", [["--adapter", "/nonexistent/adapter"], ["--base-model", "/tmp"]])
def test_unreadable_input_or_usage_error_exits_2_with_one_line(args, capsys):
    assert main(["check", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("plora-harness:")
    assert "Traceback" not in err


def test_console_script_is_installed():
    run = subprocess.run([sys.executable, "-m", "harness.cli", "check", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--base-model" in run.stdout and "--merged" in run.stdout


def test_plugin_makes_one_item_per_check_id(pytester, default_bundle, tmp_path):
    report = tmp_path / "conformance.json"
    result = pytester.runpytest("--plora-adapter", str(default_bundle.adapter_dir), "--plora-report", str(report),
                                "-v", "-p", "no:cacheprovider", "--rootdir", str(pytester.path))
    result.assert_outcomes(passed=len(planned_check_ids(base_model=False, merged=False)) - 1, skipped=1)
    name = default_bundle.adapter_dir.name
    result.stdout.fnmatch_lines([f"*collected {len(planned_check_ids(base_model=False, merged=False))} items",
                                 f"plora-conformance::{name}::empty-tensors PASSED*",
                                 f"plora-conformance::{name}::finite PASSED*"])
    assert not [line for line in result.stdout.lines if "plora-conformance" in line and "../" in line]
    assert json.loads(report.read_text())["summary"]["failed"] == 0


def test_plugin_fails_the_broken_check_by_name(pytester, default_bundle, tmp_path):
    broken = MUTATIONS["empty-tensors"].apply(default_bundle.adapter_dir, tmp_path / "broken")
    result = pytester.runpytest("--plora-adapter", str(broken), "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*FAILED*plora-conformance::broken::empty-tensors*"])
    result.stdout.fnmatch_lines(["*fix:*GatheredParameters*"])
    assert result.ret == 1


@pytest.mark.slow
def test_plugin_under_xdist_runs_the_engine_once(default_bundle, tmp_path):
    """Every worker collects the conformance items; only one may run the engine (model loads are costly)."""
    calls = tmp_path / "engine-calls.txt"
    (tmp_path / "conftest.py").write_text(
        "import harness.api as api\n"
        "_check = api.check\n"
        "def counting_check(*args, **kwargs):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write('run\\n')\n"
        "    return _check(*args, **kwargs)\n"
        "api.check = counting_check\n"
    )
    report = tmp_path / "conformance.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q", "--plora-adapter",
         str(default_bundle.adapter_dir), "--plora-report", str(report), str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
    )
    expected = len(planned_check_ids(base_model=False, merged=False))
    assert run.returncode == 0, run.stdout[-2000:]
    assert f"{expected - 1} passed, 1 skipped" in run.stdout
    assert calls.read_text().splitlines() == ["run"]  # one engine run for both workers
    assert json.loads(report.read_text())["summary"]["failed"] == 0


def test_report_round_trips_through_its_json(default_bundle):
    import harness
    from harness.report import Report

    original = harness.check(default_bundle.adapter_dir, isolated=False)
    again = Report.from_dict(json.loads(original.to_json()))
    assert again.to_dict() == original.to_dict()
    assert [(c.id, c.status, c.fix) for c in again.checks] == [(c.id, c.status, c.fix) for c in original.checks]


def test_plugin_without_adapter_adds_nothing(pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_main_job_checks_the_embedded_default_end_to_end(monkeypatch, synthetic_cache, capsys):
    """`plora-harness demo`: synthetic base + adapter + merged model, every check, said to be the demo."""
    monkeypatch.setenv("PLORA_HARNESS_CACHE", str(synthetic_cache))
    assert main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("built-in demo: ") and "not your adapter" in out.splitlines()[0]
    for check_id in planned_check_ids(base_model=True, merged=True):
        assert f"\n{check_id} " in out, check_id
    assert "merged-matches     PASS" in out and "0 failed" in out


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_every_broken_fixture_exits_with_the_right_code_and_id(name, default_bundle, tmp_path, capsys):
    mutation = MUTATIONS[name]
    broken = mutation.apply(default_bundle.adapter_dir, tmp_path / "broken")
    code = main(["check", "--adapter", str(broken), "--quiet"])
    captured = capsys.readouterr()
    if name == "merged-model-dir":  # a model directory given as --adapter: a usage error, before any check
        assert code == 2 and "--adapter is a model directory" in captured.err and "Traceback" not in captured.err
    elif mutation.input_error:
        assert code == 2 and len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
        assert mutation.fragment.lower() in captured.err.lower()
    elif mutation.status == "fail":
        assert code == 1
        assert any(line.startswith(mutation.check) and "FAIL" in line for line in captured.out.splitlines())
    else:
        assert any(line.startswith(mutation.check) and mutation.status.upper() in line
                   for line in captured.out.splitlines())


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version_and_list():
    import harness
    from harness.checks.registry import checks

    run = _cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"plora-harness {harness.__version__}"
    listed = _cli("list")
    assert listed.returncode == 0 and listed.stderr == ""
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [c.id for c in checks()]
    assert all(line.split()[1] in ("deepspeed", "static", "against-base", "dynamic", "serving", "merged", "quantized",
                                   "trained")
               for line in lines)


@pytest.mark.slow
def test_json_to_stdout_leaves_nothing_else_on_stdout(default_bundle):
    run = _cli("check", "--adapter", str(default_bundle.adapter_dir), "--json", "-")
    assert run.returncode == 0
    data = json.loads(run.stdout)  # the whole of stdout is the JSON report
    assert data["exit_code"] == 0 and [c["id"] for c in data["checks"]][0] == "config-valid"
    assert "empty-tensors" in run.stderr  # the table went to stderr
    assert not (default_bundle.adapter_dir.parent / "-").exists()


def test_library_output_during_the_run_goes_to_stderr(default_bundle, monkeypatch, capsys):
    """A library that prints or logs to stdout while the run imports or builds (DeepSpeed's accelerator banner on
    the first, demo-building run) must not reach stdout, which carries the report only."""
    import logging

    import harness.api

    real = harness.api.check_adapters

    def noisy(*args, **kwargs):
        print("[WARNING] library banner")
        handler = logging.StreamHandler(sys.stdout)  # bound at creation, as DeepSpeed's logger is at import
        logger = logging.getLogger("plora-test-noisy")
        logger.addHandler(handler)
        logger.warning("logged banner")
        logger.removeHandler(handler)
        return real(*args, **kwargs)

    monkeypatch.setattr(harness.api, "check_adapters", noisy)
    assert main(["check", "--adapter", str(default_bundle.adapter_dir), "--quiet", "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["exit_code"] == 0  # stdout is exactly the report
    assert "library banner" in captured.err and "logged banner" in captured.err


def test_only_and_skip_select_checks_and_the_report_says_so(default_bundle, capsys):
    assert main(["check", "--adapter", str(default_bundle.adapter_dir), "--quiet", "--only", "finite",
                 "--only", "noop"]) == 0
    out = capsys.readouterr().out
    ids = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in
           planned_check_ids(base_model=False, merged=False)]
    assert ids == ["finite", "noop"] and "not checked: every check but finite, noop (--only)" in out
    assert main(["check", "--adapter", str(default_bundle.adapter_dir), "--quiet", "--skip", "finite"]) == 0
    out = capsys.readouterr().out
    assert "\nfinite " not in out and "\nnoop " in out and "finite (--skip)" in out
    assert main(["check", "--adapter", str(default_bundle.adapter_dir), "--quiet", "--only", "no-such-check"]) == 2
    assert "unknown check id(s) 'no-such-check'" in capsys.readouterr().err


def test_static_only_run_says_what_was_not_checked(default_bundle, capsys):
    assert main(["check", "--adapter", str(default_bundle.adapter_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "not checked: loading and numerics: no --base-model" in out


@pytest.mark.slow
def test_several_adapters_one_base_one_exit_code(default_bundle, tmp_path, capsys):
    broken = MUTATIONS["empty-tensors"].apply(default_bundle.adapter_dir, tmp_path / "broken")
    report = tmp_path / "r.json"
    code = main(["check", "--adapter", str(default_bundle.adapter_dir), "--adapter", str(broken),
                 "--base-model", str(default_bundle.base_dir), "--trust-remote-code", "--quiet",
                 "--only", "empty-tensors", "--only", "key-coverage", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    assert "== adapter 1 of 2:" in out and "== adapter 2 of 2:" in out and "1 of 2 adapters failed" in out
    data = json.loads(report.read_text())
    assert data["exit_code"] == 1 and [r["exit_code"] for r in data["reports"]] == [0, 1]
    first, second = ({c["id"]: c["status"] for c in r["checks"]} for r in data["reports"])
    assert first == {"empty-tensors": "pass", "key-coverage": "pass"}
    assert second == {"empty-tensors": "fail", "key-coverage": "skip"}  # blocked: the adapter cannot load


def test_an_unwritable_report_path_is_refused_before_the_run(default_bundle, tmp_path, capsys):
    code = main(["check", "--adapter", str(default_bundle.adapter_dir), "--quiet",
                 "--junit", str(tmp_path / "no" / "such" / "dir" / "r.xml")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
