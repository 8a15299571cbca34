"""The engine: every planned check of every adapter, in order, reported as events.

Per adapter: a DeepSpeed checkpoint is converted first (vetted pickles, DeepSpeed's own
zero_to_fp32), the adapter is read, then the groups run in order: static, against-base (the base
inspected once for all adapters), dynamic (one shared ``DynamicRun``), merged. Static and
against-base checks are cheap and gate the dynamic ones, so they always run; only the selected
ones are reported. Whatever a run opens is closed by the adapter's ``CheckContext.cleanup``.

This runs model code when a base model is given: the shells run it in a child process
(``harness.engine.supervisor``); ``execute`` itself is the same code, in the calling process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from harness.checks.context import CheckContext
from harness.checks.registry import Check, checks, get_check, run_check
from harness.engine import events as ev
from harness.engine.plan import Plan
from harness.inputs.errors import InputError
from harness.report import CheckResult
from harness.worklog import WorkLog, recording

Emit = Callable[[ev.Event], None]
GATING_GROUPS = ("deepspeed", "static", "against-base")  # cheap, and what the dynamic group waits for


def execute(plan: Plan, emit: Emit) -> None:
    """Run ``plan``; every outcome goes to ``emit``. Raises nothing for a check's failure."""
    from harness.loading import model_code as guards

    base_info = None
    dirs = [Path(plan.base_model)] if plan.base_model is not None else []
    guards.trust_code_dirs(dirs)
    with guards.network_blocked(), guards.remote_code_consent(plan.trust_remote_code):
        try:
            for index, adapter in enumerate(plan.adapters):
                base_info = _run_adapter(plan, index, adapter, base_info, emit)
        except InputError as err:
            emit(ev.InputRefused(str(err)))
            return
        except SystemExit as err:  # model code called sys.exit(): the run cannot go on in this process
            where = guards.model_code_frame(err.__traceback__)
            emit(ev.Fatal(f"model code raised SystemExit({err.code!r})" + (f" at {where}" if where else "")))
            return
        finally:
            _close_shared()
    emit(ev.Code(executed_code(dirs)))
    emit(ev.Done())


def _run_adapter(plan: Plan, index: int, adapter: str, base_info, emit: Emit):
    planned = plan.planned_ids(index)
    emit(ev.Start(index, planned))
    ctx = CheckContext(options=plan.options, run_adapters=tuple(Path(a) for a in plan.adapters), planned=tuple(planned),
                       progress=lambda text: emit(ev.Progress(index, text)))
    log = WorkLog()  # where this adapter's time goes: each check's own, and the shared work (harness.worklog)
    with ctx.cleanup, recording(log):
        with log.shared("adapter.read", "reading the adapter"):
            _read_inputs(ctx, Path(adapter), emit, index, zero=plan.is_zero_checkpoint(adapter))
        groups = _groups(ctx, plan, index)
        for group in groups:
            if group == "against-base" and ctx.adapter is not None:
                if base_info is None:
                    from harness.model.structure import inspect_base

                    ctx.say(f"inspecting base model {plan.base_model} on the meta device")
                    with log.shared("base.inspect", "inspecting the base model on the meta device"):
                        base_info = inspect_base(plan.base_model)
                ctx.base = base_info
            if group == "merged":
                ctx.merged = Path(plan.merged_for(index))
            for check in checks(group):
                if plan.selected(check.id) or group in GATING_GROUPS:
                    _run_one(ctx, log, check, report=plan.selected(check.id), emit=emit, index=index)
        if ctx.deepspeed_error is not None:  # every planned check is reported, those that cannot run as skipped
            reason = "the DeepSpeed checkpoint could not be converted into an adapter (see zero-checkpoint)"
            for check_id in planned:
                if get_check(check_id).group not in groups:
                    emit(ev.Result(index, CheckResult(check_id, "skip", reason)))
        emit(ev.Work(index, [work.to_dict() for work in log.entries()]))
        emit(ev.Notes(index, list(ctx.notes)))
    return base_info


def _close_shared() -> None:
    """End what checks keep across the run's adapters (the vLLM engine of ``serving-vllm``), if one started."""
    import sys

    if (serving := sys.modules.get("harness.checks.measure.serving_vllm")) is not None:
        serving.close_engines()


def _groups(ctx: CheckContext, plan: Plan, index: int) -> list[str]:
    if ctx.deepspeed_error is not None:  # a refused or failed conversion: nothing else can be checked
        return ["deepspeed"]
    return plan.groups(index)


def _read_inputs(ctx: CheckContext, adapter: Path, emit: Emit, index: int, *, zero: bool) -> None:
    """Read the adapter (``zero``: a DeepSpeed checkpoint, as the plan found it; converted first)."""
    from harness.inputs import deepspeed
    from harness.inputs.adapter_dir import read_adapter

    inputs: dict = {"adapter": str(adapter)}
    if zero:
        ctx.say(f"converting DeepSpeed checkpoint {adapter} with zero_to_fp32")
        inputs["deepspeed_checkpoint"] = str(adapter)
        try:
            ctx.deepspeed = ctx.cleanup.enter_context(deepspeed.converted_zero_checkpoint(adapter))
        except deepspeed.DeepSpeedUnavailable as err:
            raise InputError(f"{adapter}: is a DeepSpeed checkpoint and {err}") from None
        except deepspeed.ZeroCheckpointError as err:
            ctx.deepspeed_error = str(err).splitlines()[0]
            emit(ev.Inputs(index, inputs))
            return
        adapter = ctx.deepspeed.output_dir
    ctx.say(f"reading adapter {adapter}")
    ctx.adapter = read_adapter(adapter)
    ctx.cleanup.callback(ctx.adapter.close)
    emit(ev.Inputs(index, {**ctx.adapter.describe(), **inputs}))


def _run_one(ctx: CheckContext, log: WorkLog, check: Check, *, report: bool, emit: Emit, index: int) -> None:
    """Run one check; its ``duration_s`` is its own compute (the shared work it ran is in ``log``)."""
    from harness.loading.base import recording_adjustments

    ctx.say(f"check {check.id}")
    with recording_adjustments(ctx.notes), log.check(check.id) as timing:
        result = run_check(check, ctx)
    result.duration_s = timing.own_s
    if result.status == "fail" and check.group in GATING_GROUPS:
        ctx.failed_prerequisites.append(check.id)
    if report:
        emit(ev.Result(index, result))


def executed_code(dirs: list[Path]) -> list[dict]:
    """Every code file of the trusted directories with its sha256, and whether this process imported it."""
    import sys

    from harness.inputs.code import remote_code_files, sha256_of

    # transformers runs a copy of each file from its module cache (named differently in every version):
    # a file ran when a module was imported from a copy with the same content.
    loaded = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if "transformers_modules" in name and path:
            with contextlib.suppress(OSError):
                loaded.add((Path(path).name, sha256_of(Path(path))))
    files = []
    for directory in dirs:
        with contextlib.suppress(InputError, OSError):
            for code in remote_code_files(directory):
                files.append({**code.to_dict(), "executed": (code.path.name, code.sha256) in loaded})
    return files

