"""GPU-side suites: the real XComposer model from a path, and the synthetic family at full 7B size.

Library code only (no pytest): ``tests/gpu`` wires it. Every function takes a device and the
dimensions, so the same logic runs on CPU at tiny sizes in the default test suite and on a GPU at
the real sizes under ``pytest -m gpu``.

Modules: ``build`` (the family built on a device, deterministic LoRA), ``full_size`` (the 7B merge
check), ``quirks`` and ``real_model`` (the real remote code: diagnostics, loading, conformance run),
``figures`` (timing, peak memory, the JSON of figures). Import them directly; nothing is re-exported,
so importing one does not pull in the others.
"""
