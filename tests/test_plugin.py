"""The pytest plugin lives in other people's repositories: prefixed options, inert by default, items named and
collected like any test, outcomes mapped exactly (pass / warn -> pass + warning / fail / skip)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fixtures.runs import planned_check_ids
from harness.pytest_plugin import ConformanceFailure, ConformanceWarning, outcome_of
from harness.report import CheckResult

pytest_plugins = ["pytester"]

CLASHING_CONFTEST = '''
def pytest_addoption(parser):
    parser.addoption("--device", default="cpu")
    parser.addoption("--dtype", default="float32")
    parser.addoption("--adapter", default=None)
    parser.addoption("--base-model", default=None)
    parser.addoption("--merged", default=None)


def pytest_report_header(config):
    return f"mine: {config.getoption('device')} {config.getoption('adapter')}"
'''


def test_a_repository_that_owns_common_option_names_still_starts(pytester):
    pytester.makeconftest(CLASHING_CONFTEST)
    pytester.makepyfile("def test_ok(pytestconfig):\n    assert pytestconfig.getoption('device') == 'cuda'\n")
    result = pytester.runpytest("--device", "cuda", "--adapter", "mine", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["mine: cuda mine"])


def test_every_plugin_option_carries_the_prefix_in_its_own_group(pytester):
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    section = text[text.index("LoRA adapter conformance (plora-harness)"):]
    section = section[:section.index("\n\n")]
    options = [w.rstrip(",=") for w in section.split() if w.startswith("--")]
    assert options and all(o.startswith("--plora-") for o in options), options


def test_without_options_the_plugin_adds_nothing_and_imports_nothing_heavy(pytester):
    pytester.makepyfile("import sys\n"
                        "def test_light():\n"
                        "    assert not {'torch', 'transformers', 'peft', 'harness.api'} & set(sys.modules)\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    result.assert_outcomes(passed=1)
    assert "plora-conformance" not in result.stdout.str()


@pytest.mark.parametrize(("status", "expected"), [("pass", None), ("warn", ConformanceWarning),
                                                    ("fail", ConformanceFailure), ("skip", pytest.skip.Exception)])
def test_each_status_maps_to_exactly_one_pytest_outcome(status, expected, recwarn):
    result = CheckResult("finite", status, "one line \x1b[31m", fix="do this")
    if expected is None:
        outcome_of(result)
        assert not [w for w in recwarn if issubclass(w.category, ConformanceWarning)]
    elif expected is ConformanceWarning:
        outcome_of(result)  # passes ...
        (warning,) = [w for w in recwarn if issubclass(w.category, ConformanceWarning)]  # ... with one warning
        assert "finite: one line" in str(warning.message) and "\x1b" not in str(warning.message)
    else:
        with pytest.raises(expected) as info:
            outcome_of(result)
        if expected is ConformanceFailure:
            assert str(info.value) == "finite: one line \\x1b[31m\nfix: do this"


@pytest.mark.slow
def test_several_adapters_are_items_of_their_own_and_each_engine_runs_once_under_xdist(default_bundle, make_bundle,
                                                                                      tmp_path):
    other = make_bundle(lora_r=4, lora_alpha=8).adapter_dir
    calls = tmp_path / "engine-calls.txt"
    (tmp_path / "conftest.py").write_text(
        "import harness.api as api\n"
        "_check = api.check\n"
        "def counting_check(adapter, **kwargs):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write(str(adapter) + '\\n')\n"
        "    return _check(adapter, **kwargs)\n"
        "api.check = counting_check\n"
    )
    report = tmp_path / "conformance.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
         "--plora-adapter", str(default_bundle.adapter_dir), "--plora-adapter", str(other),
         "--plora-report", str(report), str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False,
    )
    static = len(planned_check_ids(base_model=False, merged=False))
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"{2 * (static - 1)} passed, 2 skipped" in run.stdout
    assert sorted(calls.read_text().splitlines()) == sorted([str(default_bundle.adapter_dir), str(other)])
    data = json.loads(report.read_text())
    assert {r["inputs"]["adapter"] for r in data["reports"]} == {str(default_bundle.adapter_dir), str(other)}


def test_a_warning_check_passes_with_a_pytest_warning(pytester, default_bundle, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from fixtures.mutations import copy_adapter

    partial = copy_adapter(default_bundle.adapter_dir, tmp_path / "partial")
    tensors = load_file(partial / "adapter_model.safetensors")
    key = next(k for k in tensors if ".lora_B." in k)
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, partial / "adapter_model.safetensors", metadata={"format": "pt"})
    result = pytester.runpytest("--plora-adapter", str(partial), "-p", "no:cacheprovider", "--rootdir",
                                str(pytester.path), "-W", "always")
    result.assert_outcomes(passed=len(planned_check_ids(base_model=False, merged=False)) - 1, skipped=1)
    result.stdout.fnmatch_lines(["*ConformanceWarning: noop:*lora_B tensors are exactly zero*"])


def test_under_pytest_every_problem_of_a_failure_is_visible():
    """Before: the second problem hid behind "(+1 more problem(s))"."""
    result = CheckResult("merged-matches", "fail", "ΔW missing in w.0 (+1 more problem(s))",
                         {"problems": ["ΔW missing in w.0", "dtype float16, expected bfloat16"]}, fix="re-merge")
    with pytest.raises(ConformanceFailure) as info:
        outcome_of(result)
    text = str(info.value)
    assert "- ΔW missing in w.0" in text and "- dtype float16, expected bfloat16" in text
    assert text.endswith("fix: re-merge")


@pytest.mark.slow
def test_a_base_beyond_one_workers_memory_gives_items_per_depth_slice_that_workers_share(default_bundle, tmp_path):
    """Each depth slice is an item group of its own (``::layer-1::key-coverage``), computed once, and a fault in
    one layer fails that slice's item only."""
    from safetensors.torch import load_file, save_file

    from fixtures.mutations import copy_adapter
    from harness.loading.slices import layer_layout, needed_bytes
    from harness.model.structure import inspect_base

    info = inspect_base(default_bundle.base_dir, build_tree=False)
    per_worker = needed_bytes(info, "float32", 1, layer_layout(info))
    broken = copy_adapter(default_bundle.adapter_dir, tmp_path / "layer1-missing")
    tensors = load_file(broken / "adapter_model.safetensors")
    missing = next(k for k in tensors if ".layers.1." in k and ".lora_B." in k)
    del tensors[missing]
    save_file(tensors, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    report = tmp_path / "conformance.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q", "-rfE", "--rootdir", str(tmp_path),
         f"--plora-adapter={broken}", f"--plora-base-model={default_bundle.base_dir}", "--plora-trust-remote-code",
         "--plora-only=finite", "--plora-only=key-coverage", "--plora-dtype=float32",
         f"--plora-max-memory={2 * per_worker}", f"--plora-report={report}", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, check=False,
    )
    out = run.stdout
    assert run.returncode == 1, out[-3000:]
    assert "FAILED plora-conformance::layer1-missing::layer-1::key-coverage" in out, out[-3000:]
    assert "layer-0::key-coverage" not in out.split("short test summary")[-1], out[-3000:]
    assert "2 passed" in out and "1 failed" in out, out[-3000:]  # finite, layer-0 pass; layer-1 fails
    data = json.loads(report.read_text())
    assert sorted(str(r["inputs"].get("layers")) for r in data["reports"]) == ["0-0", "1-1", "None"]
