"""The GPU suites on a machine without CUDA: collected, skipped with a reason, and scripts/gpu-check.sh
refuses to report a GPU figure it did not measure."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
GPU_FILES = ("tests/gpu/test_full_size_gpu.py", "tests/gpu/test_real_model_gpu.py")


def no_cuda_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLORA_HARNESS_", "PYTEST_"))}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.mark.slow
def test_gpu_items_are_selected_by_the_marker_and_skipped_without_cuda():
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
                          "-p", "no:xdist", "-q", "-rs"], cwd=ROOT, env=no_cuda_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for path in GPU_FILES:
        assert f"SKIPPED [4] {path}: no CUDA device" in run.stdout, run.stdout
    assert "8 skipped" in run.stdout and "passed" not in run.stdout.split("skipped")[-1]


@pytest.mark.slow
def test_gpu_check_refuses_to_run_without_cuda(tmp_path):
    assert subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True).returncode == 2
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         env=no_cuda_env(PLORA_HARNESS_GPU_PYTHON=sys.executable))
    assert run.returncode == 3, run.stdout + run.stderr
    assert "gpu-check: no CUDA device" in run.stdout + run.stderr
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert figures == {"gpu_check": {"exit_status": 3, "reason": "no CUDA device",
                                     "wall_s_including_setup": figures["gpu_check"]["wall_s_including_setup"]}}
    assert (tmp_path / "out" / "environment.txt").read_text().startswith("python ")


@pytest.mark.slow
def test_gpu_check_writes_junit_and_figures(tmp_path):
    """With the CUDA gate lifted (a switch for testing the script itself) the pipeline runs through:
    pytest -m gpu, JUnit, figures; the tests themselves skip for want of a device."""
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300,
                         env=no_cuda_env(PLORA_HARNESS_GPU_PYTHON=sys.executable, PLORA_HARNESS_GPU_ALLOW_CPU="1"))
    assert run.returncode == 0, run.stdout + run.stderr
    suite = ET.parse(out / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert (suite.get("tests"), suite.get("skipped")) == ("4", "4")
    assert {s.get("message") for s in suite.iter("skipped")} == {"no CUDA device"}
    assert json.loads((out / "figures.json").read_text())["gpu_check"]["exit_status"] == 0
    assert "gpu-check: results in" in (out / "gpu-check.log").read_text()
