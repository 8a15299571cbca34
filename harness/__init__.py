"""plora-harness: conformance checks for LoRA adapters of XComposer (PLoRA) and HF causal LMs.

``check`` (one adapter) and ``check_adapters`` (several against one base) run the checks, model code in a
child process; ``check_trained`` is the end-of-training gate. Importing the package imports no torch: the
three are the functions of ``harness.api`` themselves (real signatures for ``help()`` and editors), imported
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.2.0"
__all__ = ["check", "check_adapters", "check_trained"]

if TYPE_CHECKING:
    from harness.api import check, check_adapters, check_trained


def __getattr__(name: str):
    if name in __all__:
        import harness.api

        return getattr(harness.api, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
