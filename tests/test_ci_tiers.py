"""``.ci/run`` (issue 22): both tiers on both stacks, non-zero when any run fails, and pytest's exit 5 ("no tests
ran") judged per tier. Run against a stand-in for ``scripts/in-venv`` that records its calls and answers with the
exit codes a test asks for, in a copy of the script's tree (nothing of the real suite runs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_IN_VENV = """#!/usr/bin/env bash
echo "$PLORA_HARNESS_STACK $*" >> calls.txt
key="${PLORA_HARNESS_STACK}_$([[ " $* " == *" -m slow "* ]] && echo slow || echo fast)"
code=$(grep "^$key=" codes.txt | cut -d= -f2)
exit "${code:-0}"
"""
FAKE_VLLM_VENV = """#!/usr/bin/env bash
echo "vllm $*" >> calls.txt
code=$(grep "^serving=" codes.txt | cut -d= -f2)
exit "${code:-0}"
"""


def run_ci(tmp_path: Path, codes: dict[str, int], *, slow_marked: bool = True) -> tuple[int, list[str], str]:
    tree = tmp_path / "repo"
    (tree / ".ci").mkdir(parents=True)
    (tree / "scripts").mkdir()
    (tree / "tests").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tree / ".ci" / "run")
    (tree / "scripts" / "in-venv").write_text(FAKE_IN_VENV)
    (tree / "scripts" / "vllm-venv").write_text(FAKE_VLLM_VENV)
    (tree / "codes.txt").write_text("".join(f"{k}={v}\n" for k, v in codes.items()))
    marker = "@pytest.mark.slow\n" if slow_marked else ""
    (tree / "tests" / "test_x.py").write_text(f"import pytest\n\n\n{marker}def test_x():\n    pass\n")
    done = subprocess.run(["bash", str(tree / ".ci" / "run")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    return done.returncode, (tree / "calls.txt").read_text().splitlines(), done.stderr


def test_both_tiers_run_on_both_stacks_and_all_pass(tmp_path):
    code, calls, _ = run_ci(tmp_path, {})
    assert code == 0
    assert calls == ["current pytest -n auto", "current pytest -n auto -m slow",
                     "oldest pytest -n auto", "oldest pytest -n auto -m slow",
                     "vllm pytest -p no:cacheprovider -n 0 tests/serving"]


def test_a_failing_serving_step_fails_ci(tmp_path):
    code, calls, _ = run_ci(tmp_path, {"serving": 1})
    assert code == 1 and len(calls) == 5


@pytest.mark.parametrize("failing", ["current_fast", "current_slow", "oldest_fast", "oldest_slow"])
def test_any_failing_run_fails_ci_and_the_others_still_run(tmp_path, failing):
    code, calls, err = run_ci(tmp_path, {failing: 1})
    stack, tier = failing.split("_")
    assert code == 1 and len(calls) == 5
    assert f"the {tier} tier failed on the {stack} stack (pytest exit 1)" in err


@pytest.mark.parametrize("empty", ["current_fast", "oldest_slow"])
def test_a_tier_that_ran_no_tests_fails_when_it_should_have_some(tmp_path, empty):
    code, _, err = run_ci(tmp_path, {empty: 5})
    assert code == 1 and "ran no tests" in err


def test_an_empty_slow_tier_passes_only_when_nothing_is_marked_slow(tmp_path):
    code, _, err = run_ci(tmp_path, {"current_slow": 5, "oldest_slow": 5}, slow_marked=False)
    assert code == 0 and "no test is marked slow" in err
