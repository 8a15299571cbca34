"""The real InternLM-XComposer2 / 4KHD / 2.5 model from --plora-base-model (and --plora-adapter, or a deterministic
r=64 official-recipe adapter when none is given), on CUDA in bf16 by default.

One run (module fixture) loads, adapts, merges, generates, saves and reloads; each test reads one
aspect. The merged checkpoint is written under pytest's temporary directory (about 16 GB for 7B):
point --basetemp at a disk with room. Figures go to $PLORA_HARNESS_FIGURES (section "real_model").
"""

import warnings

import pytest

from fixtures.gpu.figures import write_figures
from fixtures.gpu.quirks import RealModelError
from fixtures.gpu.real_model import RealModelRun

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def real_run(real_base_model, real_adapter, gpu_device, gpu_dtype, tmp_path_factory, figures_path):
    run = RealModelRun(real_base_model, real_adapter, workdir=tmp_path_factory.mktemp("real-model"),
                       dtype=gpu_dtype, device=gpu_device)
    try:
        result = run.run()
    except RealModelError as err:  # a quirk that stops the run: one sentence, no traceback
        pytest.fail(str(err), pytrace=False)
    if figures_path is not None:
        write_figures(figures_path, "real_model", result.figures())
    return result


def problems(result, prefix: str) -> list[str]:
    return [p for p in result.problems if p.startswith(prefix)]


def test_quirks_are_reported(real_run):
    for quirk in real_run.quirks:
        if quirk.severity == "warning":
            warnings.warn(quirk.sentence(), UserWarning, stacklevel=1)
    for note in real_run.notes:
        print(note)


def test_merged_matches_unmerged_on_image_and_text_rows(real_run):
    assert problems(real_run, "merged vs unmerged") == []
    assert set(real_run.comparisons) == {"probe", "text_probe"}


def test_greedy_generation_from_an_image_text_prompt_agrees(real_run):
    assert problems(real_run, "greedy generation") == []
    assert len(real_run.generation["merged"]) > 0


def test_merge_script_output_reloads_with_every_weight_and_the_same_answers(real_run):
    assert problems(real_run, "reload") == [] and problems(real_run, "reloaded") == []
    assert real_run.reload.get("missing_keys") == []
