"""Remote-code sources of the synthetic XComposer family.

The exporter copies these files beside the weights; they import only torch and
transformers, and each other by relative import, so an exported directory loads
with ``trust_remote_code=True`` in a process that never imports ``harness``.
"""
