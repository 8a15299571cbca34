"""A CI gate never goes green by accident (issue 23, item 1 and 3): a run that checks no user adapter is an
explicit demo or a usage error, in the CLI, the API and the plugin (run in a repository of its own, with its own
pytest.ini and markers, as a user's repository is)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from harness.cli import main
from harness.inputs.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv", [["check"], ["check", "--quiet"], ["check", "--only", "finite"]])
def test_check_without_an_adapter_is_a_usage_error_not_the_demo(argv, capsys):
    """`plora-harness check $ADAPTER_ARGS` with the variable empty used to check the built-in demo and exit 0."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert "no adapter to check" in line and "plora-harness demo" in line
    assert captured.out == ""


@pytest.mark.parametrize("flag", ["--adapter", "--base-model", "--merged"])
def test_an_empty_path_is_a_usage_error(flag, default_bundle, capsys):
    argv = ["check", "--quiet", "--adapter", str(default_bundle.adapter_dir)] if flag != "--adapter" else ["check"]
    argv += ["--base-model", str(default_bundle.base_dir)] if flag == "--merged" else []
    assert main([*argv, flag, ""]) == 2
    assert f"{flag} is empty" in _one_line(capsys.readouterr().err)


def test_the_api_needs_an_adapter_or_demo_true():
    with pytest.raises(InputError, match="no adapter to check"):
        harness.check()
    with pytest.raises(InputError, match="built-in demo checks its own"):
        harness.check("somewhere", demo=True)


def test_check_demo_says_so_in_the_first_line_of_every_report(monkeypatch, synthetic_cache, capsys, tmp_path):
    monkeypatch.setenv("PLORA_HARNESS_CACHE", str(synthetic_cache))
    json_path, junit = tmp_path / "demo.json", tmp_path / "demo.xml"
    assert main(["check", "--demo", "--quiet", "--only", "config-valid", "--json", str(json_path),
                 "--junit", str(junit)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("built-in demo: ") and "not your adapter" in out.splitlines()[0]
    import json
    import xml.etree.ElementTree as ET

    assert json.loads(json_path.read_text())["demo"] is True
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().iter("property")}
    assert props["demo"].startswith("built-in demo")


def test_a_user_adapter_report_does_not_call_itself_the_demo(default_bundle, capsys):
    assert main(["check", "--quiet", "--adapter", str(default_bundle.adapter_dir), "--only", "finite"]) == 0
    assert "demo" not in capsys.readouterr().out


# -- the plugin, in a repository of its own ------------------------------------------------------------------

PYTEST_INI = "[pytest]\nmarkers =\n    mine: this repository's own marker\naddopts = --strict-markers\n"
OWN_TEST = "import pytest\n\n\n@pytest.mark.mine\ndef test_mine():\n    pass\n"


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "user-repo"
    repo.mkdir()
    (repo / "pytest.ini").write_text(PYTEST_INI)
    (repo / "test_own.py").write_text(OWN_TEST)
    return repo


def _pytest(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    inputs = ("PLORA_HARNESS_ADAPTER", "PLORA_HARNESS_BASE_MODEL", "PLORA_HARNESS_MERGED")
    full_env = {k: v for k, v in os.environ.items() if k not in inputs}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=repo,
                          env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--plora-base-model=BASE"], {}, "--plora-base-model"),
    (["--plora-merged=BASE"], {}, "--plora-merged"),
    (["--plora-trust-remote-code"], {}, "--plora-trust-remote-code"),
    (["--plora-only=finite"], {}, "--plora-only"),
    ([], {"PLORA_HARNESS_BASE_MODEL": "BASE"}, "PLORA_HARNESS_BASE_MODEL"),
    ([], {"PLORA_HARNESS_ADAPTER": ""}, "PLORA_HARNESS_ADAPTER is set but empty"),
    ([], {"PLORA_HARNESS_ADAPTER": os.pathsep}, "PLORA_HARNESS_ADAPTER is set but empty"),
    (["--plora-adapter="], {}, "--plora-adapter is empty"),
])
def test_plugin_inputs_without_an_adapter_are_a_usage_error(user_repo, default_bundle, args, env, named):
    """`pytest --plora-base-model=DIR` (or the variable) without an adapter used to give `1 passed`."""
    base = str(default_bundle.base_dir)
    run = _pytest(user_repo, *[a.replace("BASE", base) for a in args],
                  env={k: v.replace("BASE", base) for k, v in env.items()})
    assert run.returncode == 4, run.stdout + run.stderr  # pytest's usage error
    assert "passed" not in run.stdout
    assert named in run.stderr and "plora-harness:" in run.stderr and "Traceback" not in run.stderr


def test_plugin_without_any_input_leaves_the_repository_alone(user_repo):
    run = _pytest(user_repo)
    assert run.returncode == 0 and "1 passed" in run.stdout and "plora-conformance" not in run.stdout


def test_the_readme_pytest_line_keeps_the_users_rootdir_and_markers(user_repo, default_bundle):
    """Written as `--plora-adapter /path` (a space), pytest took the path for a test path when choosing its rootdir:
    the repository's pytest.ini was ignored and its own marker was unknown. The README's line must work as typed."""
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text[text.index("### From pytest"):]
    block = block[block.index("```bash") + len("```bash"):]
    line = block[:block.index("```")].replace("\\\n", " ")
    argv = shlex.split(line)
    assert argv[0] == "pytest"
    paths = {"path/to/adapter": str(default_bundle.adapter_dir), "path/to/base": str(default_bundle.base_dir)}
    args = []
    for word in argv[1:]:
        for placeholder, real in paths.items():
            word = word.replace(placeholder, real)
        args.append(word)
    args = [a for a in args if not a.startswith("--plora-merged")]  # the base is no merged checkpoint of it
    run = _pytest(user_repo, *args, "--plora-only=finite", "-rA")
    out = run.stdout + run.stderr
    assert "Unknown pytest.mark.mine" not in out and "not found in `markers`" not in out, out[-3000:]
    assert "PASSED test_own.py::test_mine" in out and "PASSED plora-conformance::" in out, out[-3000:]
    assert "../plora-conformance" not in out  # the rootdir is the repository's own, not an ancestor of the adapter
    assert run.returncode == 0, out[-3000:]
