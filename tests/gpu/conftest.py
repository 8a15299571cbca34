"""Wiring for the GPU suites: options, device/dtype, the real model's path, the figures file.

The plugin (harness.pytest_plugin) owns the options (--plora-base-model / PLORA_HARNESS_BASE_MODEL,
--plora-adapter / PLORA_HARNESS_ADAPTER, --plora-device, --plora-dtype); the repository's conftest skips
every ``gpu`` item with "no CUDA device" on machines without one; the real-model items also need a model
directory and skip with "no --plora-base-model given" otherwise. Figures go to $PLORA_HARNESS_FIGURES when set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.dtypes import DType
from harness.pytest_plugin import option

FIGURES_ENV = "PLORA_HARNESS_FIGURES"


@pytest.fixture(scope="session")
def gpu_device(pytestconfig: pytest.Config) -> str:
    return pytestconfig.getoption("plora_device") or "cuda"


@pytest.fixture(scope="session")
def gpu_dtype(pytestconfig: pytest.Config, gpu_device: str) -> torch.dtype:
    """--plora-dtype, defaulting to bf16 on CUDA (what users run 7B models in) and fp32 elsewhere."""
    name = pytestconfig.getoption("plora_dtype") or ("bfloat16" if gpu_device == "cuda" else "float32")
    return DType.of(name).torch


@pytest.fixture(scope="session")
def real_base_model(pytestconfig: pytest.Config) -> Path:
    path = option(pytestconfig, "plora_base_model")
    if path is None:
        pytest.skip("no --plora-base-model given")
    return Path(path)


@pytest.fixture(scope="session")
def real_adapter(pytestconfig: pytest.Config) -> Path | None:
    paths = option(pytestconfig, "plora_adapter")
    return Path(paths[0]) if paths else None


@pytest.fixture(scope="session")
def figures_path() -> Path | None:
    value = os.environ.get(FIGURES_ENV)
    return Path(value) if value else None
