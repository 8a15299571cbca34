"""plora-harness: conformance checks for LoRA adapters of XComposer (PLoRA) and HF causal LMs.

``check`` (one adapter) and ``check_adapters`` (several against one base) run the checks, model code in a
child process; ``check_trained`` is the end-of-training gate. Importing the package imports no torch.
"""

__version__ = "0.2.0"


def check(*args, **kwargs):
    """Run the conformance checks on one adapter; see ``harness.api.check``."""
    from harness.api import check as _check

    return _check(*args, **kwargs)


def check_adapters(*args, **kwargs):
    """Run the conformance checks on several adapters against one base; see ``harness.api.check_adapters``."""
    from harness.api import check_adapters as _check_adapters

    return _check_adapters(*args, **kwargs)


def check_trained(*args, **kwargs):
    """End-of-training gate; see ``harness.api.check_trained``."""
    from harness.api import check_trained as _check_trained

    return _check_trained(*args, **kwargs)
