"""What a team adopting the tool looks for (issue 23, item 6 of "What was seen"): the real signature on the
public API, `explain ID`, "did you mean" for a misspelt option, settings in `[tool.plora-harness]`, a folder of
adapters as input, a default timeout that follows the model's size."""

from __future__ import annotations

import inspect
import json
import pydoc
import shutil
from pathlib import Path

import pytest

import harness
from harness.cli import main


def test_help_shows_the_real_signature_of_the_public_api():
    """Before: `help(harness.check)` showed `(*args, **kwargs)`."""
    for name in ("check", "check_adapters", "check_trained"):
        parameters = inspect.signature(getattr(harness, name)).parameters
        assert "args" not in parameters and "kwargs" not in parameters, name
    assert list(inspect.signature(harness.check).parameters)[:3] == ["adapter", "base_model", "merged"]
    assert "trust_remote_code" in pydoc.render_doc(harness.check)


def test_importing_the_package_still_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, harness; print(sorted({'torch', 'harness.api'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_explain_says_what_why_and_fix(capsys):
    from harness.checks.registry import get_check

    assert main(["explain", "empty-tensors"]) == 0
    out = capsys.readouterr().out
    check = get_check("empty-tensors")
    assert out.startswith("empty-tensors (static)")
    flat = " ".join(out.split())
    assert " ".join(check.why.split()) in flat and " ".join(check.fix.split()) in flat


def test_explain_an_unknown_id_suggests_the_nearest(capsys):
    assert main(["explain", "merged-matchs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean merged-matches?" in err


@pytest.mark.parametrize(("word", "meant"), [("--adaptor", "--adapter"), ("--base_model", "--base-model"),
                                             ("--trust-remote-codes", "--trust-remote-code")])
def test_a_misspelt_option_gets_a_did_you_mean_in_one_line(word, meant, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", word, "x"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"did you mean {meant}?" in err


def _adapter_copy(default_bundle, where: Path) -> Path:
    shutil.copytree(default_bundle.adapter_dir, where)
    return where


def test_settings_come_from_tool_plora_harness_in_pyproject(default_bundle, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    _adapter_copy(default_bundle, repo / "out" / "adapter")
    (repo / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.plora-harness]\nadapter = "out/adapter"\n'
                                         'only = ["finite", "noop"]\n')
    monkeypatch.chdir(repo / "out")  # found from a subfolder, paths relative to the pyproject
    assert main(["check", "--quiet", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["adapter"] == str(repo / "out" / "adapter")
    assert [c["id"] for c in data["checks"]] == ["finite", "noop"]
    assert main(["check", "--quiet", "--json", "-", "--only", "shapes"]) == 0  # the command line wins
    assert [c["id"] for c in json.loads(capsys.readouterr().out)["checks"]] == ["shapes"]


def test_an_unknown_pyproject_key_is_a_usage_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "pyproject.toml").write_text('[tool.plora-harness]\nadaptor = "x"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'adaptor'" in err and "did you mean 'adapter'?" in err


def test_a_folder_of_adapters_is_checked_adapter_by_adapter(default_bundle, tmp_path, capsys):
    """Before: a folder of adapters was refused ("adapters found in subdirectories: ... pass one of those")."""
    release = tmp_path / "release"
    for name in ("v1", "v2"):
        _adapter_copy(default_bundle, release / name)
    (release / "notes").mkdir()  # not an adapter: left alone
    report = tmp_path / "r.json"
    assert main(["check", "--quiet", "--adapter", str(release), "--only", "finite", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert [r["inputs"]["adapter"] for r in data["reports"]] == [str(release / "v1"), str(release / "v2")]
    assert "== adapter 2 of 2:" in capsys.readouterr().out


def test_the_default_timeout_follows_the_model_size(default_bundle, tmp_path):
    """Before: 4 hours per adapter whatever the model (a tiny model that hangs held CI for 4 hours)."""
    from harness.api import plan_run
    from harness.engine.plan import MIN_TIMEOUT_S, SECONDS_PER_GIB, default_timeout_s

    plan, _ = plan_run([default_bundle.adapter_dir], default_bundle.base_dir, trust_remote_code=True)
    assert MIN_TIMEOUT_S <= plan.timeout_s < MIN_TIMEOUT_S + 60
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:  # sparse: 14 GiB on paper, nothing on disk
        f.truncate(14 * 2**30)
    assert default_timeout_s(big) == MIN_TIMEOUT_S + 14 * SECONDS_PER_GIB
    assert plan_run([default_bundle.adapter_dir], timeout=30)[0].timeout_s == 30
    assert plan_run([default_bundle.adapter_dir], timeout=None)[0].timeout_s is None


def test_the_one_adapter_api_refuses_a_folder_before_running(default_bundle, tmp_path, monkeypatch):
    import harness.api
    from harness.inputs.errors import InputError

    release = tmp_path / "release"
    for name in ("v1", "v2"):
        _adapter_copy(default_bundle, release / name)
    run = harness.check_adapters([release], only=["finite"])
    assert [r.inputs["adapter"] for r in run.reports] == [str(release / "v1"), str(release / "v2")]
    monkeypatch.setattr(harness.api, "run_in_process", lambda *a, **k: pytest.fail("ran before refusing"))
    with pytest.raises(InputError, match="check_adapters"):
        harness.check(release)
