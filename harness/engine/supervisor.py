"""The process that owns the verdict: start the engine in a child, read its events, judge how it ended.

Model code runs only in the child (``harness.engine.child``). Whatever happens there (an exit with
any code, a signal, the memory killer, a hang past the timeout) the parent still writes a complete
report: every planned check the child did not report fails with one line naming what ended the
run, and where in the model's code when that is known. Exit 0 is only possible when every planned
check reported and none failed. This module imports no torch.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness.engine import events as ev
from harness.engine.plan import Plan
from harness.engine.recorder import Recorder
from harness.inputs.errors import InputError
from harness.report import RunReport, printable

Progress = Callable[[str], None]
_GRACE_S = 2.0  # after SIGUSR1 (dump stacks) before SIGKILL
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


class EngineInputError(InputError):
    """The engine found an input unusable (exit 2): its one line, as the engine said it."""


def run_isolated(plan: Plan, *, progress: Progress | None = None, verbose: bool = False,
                 code_files: list[dict] | None = None) -> RunReport:
    """Run ``plan`` in a child process; the report, complete whatever the child did."""
    from harness.loading.model_code import trust_code_dirs

    recorder = Recorder(plan)
    trust_code_dirs([Path(d) for d in (plan.base_model, *plan.merged_dirs()) if d is not None])
    with tempfile.TemporaryDirectory(prefix="plora-harness-engine-") as work:
        work = Path(work)
        plan_file = work / "plan.json"
        plan_file.write_text(plan.to_json())
        log_path, fault_path = work / "engine.log", work / "faults.log"
        (work / "tmp").mkdir()
        read_end, write_end = os.pipe()
        # the engine's temporary files (depth slices, saved merges) live in this directory, removed below whatever
        # became of the child: a child killed with its parent cannot clean up after itself
        env = {**os.environ, **_OFFLINE, "HF_MODULES_CACHE": str(work / "modules"), "TMPDIR": str(work / "tmp"),
               "PYTHONPATH": os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p),
               "PLORA_HARNESS_FAULT_LOG": str(fault_path)}
        with open(log_path, "wb") as log:
            output = sys.stderr if verbose else log  # --verbose: the engine's own output on our stderr
            try:
                child = subprocess.Popen(
                    [sys.executable, "-m", "harness.engine.child", str(plan_file), str(write_end), str(os.getpid())],
                    pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=env,
                    start_new_session=True,
                )
            finally:
                os.close(write_end)
            try:
                problem = _supervise(child, read_end, recorder, plan, progress, fault_path)
            except BaseException:  # a real Ctrl-C (or anything else) here: never leave the engine running
                _kill(child)
                raise
            finally:
                os.close(read_end)
        if recorder.input_error is not None:
            raise EngineInputError(recorder.input_error)
        report = recorder.finish(problem)
        if problem is not None:
            tail = _tail(log_path)
            for run_report in report.reports:
                for result in run_report.checks:
                    if result.details.get("not_reported") and tail:
                        result.details["engine_output_tail"] = tail
        if code_files and not any(r.code for r in report.reports):
            for run_report in report.reports:  # the engine ended before saying what ran: what could have
                run_report.code = [{**f, "executed": None} for f in code_files]
        return report


def _supervise(child: subprocess.Popen, read_end: int, recorder: Recorder, plan: Plan, progress: Progress | None,
               fault_path: Path) -> str | None:
    """Read events until the child ends or the deadline passes; why the run ended early, or None."""
    limit = plan.deadline_s()
    deadline = None if limit is None else time.monotonic() + limit
    buffer = b""
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([read_end], [], [], wait if wait is None else min(wait, 1.0))
        if not ready:
            if deadline is not None and time.monotonic() >= deadline:
                running = recorder.running()
                _dump_stacks_and_kill(child)
                where = _fault_frame(fault_path)
                return (f"the engine did not finish within {limit:g} s (--timeout) while {running}"
                        + (f"; it was in model code at {where}" if where else ""))
            continue
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            event = _parse(line)
            if event is None:
                continue
            recorder.handle(event)
            if isinstance(event, ev.Progress) and progress is not None:
                progress(event.text)
    code = child.wait()
    if recorder.done or recorder.input_error is not None:
        return None
    return _describe_end(code, recorder, fault_path)


def _describe_end(code: int, recorder: Recorder, fault_path: Path) -> str:
    exit_call = recorder.exit_call
    running = recorder.running()
    if recorder.fatal:
        return f"{recorder.fatal} while {running}; the engine stopped"
    if code < 0:
        name = _signal_name(-code)
        why = {"SIGSEGV": " (segmentation fault)", "SIGKILL": " (killed: out of memory, or by another process)",
               "SIGBUS": " (bus error)", "SIGABRT": " (aborted)"}.get(name, "")
        where = _fault_frame(fault_path)
        return (f"the engine process died by {name}{why} while {running}"
                + (f"; in model code at {where}" if where else ""))
    if exit_call is not None:
        where = exit_call.where
        return (f"the engine process ended with exit code {exit_call.code} while {running}: "
                + (f"model code called os._exit at {where}" if where else "os._exit was called"))
    return f"the engine process ended with exit code {code} before reporting, while {running}"


def _parse(line: bytes) -> ev.Event | None:
    """One line of the engine's event stream; None for anything that is not an event (dropped)."""
    try:
        return ev.from_dict(json.loads(line.decode("utf-8", "replace")))
    except ValueError:
        return None


def _dump_stacks_and_kill(child: subprocess.Popen) -> None:
    """Ask the engine for its stacks (faulthandler on SIGUSR1), then stop its whole process group."""
    try:
        os.killpg(child.pid, signal.SIGUSR1)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        child.wait(_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _kill(child)


def _kill(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def _fault_frame(fault_path: Path) -> str | None:
    from harness.loading.model_code import model_code_frame_in_text

    try:
        text = fault_path.read_text(errors="replace")[-200_000:]
    except OSError:
        return None
    return model_code_frame_in_text(text)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(path: Path, lines: int = 12) -> list[str]:
    try:
        text = path.read_bytes()[-20_000:].decode("utf-8", "replace")
    except OSError:
        return []
    return [printable(line, 300) for line in text.splitlines()[-lines:] if line.strip()]


def _package_root() -> str:
    """The directory holding this ``harness`` package, so the child imports the same code as the parent."""
    return str(Path(__file__).resolve().parents[2])
