"""Checks: a registry of stable ids, grouped static / against-base / dynamic / merged."""

from .registry import (
    GROUPS,
    REGISTRY,
    Check,
    CheckContext,
    CheckOptions,
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
from . import static  # noqa: E402,F401  (registers the static checks)
from .static import run_static

__all__ = [
    "GROUPS", "REGISTRY", "Check", "CheckContext", "CheckOptions", "checks", "failed", "get_check", "passed",
    "register", "run_check", "run_checks", "run_static", "skipped", "warned",
]
