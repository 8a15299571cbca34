"""plora-harness: conformance checks for LoRA adapters of XComposer (PLoRA) and HF causal LMs."""

__version__ = "0.1.0"
