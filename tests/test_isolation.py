"""Model code runs only with consent, only in the engine's child process, and can never produce a silent pass.

Each case copies the synthetic base and prepends a payload to the module transformers imports first
(the config class named in ``auto_map``), then runs the real CLI in a subprocess, as CI would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fixtures.runs import planned_check_ids

CONFIG_MODULE = "configuration_internlm_xcomposer2.py"


def _base_with_payload(base_dir: Path, tmp_path: Path, payload: str) -> Path:
    copy = shutil.copytree(base_dir, tmp_path / "base")
    module = copy / CONFIG_MODULE
    module.write_text(payload + "\n" + module.read_text())
    return copy


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "check", "--quiet", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_model_code_does_not_run_without_consent(default_bundle, tmp_path):
    marker = tmp_path / "ran.txt"
    base = _base_with_payload(default_bundle.base_dir, tmp_path, f"open({str(marker)!r}, 'w').write('x')")
    run = _cli("--adapter", str(default_bundle.adapter_dir), "--base-model", str(base), timeout=60)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-remote-code" in lines[0] and CONFIG_MODULE in lines[0]
    assert "modeling_internlm_xcomposer2.py" in lines[0] and run.stdout == ""
    assert not marker.exists()  # nothing was imported


def test_trusted_code_runs_in_a_child_and_is_listed_with_its_sha256(default_bundle, tmp_path):
    marker = tmp_path / "ran.txt"
    base = _base_with_payload(default_bundle.base_dir, tmp_path,
                              f"import os\nopen({str(marker)!r}, 'a').write(str(os.getpid()) + '\\n')")
    report = tmp_path / "r.json"
    run = _cli("--adapter", str(default_bundle.adapter_dir), "--base-model", str(base), "--trust-remote-code",
               "--only", "targets-resolve", "--json", str(report))
    assert run.returncode == 0, run.stdout[-3000:]
    pids = set(marker.read_text().split())
    assert pids and str(subprocess.os.getpid()) not in pids  # never in this (or the CLI's) process: the child's
    code = {Path(c["file"]).name: c for c in json.loads(report.read_text())["code"]}
    digest = hashlib.sha256((base / CONFIG_MODULE).read_bytes()).hexdigest()
    assert code[CONFIG_MODULE]["sha256"] == digest and code[CONFIG_MODULE]["executed"] is True
    assert digest in run.stdout  # the terminal report lists it too


PAYLOADS = {  # name: (payload, what the failures must say, the payload's line that ends the engine)
    "os._exit(0)": ("import os\nos._exit(0)", "os._exit", 2),
    "sys.exit(0)": ("import sys\nsys.exit(0)", "SystemExit(0)", 2),
    "KeyboardInterrupt": ("raise KeyboardInterrupt", "KeyboardInterrupt", 1),
    "segfault": ("import ctypes\nctypes.string_at(0)", "SIGSEGV", 2),
    "sleeps forever": ("import time\ntime.sleep(10**6)", "did not finish within", 2),
}


# os._exit stays in the fast tier (the exit_called event end to end); the other ways run in the slow tier.
@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name == "os._exit(0)" else [pytest.mark.slow])
                                  for name in sorted(PAYLOADS)])
def test_model_code_that_ends_the_engine_fails_every_unfinished_check(name, default_bundle, tmp_path):
    payload, phrase, line = PAYLOADS[name]
    base = _base_with_payload(default_bundle.base_dir, tmp_path, payload)
    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    # Only the sleeper waits out the engine's limit; the others end it themselves, and get room for a loaded machine
    # (under CI load the imports and static checks alone once took the 20 s, so config-valid was not reported).
    limit = "40" if name == "sleeps forever" else "180"
    run = _cli("--adapter", str(default_bundle.adapter_dir), "--base-model", str(base), "--trust-remote-code",
               "--timeout", limit, "--json", str(report), "--junit", str(junit))
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    data = json.loads(report.read_text())
    planned = planned_check_ids(base_model=True, merged=False)
    assert [c["id"] for c in data["checks"]] == planned  # the report is complete
    by_id = {c["id"]: c for c in data["checks"]}
    assert by_id["config-valid"]["status"] == "pass"  # what finished before the payload ran stays reported
    stopped = [c for c in data["checks"] if c["details"].get("not_reported")]
    assert stopped and all(c["status"] == "fail" and phrase in c["message"] for c in stopped), stopped[:1]
    assert f"{CONFIG_MODULE}:{line}" in stopped[0]["message"], stopped[0]["message"]  # where, in the model's code
    assert "FAIL" in run.stdout and phrase in run.stdout  # the table is on stdout
    cases = ET.parse(junit).getroot().iter("testcase")
    assert sum(1 for case in cases if case.find("failure") is not None) == data["summary"]["failed"]
