"""A cancelled run leaves nothing behind: a CI runner that cancels a job sends SIGTERM to the CLI, whose engine
child may be writing a depth slice or a saved merge (gigabytes at 7B) into the temporary directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_sigterm_stops_the_engine_and_removes_its_temporary_files(default_bundle, tmp_path) -> None:
    """Before: the engine died with its parent (SIGKILL) and its slices and merges stayed in /tmp."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cli = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "check", "--adapter", str(default_bundle.adapter_dir), "--base-model",
         str(default_bundle.base_dir), "--trust-remote-code", "--quiet"],
        env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    written = []
    while time.monotonic() < deadline and cli.poll() is None and not written:
        # the engine's own temporary files: a DynamicRun's work directory once the dynamic checks start
        written = [p for p in scratch.glob("plora-harness-engine-*/tmp/*")]
        time.sleep(0.2)
    assert written, f"the engine wrote nothing to its temporary directory before the run ended ({cli.poll()})"
    engine = next(scratch.glob("plora-harness-engine-*"))
    cli.send_signal(signal.SIGTERM)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 130, err
    assert "interrupted; no report" in err
    assert not list(scratch.iterdir()), sorted(p.name for p in scratch.rglob("*"))[:10]
    time.sleep(1)
    alive = subprocess.run(["pgrep", "-f", str(engine / "plan.json")], capture_output=True, text=True).stdout
    assert not alive.strip(), f"the engine child outlived the CLI: {alive}"
