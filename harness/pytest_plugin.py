"""pytest plugin (entry point ``pytest11``): options, markers and skips only; no logic.

Kept import-light: torch is imported only when a ``gpu``-marked test is collected.
"""

from __future__ import annotations

import pytest

MARKERS = {
    "gpu": "needs a CUDA device (skipped with the reason otherwise); select with -m gpu",
    "slow": "long-running; deselect with -m 'not slow'",
    "distributed": "spawns several processes (DeepSpeed / torch.distributed on gloo)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in gpu_items:
            item.add_marker(skip)
