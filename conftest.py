"""Session fixtures for the harness's own test suite.

Synthetic base models and adapters are built once per cache key on disk, shared
by all pytest-xdist workers (a file lock, not a race), and treated as read-only
inputs by every test.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" (an optional accelerated kernel;
# its plain CPU kernels work) when first imported, which importing torch can do: with no handler, logging's
# last-resort handler printed it on the terminal at the end of the suite's runs. A NullHandler, set before anything
# here imports torch, keeps it off the terminal only: the record still propagates to pytest's log capture, and the
# harness's own load records (transformers/peft loggers) are untouched.
logging.getLogger("bitsandbytes").addHandler(logging.NullHandler())

from fixtures.zero_runs import zero_run_specs  # noqa: E402  (after the handler: the fixtures package imports torch)

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))



@pytest.fixture(scope="session", autouse=True)
def trusted_synthetic_code():
    """The suite's synthetic bases ship model code the suite itself wrote: a test that loads one directly
    (``load_base``, ``DynamicRun``, ``inspect_base``) acts as a user who passed ``--trust-remote-code``. The
    gate is not bypassed where it is under test: ``check``/the CLI/``check_trained`` set the decision from
    their own arguments for their whole run."""
    from harness.loading.model_code import remote_code_consent

    with remote_code_consent(True):
        yield


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory shared by every xdist worker of this run."""
    env = os.environ.get("PLORA_HARNESS_CACHE")
    if env:
        return Path(env)
    return tmp_path_factory.getbasetemp().parent / "plora-harness-cache"


@pytest.fixture(scope="session")
def make_bundle(synthetic_cache: Path) -> Callable:
    """``make_bundle(variant=..., lora_r=..., ...)`` → a cached ``Bundle`` (base dir + adapter dir)."""
    from harness.synthetic import BundleSpec, build_bundle

    def make(**changes):
        return build_bundle(BundleSpec(**changes), synthetic_cache)

    return make


@pytest.fixture(scope="session")
def default_bundle(make_bundle):
    """The built-in default: ixc2.5 tiny base + trained official-recipe adapter."""
    return make_bundle()


@pytest.fixture(scope="session")
def zero_runs(synthetic_cache: Path) -> dict:
    """Real 2-rank DeepSpeed ZeRO-2/3 runs (fp32 and bf16) of the synthetic XComposer + official LoRA."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install 'plora-harness[deepspeed]')")
    from fixtures.zero_train import build_zero_many

    return build_zero_many(zero_run_specs(), synthetic_cache)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """gpu-marked tests skip with the reason on a machine without CUDA (torch only imported when there are some)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
