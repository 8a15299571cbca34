"""The engine process: ``python -m harness.engine.child PLAN_FILE EVENTS_FD``.

It runs the plan (model code included) and writes one JSON event per line to ``EVENTS_FD``; its
stdout and stderr belong to a log, never to the report. It ignores SIGINT (a real Ctrl-C is the
supervisor's to handle), so an interrupt, an exit or a crash here always comes from the code it
runs, and is reported as such: ``sys.exit``/``KeyboardInterrupt`` raised by model code become a
``fatal`` event, a call to ``os._exit`` is recorded with its file and line before the process
ends, and faulthandler writes the stack of a segfault (or, on SIGUSR1, of a hung run) to a file
the supervisor reads.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
from pathlib import Path

FAULT_LOG_ENV = "PLORA_HARNESS_FAULT_LOG"
_real_exit = os._exit


def main(argv: list[str]) -> int:
    plan_file, events_fd = argv[0], int(argv[1])
    _die_with_parent(int(argv[2]) if len(argv) > 2 else None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fault_log = open(os.environ.get(FAULT_LOG_ENV, os.devnull), "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.enable(file=fault_log, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=fault_log, all_threads=True)
    events = os.fdopen(events_fd, "w", buffering=1, encoding="utf-8")
    lock = threading.Lock()

    from harness.engine import events as ev

    def emit(event: ev.Event) -> None:
        with lock:
            events.write(json.dumps(ev.to_dict(event), allow_nan=False, default=str) + "\n")
            events.flush()

    from harness.loading import model_code as guards

    def recorded_exit(code: int) -> None:  # model code ending the process: say where, then do it
        emit(ev.ExitCalled(code, guards.model_code_frame(sys._getframe(1))))
        _real_exit(code)

    os._exit = recorded_exit
    from harness.engine.plan import Plan

    plan = Plan.from_json(Path(plan_file).read_text())
    from harness.compat import UnsupportedStack, require_supported

    try:
        require_supported()
    except UnsupportedStack as err:
        emit(ev.InputRefused(str(err)))
        return 0
    _quiet_libraries()
    from harness.engine.run import execute

    _freeze_imported_objects()

    try:
        execute(plan, emit)
    except BaseException as err:  # noqa: BLE001 - KeyboardInterrupt etc. can only come from the code run here
        where = guards.model_code_frame(err.__traceback__)
        emit(ev.Fatal(f"model code raised {type(err).__name__}" + (f"({err})" if str(err) else "")
                      + (f" at {where}" if where else "")))
        return 3
    return 0


def _die_with_parent(parent: int | None) -> None:
    """The engine never outlives the process that owns the verdict (it runs in a session of its own, so a
    killed CLI would otherwise leave it running): Linux delivers SIGKILL when the parent goes."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # the parent went before the request took effect
        _real_exit(3)


def _freeze_imported_objects() -> None:
    """Move everything the imports created out of the collector's sight: the engine frees each model with
    gc.collect(), which otherwise walks torch's and transformers' millions of objects every time (~0.5 s)."""
    import gc

    import peft  # noqa: F401 - imported here so that their objects are frozen too
    import torch  # noqa: F401
    import transformers  # noqa: F401

    gc.collect()
    gc.freeze()


def _quiet_libraries() -> None:
    """Progress bars and info logs of transformers would bury the log; the checks record warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    _real_exit(code)  # no interpreter teardown: model code's atexit hooks and threads cannot change the outcome
