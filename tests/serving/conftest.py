"""Wiring for the serving tests: vLLM itself, and the tiny models it can serve on CPU.

vLLM is not in the default venv (it is the optional extra ``plora-harness[vllm]``): the tests that need it skip
with the reason there, and fail instead where ``PLORA_HARNESS_REQUIRE_VLLM=1`` (the CI step that builds the vLLM
venv with ``scripts/vllm-venv`` sets it, so a broken install cannot pass as a skip).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REQUIRE_ENV = "PLORA_HARNESS_REQUIRE_VLLM"


@pytest.fixture(scope="session")
def vllm_installed() -> None:
    from harness.checks.measure.serving_vllm import vllm_missing

    reason = vllm_missing()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(f"{reason}; run these with: bash scripts/vllm-venv pytest tests/serving")


@pytest.fixture(scope="session")
def serving_arch(synthetic_cache: Path) -> Callable:
    """``serving_arch(name)``: the built vLLM-servable zoo architecture (``fixtures.serving_zoo``)."""
    from fixtures.serving_zoo import build_serving_arch

    return lambda name: build_serving_arch(name, synthetic_cache)
