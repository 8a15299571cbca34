"""Usage errors answered as usage errors, fast (issue 23, item 3): a device the machine lacks, a base or merged
path that is an adapter, an adapter path that is a model: one line, exit 2, before any model is loaded; and no
traceback when the reader of stdout goes away."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _fail_if_loaded(monkeypatch):
    """Any engine run (in this process or a child) means the usage error came too late."""
    import harness.api
    import harness.engine.supervisor

    def boom(*args, **kwargs):
        raise AssertionError("the engine ran: the usage error must come before any model is loaded")

    monkeypatch.setattr(harness.engine.supervisor, "run_isolated", boom)
    monkeypatch.setattr(harness.api, "run_in_process", boom)


def test_device_cuda_without_cuda_is_a_usage_error(default_bundle, monkeypatch, capsys):
    """Before: exit 1 with six failed checks (`Torch not compiled with CUDA enabled`, fix about trust_remote_code)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fail_if_loaded(monkeypatch)
    code = main(["check", "--quiet", "--adapter", str(default_bundle.adapter_dir), "--base-model",
                 str(default_bundle.base_dir), "--trust-remote-code", "--device", "cuda"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "--device cuda" in line and "no CUDA device" in line and "--device cpu" in line


def test_base_model_that_is_an_adapter_is_refused_at_once(default_bundle, monkeypatch, capsys):
    _fail_if_loaded(monkeypatch)
    started = time.monotonic()
    code = main(["check", "--quiet", "--adapter", str(default_bundle.adapter_dir), "--base-model",
                 str(default_bundle.adapter_dir)])
    took = time.monotonic() - started
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "--base-model is an adapter directory" in line and "pass it as --adapter" in line
    assert took < 3, f"{took:.1f} s"


def test_merged_that_is_an_adapter_is_refused_before_the_run(default_bundle, monkeypatch, capsys):
    """Before: the whole check ran, then merged-matches failed."""
    _fail_if_loaded(monkeypatch)
    code = main(["check", "--quiet", "--adapter", str(default_bundle.adapter_dir), "--base-model",
                 str(default_bundle.base_dir), "--trust-remote-code", "--merged", str(default_bundle.adapter_dir)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "--merged is an adapter directory" in line


def test_adapter_that_is_a_model_is_refused_before_the_run(default_bundle, monkeypatch, capsys):
    _fail_if_loaded(monkeypatch)
    code = main(["check", "--quiet", "--adapter", str(default_bundle.base_dir)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "--adapter is a model directory" in line and "--base-model or --merged" in line


def _closed_early(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI with stdout a small pipe whose reader takes one line and goes away (`... | head -1`)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: the smallest pipe, so the writer is still writing
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                            env=env)
    os.close(write_end)
    os.read(read_end, 16)  # unbuffered: the rest stays in the pipe, and the writer blocks on what does not fit
    os.close(read_end)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)


def test_a_closed_pipe_ends_the_output_quietly():
    """Before: `plora-harness list | head -3` ended in a BrokenPipeError traceback (5 of 6 tries under load)."""
    run = _closed_early("list")
    assert b"Traceback" not in run.stderr and b"BrokenPipe" not in run.stderr, run.stderr.decode()[-2000:]
    assert run.returncode == 0


def test_check_report_to_a_closed_pipe_keeps_the_verdict(default_bundle):
    run = _closed_early("check", "--quiet", "--verbose", "--adapter", str(default_bundle.adapter_dir))
    assert b"Traceback" not in run.stderr and b"BrokenPipe" not in run.stderr, run.stderr.decode()[-2000:]
    assert run.returncode == 0
