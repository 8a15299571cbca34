"""plora-harness: conformance checks for LoRA adapters of XComposer (PLoRA) and HF causal LMs."""

__version__ = "0.1.0"


def check(*args, **kwargs):
    """Run the conformance checks; see ``harness.api.check`` (imported lazily: torch is heavy)."""
    from .api import check as _check

    return _check(*args, **kwargs)
