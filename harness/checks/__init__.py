"""Checks: a registry of stable ids, grouped static / against-base / dynamic / merged."""

from harness.checks import static  # noqa: E402,F401  (registers the static checks)
from harness.checks.context import CheckContext, CheckOptions
from harness.checks.registry import (
    GROUPS,
    REGISTRY,
    Check,
    checks,
    failed,
    get_check,
    passed,
    register,
    run_check,
    run_checks,
    skipped,
    warned,
)
from harness.checks.static import run_static

__all__ = [
    "GROUPS", "REGISTRY", "Check", "CheckContext", "CheckOptions", "checks", "failed", "get_check", "passed",
    "register", "run_check", "run_checks", "run_static", "skipped", "warned",
]
