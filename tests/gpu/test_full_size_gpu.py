"""The synthetic family at the real 7B dims, built on the GPU in bf16 with an r=64 official-recipe adapter.

One run (module fixture) builds, adapts, merges and checks; each test reads one aspect of it. The
figures go to $PLORA_HARNESS_FIGURES (section "full_size") when set: scripts/gpu-check.sh sets it.
"""

import pytest

from fixtures.gpu.figures import write_figures
from fixtures.gpu.full_size import FullSizeSpec, run_full_size
from harness.synthetic import FULL_7B

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def full_size(gpu_device, gpu_dtype, figures_path):
    result = run_full_size(FullSizeSpec(device=gpu_device, dtype=gpu_dtype))
    if figures_path is not None:
        write_figures(figures_path, "full_size", result.figures())
    return result


def problems(result, prefix: str) -> list[str]:
    return [p for p in result.problems if p.startswith(prefix)]


def test_merged_logits_match_unmerged_relative_to_the_adapter_effect(full_size):
    assert problems(full_size, "logits") == []
    for stats in (full_size.outputs["probe"]["image"], full_size.outputs["probe"]["text"],
                  full_size.outputs["text_probe"]["text"]):
        assert stats["effect_rel_output"] > 0.05


def test_every_merged_weight_matches_base_plus_delta_in_fp32(full_size):
    assert problems(full_size, "weights") == []
    assert full_size.weights["modules_checked"] == 5 * FULL_7B.num_hidden_layers


def test_the_bf16_slice_matches_its_fp32_reference(full_size):
    assert problems(full_size, "hidden state") == []


def test_the_run_fits_its_time_and_memory_budget(full_size):
    assert full_size.timings["total"] < full_size.spec.time_budget_s, full_size.timings
    peak = full_size.peak_memory["overall"]
    assert peak is not None and peak < 1.5 * full_size.model_bytes + 8 * 2**30, full_size.peak_memory
