"""plora-harness: conformance checks for LoRA adapters of XComposer (PLoRA) and HF causal LMs."""

__version__ = "0.1.0"


def check(*args, **kwargs):
    """Run the conformance checks; see ``harness.api.check`` (imported lazily: torch is heavy)."""
    from harness.api import check as _check

    return _check(*args, **kwargs)


def check_trained(*args, **kwargs):
    """End-of-training gate; see ``harness.api.check_trained``."""
    from harness.api import check_trained as _check_trained

    return _check_trained(*args, **kwargs)
