"""Checks: a registry of stable ids, grouped deepspeed / static / against-base / dynamic / serving / merged / trained.

Importing the registry or any check module imports no torch: a check imports what it computes with
when it runs, so listing, planning and documenting checks stays fast.
"""

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

__all__ = [
    "GROUPS", "REGISTRY", "Check", "CheckContext", "CheckOptions", "checks", "failed", "get_check", "passed",
    "register", "run_check", "run_checks", "skipped", "warned",
]
