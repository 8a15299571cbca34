"""The check registry: stable ids, what each catches, why, the fix, and a runner that never crashes.

A check is a plain function ``func(ctx: CheckContext) -> CheckResult`` registered by a call after it::

    def check_finite(ctx):
        return passed("no NaN/Inf")            # id and default fix are filled in by the runner


    register(id="finite", group="static", summary="...", why="...", fix="...")(check_finite)

(not as a decorator: mutmut does not mutate decorated functions, so a decorated body would be outside
mutation testing, scripts/mutation-test.sh; ``tests/test_mutation_scope.py`` keeps it so).

``run_checks(ctx, group)`` runs every check of a group in registration order and turns an unexpected
exception inside a check into a ``fail`` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.checks.context import CheckContext
from harness.report import CheckResult

GROUPS = ("deepspeed", "static", "against-base", "dynamic", "serving", "merged", "quantized", "trained")


@dataclass(frozen=True)
class Check:
    id: str
    group: str
    summary: str  # what it catches
    why: str  # why it matters
    fix: str  # how to fix a failure (default, a check may give a more specific one)
    func: Callable[["CheckContext"], CheckResult]


REGISTRY: dict[str, Check] = {}


def register(*, id: str, group: str, summary: str, why: str, fix: str) -> Callable:
    """``register(...)(func)``: add ``func`` to the registry under a stable ``id`` (returns ``func``)."""
    if group not in GROUPS:
        raise ValueError(f"unknown check group {group!r}; one of {GROUPS}")

    def decorate(func: Callable) -> Callable:
        if id in REGISTRY and REGISTRY[id].func is not func:
            existing = REGISTRY[id].func
            if (existing.__module__, existing.__qualname__) != (func.__module__, func.__qualname__):
                raise ValueError(f"check id {id!r} registered twice")
        REGISTRY[id] = Check(id=id, group=group, summary=summary, why=why, fix=fix, func=func)
        return func

    return decorate


def get_check(check_id: str) -> Check:
    if check_id not in REGISTRY:
        _load_builtin_checks()
    return REGISTRY[check_id]


def checks(group: str | None = None) -> list[Check]:
    """Registered checks (of one group, or all in ``GROUPS`` order), in registration order.

    Only the module of the asked group is imported, so a static-only run never imports the
    model-loading machinery of the other groups.
    """
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown check group {group!r}; one of {GROUPS}")
    _load_builtin_checks(group)
    selected = [c for c in REGISTRY.values() if group is None or c.group == group]
    return sorted(selected, key=lambda c: GROUPS.index(c.group))  # stable: registration order within a group


# -- result helpers: id (and default fix) are filled in by the runner -----------------------------


def passed(message: str, **details) -> CheckResult:
    return CheckResult(id="", status="pass", message=message, details=details)


def failed(message: str, *, fix: str | None = None, **details) -> CheckResult:
    return CheckResult(id="", status="fail", message=message, details=details, fix=fix)


def warned(message: str, *, fix: str | None = None, **details) -> CheckResult:
    return CheckResult(id="", status="warn", message=message, details=details, fix=fix)


def skipped(message: str, **details) -> CheckResult:
    return CheckResult(id="", status="skip", message=message, details=details)


def run_check(check: Check, ctx: CheckContext) -> CheckResult:
    """Run one check; an exception or a wrong return value becomes a ``fail``, never a crash."""
    from harness.inputs.errors import UnusableInput

    try:
        result = check.func(ctx)
        if not isinstance(result, CheckResult):
            raise TypeError(f"check returned {type(result).__name__}, not CheckResult")
    except UnusableInput:
        raise  # the input cannot be used at all: the whole run answers with its one line (exit 2)
    except Exception as err:  # noqa: BLE001 - a broken check must not take the report down
        text = str(err).strip().splitlines()
        reason = text[0][:300] if text else ""
        return CheckResult(
            id=check.id,
            status="fail",
            message=f"internal error in check: {type(err).__name__}: {reason}",
            details={"exception": type(err).__name__},
            fix="this is a harness bug or an input it does not understand; please report it with the JSON report",
        )
    result.id = check.id
    if result.status in ("fail", "warn") and result.fix is None:
        result.fix = check.fix
    return result


def run_checks(ctx: CheckContext, group: str | None = None, only: list[str] | None = None) -> list[CheckResult]:
    """Run every check of ``group`` (all groups if None) or the ids in ``only``, in order."""
    selected = checks(group)
    if only is not None:
        selected = [c for c in selected if c.id in only]
    results = []
    for check in selected:
        ctx.say(f"check {check.id}")
        results.append(run_check(check, ctx))
    return results


# group -> the module of this package that registers its built-in checks
_GROUP_MODULES = {"deepspeed": "deepspeed", "static": "static", "against-base": "against_base", "dynamic": "dynamic",
                  "serving": "serving", "merged": "merged", "quantized": "quantized", "trained": "trained"}


def _load_builtin_checks(group: str | None = None) -> None:
    """Import the module(s) that register the built-in checks of ``group`` (all groups if None)."""
    import importlib

    for name in [_GROUP_MODULES[group]] if group is not None else list(_GROUP_MODULES.values()):
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{name}":
                raise
